-- sluice schema version 3 for PostgreSQL 13+: the counter table, the decision and refund
-- functions, the reset and sweep functions (version 1 had no refund; version 2 no
-- calendar-month windows). Every statement is idempotent, so the whole script may
-- run again at any time (`sluice serve` runs it at start unless `migrate: false`;
-- `sluice migrate --print` prints it for a DBA).
--
-- sluice_decide mirrors crates/engine/src/algorithm.rs (Window::evaluate, remaining,
-- reset_after, expires_at) and crates/engine/src/decision.rs (apply: two passes), as
-- crates/store-redis/src/decide.lua does. Times are microseconds since the Unix epoch
-- on the database's clock.

-- One migration at a time, whatever the number of instances starting together.
SELECT pg_catalog.pg_advisory_xact_lock(7526466502114635777);

DO $sluice$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = '@schema_name@') THEN
        CREATE SCHEMA @schema@;
    END IF;
END
$sluice$;

CREATE TABLE IF NOT EXISTS @schema@.sluice_migrations (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- One row per counter (one window of one limit for one key). `a`, `b`, `c` are the
-- engine's state: gcra (tat, 0, 0); fixed window (start, count, 0); sliding window
-- (start, count, previous). `expires_at` is when the state becomes indistinguishable
-- from no state; the sweep deletes rows past it. No index on expires_at: every decision
-- rewrites it, and an index on it would make every update a non-HOT one. fillfactor
-- leaves room on each page for those HOT updates.
CREATE @unlogged@ TABLE IF NOT EXISTS @schema@.sluice_counters (
    key        text COLLATE "C" PRIMARY KEY,
    a          bigint NOT NULL,
    b          bigint NOT NULL,
    c          bigint NOT NULL,
    expires_at bigint NOT NULL
) WITH (fillfactor = 80);

-- `storage.unlogged` can change between runs: bring the table to it (a rewrite, under
-- an exclusive lock, so only when it differs).
DO $sluice$
BEGIN
    IF (SELECT relpersistence FROM pg_catalog.pg_class
         WHERE oid = '@schema@.sluice_counters'::regclass) <> '@persistence@' THEN
        ALTER TABLE @schema@.sluice_counters SET @logged@;
    END IF;
END
$sluice$;

-- When the table was last swept, so instances sharing it take turns.
CREATE TABLE IF NOT EXISTS @schema@.sluice_sweeper (
    id       integer PRIMARY KEY CHECK (id = 1),
    swept_at bigint NOT NULL
);
INSERT INTO @schema@.sluice_sweeper (id, swept_at) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

-- The start of the UTC calendar month holding p_us (µs since the epoch), moved on by
-- p_months months: the bounds of N/month windows (period -1 in sluice_decide and
-- sluice_refund; crates/engine/src/calendar.rs). Computed on timestamp without time
-- zone, which counts from 1970-01-01 00:00 with no zone at all, so the session's
-- TimeZone plays no part; the microseconds stay exact (below 2^53) through the interval.
CREATE OR REPLACE FUNCTION @schema@.sluice_month_start(p_us bigint, p_months integer)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $sluice$
    SELECT (EXTRACT(EPOCH FROM pg_catalog.date_trunc('month', TIMESTAMP '1970-01-01' + p_us * INTERVAL '1 microsecond')
                               + p_months * INTERVAL '1 month') * 1000000)::bigint
$sluice$;

-- Decides every window of one request atomically.
--   p_keys: the request's distinct counters (prefix || counter || ':' || key).
--   p_args: 7 values per window, in the request's window order: slot (1-based index
--     into p_keys), algorithm (0 gcra, 1 fixed window, 2 sliding window), capacity (gcra
--     burst, otherwise the quota), period (µs; -1: a UTC calendar month, fixed windows
--     only), gcra interval (µs), cost (capped at capacity + 1, which decides the same),
--     flags (1: charge_denied, 2: shadow).
--   p_read_only: a dry run (or only costs of 0): no locks, nothing written.
-- Returns 4 values per window: allowed (1/0), remaining, reset_after (µs), retry_after
-- (µs; -1: never).
--
-- Concurrency: each counter is guarded by a transaction-scoped advisory lock on a
-- 64-bit hash of its key, taken in ascending hash order, so two decisions sharing
-- counters serialise and never deadlock. Advisory locks cost no write, where row
-- locks (SELECT ... FOR UPDATE) would write each row twice, and they also cover
-- counters that do not exist yet. The clock is read after the locks are held.
CREATE OR REPLACE FUNCTION @schema@.sluice_decide(p_keys text[], p_args bigint[], p_read_only boolean)
RETURNS bigint[]
LANGUAGE plpgsql
AS $sluice$
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_args, 1), 0) / 7;
    slots integer := coalesce(pg_catalog.array_length(p_keys, 1), 0);
    now_us bigint;
    -- Per slot: stored state (l*), working state (w*); sa / sp: the slot's algorithm
    -- and period, for its expiry.
    lp boolean[]; la bigint[]; lb bigint[]; lc bigint[];
    wp boolean[]; wa bigint[]; wb bigint[]; wc bigint[];
    sa bigint[]; sp bigint[];
    changed integer[] := '{}';
    ea bigint[] := '{}';
    res bigint[];
    r record;
    pass integer; i integer; o integer; s integer;
    alg bigint; cap bigint; period bigint; ivl bigint; cost bigint; flags bigint;
    ca bigint; cb bigint; cc bigint;          -- the state now, without this request
    ga bigint; gb bigint; gc bigint;          -- the state if it is charged
    ws bigint; we bigint; tau bigint; used bigint; lft bigint; weighted bigint;
    elapsed bigint; room bigint; divisor bigint;
    allowed boolean; retry bigint; charged boolean;
    decision_allowed boolean := true;
BEGIN
    IF slots = 0 OR n = 0 THEN
        RETURN '{}';
    END IF;
    IF NOT p_read_only THEN
        IF slots = 1 THEN
            PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(p_keys[1], 1936487781));
        ELSE
            PERFORM pg_catalog.pg_advisory_xact_lock(q.h)
               FROM (SELECT DISTINCT pg_catalog.hashtextextended(k, 1936487781) AS h
                       FROM pg_catalog.unnest(p_keys) AS k ORDER BY 1) AS q;
        END IF;
    END IF;
    now_us := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;

    lp := pg_catalog.array_fill(false, ARRAY[slots]);
    la := pg_catalog.array_fill(0::bigint, ARRAY[slots]);
    lb := la; lc := la; sa := la; sp := la;
    IF slots = 1 THEN
        SELECT t.a, t.b, t.c INTO ca, cb, cc FROM @schema@.sluice_counters AS t WHERE t.key = p_keys[1];
        IF FOUND THEN
            lp[1] := true; la[1] := ca; lb[1] := cb; lc[1] := cc;
        END IF;
    ELSE
        FOR r IN SELECT t.key, t.a, t.b, t.c FROM @schema@.sluice_counters AS t
                  WHERE t.key = ANY (p_keys) LOOP
            s := pg_catalog.array_position(p_keys, r.key);
            lp[s] := true; la[s] := r.a; lb[s] := r.b; lc[s] := r.c;
        END LOOP;
    END IF;
    res := pg_catalog.array_fill(0::bigint, ARRAY[n * 4]);

    -- Pass 1: every window as if the decision were allowed, so repeated counters see
    -- the charges before them. Pass 2 (only when denied): from the stored states again,
    -- charging only charge_denied windows whose cost could fit; verdicts stay pass 1's.
    FOR pass IN 1..2 LOOP
        EXIT WHEN pass = 2 AND decision_allowed;
        wp := lp; wa := la; wb := lb; wc := lc;
        FOR i IN 0 .. n - 1 LOOP
            o := i * 7;
            s := p_args[o + 1]; alg := p_args[o + 2]; cap := p_args[o + 3];
            period := p_args[o + 4]; ivl := p_args[o + 5]; cost := p_args[o + 6];
            flags := p_args[o + 7];
            sa[s] := alg; sp[s] := period;
            IF alg = 0 THEN
                -- gcra: the state is the theoretical arrival time.
                IF wp[s] AND wa[s] > now_us THEN ca := wa[s]; ELSE ca := now_us; END IF;
                cb := 0; cc := 0;
                tau := cap * ivl;
                ga := ca + cost * ivl;
                allowed := cost = 0 OR ga - now_us <= tau;
                IF allowed THEN retry := 0;
                ELSIF cost > cap THEN retry := -1;
                ELSE retry := ga - tau - now_us;
                END IF;
                -- charge_denied locks out for at most one more bucket after the last attempt.
                ga := LEAST(ga, GREATEST(now_us + 2 * tau, ca)); gb := 0; gc := 0;
            ELSE
                IF period < 0 THEN ws := @schema@.sluice_month_start(now_us, 0);
                ELSE ws := now_us - now_us % period;
                END IF;
                IF alg = 1 THEN
                    -- fixed window; a state from a later window (a decision whose clock
                    -- read later) is the current one. It ends at `we`: months differ in
                    -- length.
                    IF wp[s] AND wa[s] >= ws THEN ca := wa[s]; cb := wb[s]; ELSE ca := ws; cb := 0; END IF;
                    cc := 0;
                    IF period < 0 THEN we := @schema@.sluice_month_start(ca, 1);
                    ELSE we := ca + period;
                    END IF;
                    gb := cb + cost;
                    allowed := cost = 0 OR gb <= cap;
                    IF allowed THEN retry := 0;
                    ELSIF cost > cap THEN retry := -1;
                    ELSE retry := we - now_us;
                    END IF;
                    ga := ca; gc := 0;
                ELSE
                    -- sliding window: the previous window's count weighs by its overlap.
                    IF wp[s] AND wa[s] >= ws THEN ca := wa[s]; cb := wb[s]; cc := wc[s];
                    ELSIF wp[s] AND wa[s] = ws - period THEN ca := ws; cb := 0; cc := wb[s];
                    ELSE ca := ws; cb := 0; cc := 0;
                    END IF;
                    lft := LEAST(GREATEST(period - (now_us - ca), 0), period);
                    IF cc = 0 OR lft = 0 THEN weighted := 0;
                    ELSIF cc <= 4611686018427387903 / lft THEN weighted := (cc * lft + period - 1) / period;
                    ELSE weighted := pg_catalog.div(cc::numeric * lft + period - 1, period::numeric)::bigint;
                    END IF;
                    used := weighted + cb;
                    allowed := cost = 0 OR used + cost <= cap;
                    IF allowed THEN retry := 0;
                    ELSIF cost > cap THEN retry := -1;
                    ELSE
                        IF cb + cost > cap THEN
                            -- Not in this window: wait until this window's count,
                            -- weighted as the previous one, leaves room.
                            room := cap - cost; divisor := cb;
                        ELSE
                            -- In this window, once the previous one has decayed enough.
                            room := cap - cb - cost; divisor := GREATEST(cc, 1);
                        END IF;
                        IF room = 0 THEN elapsed := period;
                        ELSIF room <= 9223372036854775807 / period THEN elapsed := period - room * period / divisor;
                        ELSE elapsed := period - pg_catalog.div(room::numeric * period, divisor::numeric)::bigint;
                        END IF;
                        IF cb + cost > cap THEN
                            retry := ca + period + GREATEST(elapsed, 0) - now_us;
                        ELSE
                            retry := ca + elapsed - now_us;
                        END IF;
                    END IF;
                    ga := ca; gb := cb + cost; gc := cc;
                END IF;
            END IF;

            IF pass = 1 THEN
                charged := cost > 0 AND (allowed OR (flags % 2 = 1 AND retry >= 0));
                IF NOT allowed AND flags < 2 THEN decision_allowed := false; END IF;
                res[i * 4 + 1] := CASE WHEN allowed THEN 1 ELSE 0 END;
                res[i * 4 + 4] := retry;
            ELSE
                charged := cost > 0 AND flags % 2 = 1 AND res[i * 4 + 4] >= 0;
            END IF;
            IF charged THEN
                wp[s] := true; wa[s] := ga; wb[s] := gb; wc[s] := gc;
                ca := ga; cb := gb; cc := gc;
                IF alg = 2 THEN used := used + cost; END IF;
            END IF;
            -- remaining and reset_after of the state after this window (ca, cb, cc).
            IF alg = 0 THEN
                res[i * 4 + 2] := GREATEST(now_us + tau - ca, 0) / ivl;
                res[i * 4 + 3] := GREATEST(ca - now_us, 0);
            ELSIF alg = 1 THEN
                res[i * 4 + 2] := GREATEST(cap - cb, 0);
                res[i * 4 + 3] := CASE WHEN cb > 0 THEN we - now_us ELSE 0 END;
            ELSE
                res[i * 4 + 2] := GREATEST(cap - used, 0);
                res[i * 4 + 3] := CASE WHEN cb > 0 THEN ca + 2 * period - now_us
                                       WHEN cc > 0 THEN ca + period - now_us
                                       ELSE 0 END;
            END IF;
        END LOOP;
    END LOOP;

    IF p_read_only THEN
        RETURN res;
    END IF;
    FOR s IN 1 .. slots LOOP
        IF wp[s] AND (NOT lp[s] OR wa[s] <> la[s] OR wb[s] <> lb[s] OR wc[s] <> lc[s]) THEN
            changed := changed || s;
            -- Kept exactly as long as it matters (the engine's expires_at).
            ea := ea || CASE WHEN sa[s] = 0 THEN wa[s]
                             WHEN sp[s] < 0 THEN @schema@.sluice_month_start(wa[s], 1)
                             WHEN sa[s] = 1 OR wb[s] = 0 THEN wa[s] + sp[s]
                             ELSE wa[s] + 2 * sp[s] END;
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(changed) = 1 THEN
        s := changed[1];
        INSERT INTO @schema@.sluice_counters AS t (key, a, b, c, expires_at)
             VALUES (p_keys[s], wa[s], wb[s], wc[s], ea[1])
        ON CONFLICT (key) DO UPDATE
           SET a = excluded.a, b = excluded.b, c = excluded.c, expires_at = excluded.expires_at;
    ELSIF pg_catalog.cardinality(changed) > 1 THEN
        INSERT INTO @schema@.sluice_counters AS t (key, a, b, c, expires_at)
             SELECT p_keys[x.s], wa[x.s], wb[x.s], wc[x.s], x.e
               FROM unnest(changed, ea) AS x(s, e)
        ON CONFLICT (key) DO UPDATE
           SET a = excluded.a, b = excluded.b, c = excluded.c, expires_at = excluded.expires_at;
    END IF;
    RETURN res;
END
$sluice$;

-- Forgets counters, under the same locks as decisions so a reset is never undone by a
-- decision that read the counter before it. Returns how many live counters went.
CREATE OR REPLACE FUNCTION @schema@.sluice_reset(p_keys text[])
RETURNS bigint
LANGUAGE plpgsql
AS $sluice$
DECLARE
    removed bigint;
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(q.h)
       FROM (SELECT DISTINCT pg_catalog.hashtextextended(k, 1936487781) AS h
               FROM pg_catalog.unnest(p_keys) AS k ORDER BY 1) AS q;
    WITH gone AS (
        DELETE FROM @schema@.sluice_counters AS t WHERE t.key = ANY (p_keys) RETURNING t.expires_at
    )
    SELECT pg_catalog.count(*) INTO removed FROM gone
     WHERE gone.expires_at > (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
    RETURN removed;
END
$sluice$;

-- Deletes up to p_batch counters that expired more than p_grace_us ago; returns how
-- many, or -1 when another instance swept less than p_every_us ago (p_every_us = 0:
-- sweep regardless, to go on after a full batch). Rows a decision holds are skipped,
-- so a sweep never waits for a decision nor makes one wait long.
CREATE OR REPLACE FUNCTION @schema@.sluice_sweep(p_batch integer, p_grace_us bigint, p_every_us bigint)
RETURNS bigint
LANGUAGE plpgsql
AS $sluice$
DECLARE
    now_us bigint := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
    deleted bigint;
BEGIN
    IF p_every_us > 0 THEN
        PERFORM 1 FROM @schema@.sluice_sweeper
          WHERE id = 1 AND swept_at <= now_us - p_every_us
            FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN -1;
        END IF;
        UPDATE @schema@.sluice_sweeper SET swept_at = now_us WHERE id = 1;
    END IF;
    DELETE FROM @schema@.sluice_counters AS t
     WHERE t.key IN (SELECT d.key FROM @schema@.sluice_counters AS d
                      WHERE d.expires_at < now_us - p_grace_us
                      LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$sluice$;

-- Gives back what an earlier decision charged (Store::refund; the engine's
-- Window::refund): gcra moves the tat back by cost intervals, never before now; a fixed
-- window's current count goes down; a sliding window's current count, then its previous
-- one. Never below an empty counter; an absent or expired counter is left alone.
--   p_keys: the distinct counters refunded; p_args: 6 values per window: slot (1-based
--   index into p_keys), algorithm (0 gcra, 1 fixed, 2 sliding), capacity, period (µs;
--   -1: a UTC calendar month), gcra interval (µs), cost. Under the same locks as
--   decisions. Returns the number of counters written.
CREATE OR REPLACE FUNCTION @schema@.sluice_refund(p_keys text[], p_args bigint[])
RETURNS bigint
LANGUAGE plpgsql
AS $sluice$
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_args, 1), 0) / 6;
    slots integer := coalesce(pg_catalog.array_length(p_keys, 1), 0);
    now_us bigint;
    wp boolean[]; wa bigint[]; wb bigint[]; wc bigint[]; sa bigint[]; sp bigint[];
    dirty boolean[];
    r record;
    i integer; o integer; s integer;
    alg bigint; period bigint; ivl bigint; cost bigint;
    ws bigint; ca bigint; cb bigint; cc bigint; take bigint;
    written bigint := 0;
BEGIN
    IF slots = 0 OR n = 0 THEN
        RETURN 0;
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(q.h)
       FROM (SELECT DISTINCT pg_catalog.hashtextextended(k, 1936487781) AS h
               FROM pg_catalog.unnest(p_keys) AS k ORDER BY 1) AS q;
    now_us := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
    wp := pg_catalog.array_fill(false, ARRAY[slots]);
    dirty := wp;
    wa := pg_catalog.array_fill(0::bigint, ARRAY[slots]);
    wb := wa; wc := wa; sa := wa; sp := wa;
    FOR r IN SELECT t.key, t.a, t.b, t.c FROM @schema@.sluice_counters AS t
              WHERE t.key = ANY (p_keys) AND t.expires_at > now_us LOOP
        s := pg_catalog.array_position(p_keys, r.key);
        wp[s] := true; wa[s] := r.a; wb[s] := r.b; wc[s] := r.c;
    END LOOP;
    FOR i IN 1 .. n LOOP
        o := (i - 1) * 6;
        s := p_args[o + 1]::integer; alg := p_args[o + 2];
        period := p_args[o + 4]; ivl := p_args[o + 5]; cost := p_args[o + 6];
        sa[s] := alg; sp[s] := period;
        CONTINUE WHEN NOT wp[s] OR cost <= 0;
        IF alg = 0 THEN
            ca := GREATEST(wa[s], now_us);
            cb := GREATEST(ca - cost * ivl, now_us);
            IF cb <> ca THEN
                wa[s] := cb; wb[s] := 0; wc[s] := 0; dirty[s] := true;
            END IF;
        ELSE
            IF period < 0 THEN ws := @schema@.sluice_month_start(now_us, 0);
            ELSE ws := now_us - (now_us % period);
            END IF;
            IF wa[s] >= ws THEN
                ca := wa[s]; cb := wb[s]; cc := wc[s];
            ELSIF alg = 2 AND wa[s] = ws - period THEN
                ca := ws; cb := 0; cc := wb[s];
            ELSE
                CONTINUE;
            END IF;
            -- The current window's count first, then (sliding) the previous one's.
            take := LEAST(cb, cost);
            cb := cb - take;
            IF alg = 2 THEN
                cc := cc - LEAST(cc, cost - take);
            END IF;
            IF ca <> wa[s] OR cb <> wb[s] OR cc <> wc[s] THEN
                wa[s] := ca; wb[s] := cb; wc[s] := cc; dirty[s] := true;
            END IF;
        END IF;
    END LOOP;
    FOR s IN 1 .. slots LOOP
        CONTINUE WHEN NOT dirty[s];
        UPDATE @schema@.sluice_counters AS t
           SET a = wa[s], b = wb[s], c = wc[s],
               expires_at = CASE WHEN sa[s] = 0 THEN wa[s]
                                 WHEN sp[s] < 0 THEN @schema@.sluice_month_start(wa[s], 1)
                                 WHEN sa[s] = 1 OR wb[s] = 0 THEN wa[s] + sp[s]
                                 ELSE wa[s] + 2 * sp[s] END
         WHERE t.key = p_keys[s];
        written := written + 1;
    END LOOP;
    RETURN written;
END
$sluice$;

INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (1, 'counter table; sluice_decide, sluice_reset and sluice_sweep')
ON CONFLICT (version) DO NOTHING;
INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (2, 'sluice_refund')
ON CONFLICT (version) DO NOTHING;
INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (3, 'calendar-month windows: sluice_month_start; period -1 in sluice_decide and sluice_refund')
ON CONFLICT (version) DO NOTHING;
