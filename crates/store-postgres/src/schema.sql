-- sluice schema version 5 for PostgreSQL 13+: the counter table, the decision and refund
-- functions, the reset and sweep functions, calendar-month windows (sluice_month_start),
-- reservations (holds, concurrency slots, sluice_reserve, sluice_settle), runtime
-- records, and batched decisions (sluice_decide_batch). Version 1 had no refund;
-- version 2 neither calendar months nor reservations; version 4 no batches.
-- Every statement is idempotent, so the whole script may run again at any time, and
-- over a database of any earlier version (`sluice serve` runs it at start unless
-- `migrate: false`; `sluice migrate --print` prints it for a DBA). Functions keep
-- their signatures from one version to the next, so instances of the previous version
-- go on deciding during a rolling upgrade.
--
-- sluice_reserve mirrors crates/engine/src/algorithm.rs (Window::evaluate, remaining,
-- reset_after, expires_at) and crates/engine/src/decision.rs (apply: two passes), as
-- crates/store-redis/src/decide.lua does; sluice_settle mirrors
-- crates/engine/src/reservation.rs (settle: Window::refund and Window::force). Times
-- are microseconds since the Unix epoch on the database's clock.

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

-- One row per reservation allowed (Store::reserve), until it expires: `id` is the
-- caller's 32 hex digits, `digest` what a settlement must repeat, `settled` whether it
-- was settled (or released) already. Rows are kept until they expire, so a second
-- settlement is told so; the sweep deletes them afterwards (hence the expires_at
-- index: rows are written twice at most, and `settled` is not indexed, so the one
-- update stays HOT).
CREATE @unlogged@ TABLE IF NOT EXISTS @schema@.sluice_holds (
    id         text COLLATE "C" PRIMARY KEY,
    digest     text COLLATE "C" NOT NULL,
    expires_at bigint NOT NULL,
    settled    boolean NOT NULL
);

-- One row per slot of a concurrency window (`concurrency: N`) an open reservation
-- holds: the window's state is counted from the live rows of its key (open = how many,
-- free_at = the earliest expiry), under the key's advisory lock. A settlement deletes
-- its reservation's rows by (key, hold); the sweep deletes expired ones.
CREATE @unlogged@ TABLE IF NOT EXISTS @schema@.sluice_slots (
    key        text COLLATE "C" NOT NULL,
    hold       text COLLATE "C" NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (key, hold)
);

-- The sweep's indexes, created only when missing: CREATE INDEX IF NOT EXISTS locks the
-- table (SHARE) even when the index is there, which would stop every reservation until
-- this migration commits, and deadlock with a sweep that holds one table and waits for
-- the other (instances starting together run this script one after the other, while
-- the first is already serving).
DO $sluice$
BEGIN
    IF pg_catalog.to_regclass('@schema@.sluice_holds_expires_at') IS NULL THEN
        CREATE INDEX sluice_holds_expires_at ON @schema@.sluice_holds (expires_at);
    END IF;
    IF pg_catalog.to_regclass('@schema@.sluice_slots_expires_at') IS NULL THEN
        CREATE INDEX sluice_slots_expires_at ON @schema@.sluice_slots (expires_at);
    END IF;
END
$sluice$;

-- `storage.unlogged` can change between runs: bring the tables to it (a rewrite, under
-- an exclusive lock, so only when it differs).
DO $sluice$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['sluice_counters', 'sluice_holds', 'sluice_slots'] LOOP
        IF (SELECT relpersistence FROM pg_catalog.pg_class
             WHERE oid = pg_catalog.format('%I.%I', '@schema_name@', t)::regclass) <> '@persistence@' THEN
            EXECUTE pg_catalog.format('ALTER TABLE %I.%I SET @logged@', '@schema_name@', t);
        END IF;
    END LOOP;
END
$sluice$;

-- Runtime records (plan assignments, rate overrides, block and allow entries), written
-- by admin calls and read by every instance when their prefix's version moves. Always
-- logged, whatever `storage.unlogged` says: they are settings, not counters. `id` is
-- the deployment's key prefix followed by the record's id.
CREATE TABLE IF NOT EXISTS @schema@.sluice_records (
    id   text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);
CREATE TABLE IF NOT EXISTS @schema@.sluice_records_version (
    prefix  text COLLATE "C" PRIMARY KEY,
    version bigint NOT NULL
);

-- When the table was last swept, so instances sharing it take turns.
CREATE TABLE IF NOT EXISTS @schema@.sluice_sweeper (
    id       integer PRIMARY KEY CHECK (id = 1),
    swept_at bigint NOT NULL
);
INSERT INTO @schema@.sluice_sweeper (id, swept_at) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

-- The start of the UTC calendar month holding p_us (µs since the epoch), moved on by
-- p_months months: the bounds of N/month windows (period -1 in sluice_reserve and
-- sluice_move; crates/engine/src/calendar.rs). Computed on timestamp without time
-- zone, which counts from 1970-01-01 00:00 with no zone at all, so the session's
-- TimeZone plays no part; the microseconds stay exact (below 2^53) through the interval.
CREATE OR REPLACE FUNCTION @schema@.sluice_month_start(p_us bigint, p_months integer)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $sluice$
    SELECT (EXTRACT(EPOCH FROM pg_catalog.date_trunc('month', TIMESTAMP '1970-01-01' + p_us * INTERVAL '1 microsecond')
                               + p_months * INTERVAL '1 month') * 1000000)::bigint
$sluice$;

-- The arithmetic of decisions (crates/engine/src/algorithm.rs, and the two passes of
-- crates/engine/src/decision.rs) on counter states held in arrays, with no table read
-- or written and no lock taken: the caller holds the counters' advisory locks, read
-- them, and writes what changed. Requests are decided one after the other, each on the
-- states the ones before it left, so each is decided as it would have been alone.
-- One call for a whole batch: a CALL costs about as much as deciding one window.
--   p_args: 7 values per window as sluice_reserve's, request after request; their
--     slots index the state arrays.
--   p_windows: each request's window count; negative (minus the count) for a request
--     refused without deciding it.
--   p_framed: answer as sluice_decide_batch (per request, its answer's length first; a
--     refused request -1, 1); else the answer is the one request's outcomes alone.
--   p_now: the database's clock (µs), read after the locks were taken.
--   p_present, p_a, p_b, p_c: per slot, whether a state exists, and the state: the
--     stored one on entry, the one to store on return.
--   p_alg, p_period: per slot, the algorithm and period of the last window seen on it,
--     for its expiry; a 3 on entry marks a concurrency window whose slots are counted.
--   p_res: the answer: 4 values per window (sluice_reserve's), framed or not;
--     p_allowed: the last request's verdict.
-- A procedure, so that its INOUT arrays come back into the caller's variables.
CREATE OR REPLACE PROCEDURE @schema@.sluice_apply(p_args bigint[], p_windows integer[], p_framed boolean,
                                                  p_now bigint,
                                                  INOUT p_present boolean[], INOUT p_a bigint[],
                                                  INOUT p_b bigint[], INOUT p_c bigint[],
                                                  INOUT p_alg bigint[], INOUT p_period bigint[],
                                                  INOUT p_res bigint[], INOUT p_allowed boolean)
LANGUAGE plpgsql
AS $sluice$
DECLARE
    n integer;
    q integer;
    first integer := 0;
    res bigint[];
    decision_allowed boolean;
    now_us bigint := p_now;
    wp boolean[]; wa bigint[]; wb bigint[]; wc bigint[];
    pass integer; i integer; o integer; s integer;
    alg bigint; cap bigint; period bigint; ivl bigint; cost bigint; flags bigint;
    ca bigint; cb bigint; cc bigint;          -- the state now, without this request
    ga bigint; gb bigint; gc bigint;          -- the state if it is charged
    ws bigint; we bigint; tau bigint; used bigint; lft bigint; weighted bigint;
    elapsed bigint; room bigint; divisor bigint;
    allowed boolean; retry bigint; charged boolean;
BEGIN
    IF p_framed THEN p_res := '{}'; END IF;
    FOR q IN 1 .. coalesce(pg_catalog.array_length(p_windows, 1), 0) LOOP
        n := p_windows[q];
        IF n < 0 THEN
            IF p_framed THEN p_res := p_res || ARRAY[-1, 1]::bigint[]; END IF;
            first := first - n;
            CONTINUE;
        END IF;
        decision_allowed := true;
        res := pg_catalog.array_fill(0::bigint, ARRAY[n * 4]);
        -- Pass 1: every window as if the decision were allowed, so repeated counters see
        -- the charges before them. Pass 2 (only when denied): from the stored states again,
        -- charging only charge_denied windows whose cost could fit; verdicts stay pass 1's.
        FOR pass IN 1..2 LOOP
            EXIT WHEN pass = 2 AND decision_allowed;
            wp := p_present; wa := p_a; wb := p_b; wc := p_c;
            FOR i IN 0 .. n - 1 LOOP
                o := (first + i) * 7;
                s := p_args[o + 1]; alg := p_args[o + 2]; cap := p_args[o + 3];
                period := p_args[o + 4]; ivl := p_args[o + 5]; cost := p_args[o + 6];
                flags := p_args[o + 7];
                p_alg[s] := alg; p_period[s] := period;
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
                ELSIF alg = 3 THEN
                    -- concurrency: slots in flight (a) against the capacity; b: when the
                    -- first of them expires, the longest a denied call must wait.
                    IF wp[s] AND wa[s] > 0 THEN ca := wa[s]; cb := GREATEST(wb[s], now_us);
                    ELSE ca := 0; cb := now_us;
                    END IF;
                    cc := 0;
                    ga := ca + cost;
                    allowed := cost = 0 OR ga <= cap;
                    IF allowed THEN retry := 0;
                    ELSIF cost > cap THEN retry := -1;
                    ELSE retry := cb - now_us;
                    END IF;
                    gb := cb; gc := 0;
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
                ELSIF alg = 3 THEN
                    res[i * 4 + 2] := GREATEST(cap - ca, 0);
                    res[i * 4 + 3] := CASE WHEN ca > 0 THEN cb - now_us ELSE 0 END;
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
        p_present := wp; p_a := wa; p_b := wb; p_c := wc;
        IF p_framed THEN p_res := p_res || (n * 4)::bigint || res; ELSE p_res := res; END IF;
        p_allowed := decision_allowed;
        first := first + n;
    END LOOP;
END
$sluice$;

-- Reads the stored state of every counter in p_keys (sluice_apply's p_present, p_a,
-- p_b, p_c, one per key) and counts the live slots of every concurrency window in p_args
-- (7 values per window, slots indexing p_keys) as its state (open, free_at), marking
-- its p_alg 3. The caller holds the keys' advisory locks (unless it writes nothing).
CREATE OR REPLACE PROCEDURE @schema@.sluice_load(p_keys text[], p_args bigint[], p_now bigint,
                                                 INOUT lp boolean[], INOUT la bigint[],
                                                 INOUT lb bigint[], INOUT lc bigint[],
                                                 INOUT sa bigint[], INOUT sp bigint[])
LANGUAGE plpgsql
AS $sluice$
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_args, 1), 0) / 7;
    slots integer := coalesce(pg_catalog.array_length(p_keys, 1), 0);
    now_us bigint := p_now;
    r record;
    i integer; s integer;
    ca bigint; cb bigint; cc bigint;
BEGIN
    lp := pg_catalog.array_fill(false, ARRAY[slots]);
    la := pg_catalog.array_fill(0::bigint, ARRAY[slots]);
    lb := la; lc := la; sa := la; sp := la;
    IF slots = 1 THEN
        SELECT t.a, t.b, t.c INTO ca, cb, cc FROM @schema@.sluice_counters AS t WHERE t.key = p_keys[1];
        IF FOUND THEN
            lp[1] := true; la[1] := ca; lb[1] := cb; lc[1] := cc;
        END IF;
    ELSE
        -- By position, not array_position: a batch reads many keys at once. OFFSET 0 keeps
        -- one index probe per key, whatever the planner guesses of the array's length.
        FOR r IN SELECT x.i, t.a, t.b, t.c
                   FROM pg_catalog.unnest(p_keys) WITH ORDINALITY AS x(k, i)
                  CROSS JOIN LATERAL (SELECT c.a, c.b, c.c FROM @schema@.sluice_counters AS c
                                       WHERE c.key = x.k OFFSET 0) AS t LOOP
            s := r.i;
            lp[s] := true; la[s] := r.a; lb[s] := r.b; lc[s] := r.c;
        END LOOP;
    END IF;
    -- A concurrency window's state is counted from its live slots: (open, free_at).
    FOR i IN 0 .. n - 1 LOOP
        CONTINUE WHEN p_args[i * 7 + 2] <> 3;
        s := p_args[i * 7 + 1];
        CONTINUE WHEN sa[s] = 3;
        sa[s] := 3;
        SELECT pg_catalog.count(*), pg_catalog.min(t.expires_at) INTO ca, cb
          FROM @schema@.sluice_slots AS t
         WHERE t.key = p_keys[s] AND t.expires_at > now_us;
        lp[s] := true; la[s] := ca; lb[s] := coalesce(cb, now_us); lc[s] := 0;
    END LOOP;
END
$sluice$;

-- Stores the counters whose state sluice_apply changed (w* against the stored l*), each
-- with its expiry, in one statement. Concurrency windows (sa 3) are not rows of
-- sluice_counters: their slots are. The caller holds the keys' advisory locks.
CREATE OR REPLACE PROCEDURE @schema@.sluice_write(p_keys text[],
                                                  lp boolean[], la bigint[], lb bigint[], lc bigint[],
                                                  wp boolean[], wa bigint[], wb bigint[], wc bigint[],
                                                  sa bigint[], sp bigint[])
LANGUAGE plpgsql
AS $sluice$
DECLARE
    slots integer := coalesce(pg_catalog.array_length(p_keys, 1), 0);
    changed integer[] := '{}';
    ea bigint[] := '{}';
    s integer;
BEGIN
    FOR s IN 1 .. slots LOOP
        -- A concurrency window is not a row of sluice_counters: its slots are below.
        IF sa[s] <> 3 AND wp[s] AND (NOT lp[s] OR wa[s] <> la[s] OR wb[s] <> lb[s] OR wc[s] <> lc[s]) THEN
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
END
$sluice$;

-- Decides every window of one request atomically and, for a reservation
-- (Store::reserve) that is allowed, records its hold and gives it one slot of every
-- concurrency window it charged, in the same transaction.
--   p_keys: the request's distinct counters (prefix || counter || ':' || key).
--   p_args: 7 values per window, in the request's window order: slot (1-based index
--     into p_keys), algorithm (0 gcra, 1 fixed window, 2 sliding window, 3
--     concurrency), capacity (gcra burst, otherwise the quota or the slots), period
--     (µs; -1: a UTC calendar month, fixed windows only), gcra interval (µs), cost
--     (capped at capacity + 1, which decides the same), flags (1: charge_denied, 2:
--     shadow).
--   p_read_only: a dry run (or, for a decision, only costs of 0): no locks, nothing
--     written.
--   p_hold, p_digest, p_ttl: the reservation's id, digest and time to live (µs); a
--     NULL p_hold is a plain decision (sluice_decide).
-- Returns 4 values per window: allowed (1/0), remaining, reset_after (µs), retry_after
-- (µs; -1: never).
--
-- Concurrency: each counter is guarded by a transaction-scoped advisory lock on a
-- 64-bit hash of its key, taken in ascending hash order, so two decisions sharing
-- counters serialise and never deadlock. Advisory locks cost no write, where row
-- locks (SELECT ... FOR UPDATE) would write each row twice, and they also cover
-- counters that do not exist yet. The clock is read after the locks are held. A
-- concurrency window's key is locked like any counter's, so the reservations of one
-- key count its slots one after the other and never admit more than its capacity; the
-- hold and slot rows are new rows (their ids are random), so no other lock is waited
-- for while the advisory locks are held.
CREATE OR REPLACE FUNCTION @schema@.sluice_reserve(p_keys text[], p_args bigint[], p_read_only boolean,
                                                   p_hold text, p_digest text, p_ttl bigint)
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
    hold_expires bigint;
BEGIN
    IF slots = 0 OR n = 0 THEN
        -- A reservation of nothing is allowed, and may still be settled (for more).
        IF p_hold IS NOT NULL AND NOT p_read_only THEN
            INSERT INTO @schema@.sluice_holds AS t (id, digest, expires_at, settled)
                 VALUES (p_hold, p_digest,
                         (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint
                           + GREATEST(p_ttl, 1), false)
            ON CONFLICT (id) DO NOTHING;
        END IF;
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
    CALL @schema@.sluice_load(p_keys, p_args, now_us, lp, la, lb, lc, sa, sp);
    wp := lp; wa := la; wb := lb; wc := lc;
    CALL @schema@.sluice_apply(p_args, ARRAY[n], false, now_us, wp, wa, wb, wc, sa, sp, res, decision_allowed);
    IF p_read_only THEN
        RETURN res;
    END IF;
    CALL @schema@.sluice_write(p_keys, lp, la, lb, lc, wp, wa, wb, wc, sa, sp);
    -- An allowed reservation: its hold, and a slot of every concurrency window it
    -- charged (one per window, whatever the cost, as the memory store counts them). An
    -- id already recorded is kept as it was: ids are 128 random bits, so a repeat is a
    -- caller's mistake, and waiting for that row's lock here could deadlock with its
    -- settlement.
    IF p_hold IS NOT NULL AND decision_allowed THEN
        hold_expires := now_us + GREATEST(p_ttl, 1);
        INSERT INTO @schema@.sluice_holds AS t (id, digest, expires_at, settled)
             VALUES (p_hold, p_digest, hold_expires, false)
        ON CONFLICT (id) DO NOTHING;
        FOR s IN 1 .. slots LOOP
            CONTINUE WHEN sa[s] <> 3 OR wa[s] = la[s];
            INSERT INTO @schema@.sluice_slots AS t (key, hold, expires_at)
                 VALUES (p_keys[s], p_hold, hold_expires)
            ON CONFLICT (key, hold) DO NOTHING;
        END LOOP;
    END IF;
    RETURN res;
END
$sluice$;

-- Decides every window of one request atomically: sluice_reserve without a hold (see
-- there for the arguments and the answer). A SQL function of one SELECT, so the
-- planner inlines it into the caller's statement; version 2 instances call it during a
-- rolling upgrade.
CREATE OR REPLACE FUNCTION @schema@.sluice_decide(p_keys text[], p_args bigint[], p_read_only boolean)
RETURNS bigint[]
LANGUAGE sql
AS $sluice$
SELECT @schema@.sluice_reserve(p_keys, p_args, p_read_only, NULL::text, NULL::text, 0::bigint)
$sluice$;

-- Decides several requests in one call (the store's batcher: concurrent decisions that
-- arrive while earlier calls are in flight), each as sluice_decide would decide it
-- alone, one after the other in the order given: each sees the counters as the
-- requests before it left them. Decisions only (no holds); nothing read-only.
--   p_keys: the distinct counters of the whole batch.
--   p_args: every request's windows one after the other, 7 values each as
--     sluice_reserve's, their slots indexing p_keys.
--   p_windows: the number of windows of each request.
-- Returns, per request: 4 times its window count, then sluice_decide's answer for it;
-- or -1 and a code (1: its arguments cannot be decided) when its arguments are
-- invalid, which is checked before any is decided, so one bad request fails alone
-- without the cost of a subtransaction per request. Any other error fails the batch.
--
-- Concurrency: the advisory locks of every counter of the batch are taken once, in
-- ascending hash order, before any request is decided; so a batch is, to every other
-- decision, one decision over the union of its counters, and no two calls wait on
-- each other in a cycle. One clock reading serves the batch.
CREATE OR REPLACE FUNCTION @schema@.sluice_decide_batch(p_keys text[], p_args bigint[], p_windows integer[])
RETURNS bigint[]
LANGUAGE plpgsql
AS $sluice$
DECLARE
    m integer := coalesce(pg_catalog.array_length(p_windows, 1), 0);
    slots integer := coalesce(pg_catalog.array_length(p_keys, 1), 0);
    now_us bigint;
    lp boolean[]; la bigint[]; lb bigint[]; lc bigint[];
    wp boolean[]; wa bigint[]; wb bigint[]; wc bigint[];
    sa bigint[]; sp bigint[];
    windows integer[] := p_windows;
    answer bigint[];
    allowed boolean;
    q integer; i integer; o integer; first integer; n integer;
BEGIN
    -- A malformed batch as a whole (the client's fault, not one request's) fails.
    SELECT coalesce(sum(w), 0), coalesce(min(w), 0) INTO n, i FROM pg_catalog.unnest(p_windows) AS w;
    IF n * 7 <> coalesce(pg_catalog.array_length(p_args, 1), 0) OR i < 0 THEN
        RAISE EXCEPTION 'sluice_decide_batch: % argument values for window counts %',
            coalesce(pg_catalog.array_length(p_args, 1), 0), p_windows;
    END IF;
    -- What sluice_apply and sluice_load would divide by, index or fail on.
    first := 0;
    FOR q IN 1 .. m LOOP
        n := p_windows[q];
        FOR i IN first .. first + n - 1 LOOP
            o := i * 7;
            IF NOT (p_args[o + 1] BETWEEN 1 AND slots AND p_args[o + 2] BETWEEN 0 AND 3
                    AND p_args[o + 3] >= 0 AND p_args[o + 6] >= 0 AND p_args[o + 7] BETWEEN 0 AND 3
                    AND (p_args[o + 4] > 0 OR (p_args[o + 4] = -1 AND p_args[o + 2] = 1))
                    AND (p_args[o + 2] <> 0 OR p_args[o + 5] > 0)) THEN
                windows[q] := -n;
                -- Its concurrency windows are not counted: sluice_load skips them.
                p_args[o + 2] := -1;
            END IF;
        END LOOP;
        first := first + n;
    END LOOP;
    PERFORM pg_catalog.pg_advisory_xact_lock(x.h)
       FROM (SELECT DISTINCT pg_catalog.hashtextextended(k, 1936487781) AS h
               FROM pg_catalog.unnest(p_keys) AS k ORDER BY 1) AS x;
    now_us := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
    CALL @schema@.sluice_load(p_keys, p_args, now_us, lp, la, lb, lc, sa, sp);
    wp := lp; wa := la; wb := lb; wc := lc;
    CALL @schema@.sluice_apply(p_args, windows, true, now_us, wp, wa, wb, wc, sa, sp, answer, allowed);
    CALL @schema@.sluice_write(p_keys, lp, la, lb, lc, wp, wa, wb, wc, sa, sp);
    RETURN answer;
END
$sluice$;

-- Forgets counters (and the slots of concurrency windows: their reservations stay
-- open, but hold no slot any more), under the same locks as decisions so a reset is
-- never undone by a decision that read the counter before it. Returns how many live
-- counters went (a concurrency window with live slots counts once).
CREATE OR REPLACE FUNCTION @schema@.sluice_reset(p_keys text[])
RETURNS bigint
LANGUAGE plpgsql
AS $sluice$
DECLARE
    now_us bigint;
    removed bigint;
    released bigint;
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(q.h)
       FROM (SELECT DISTINCT pg_catalog.hashtextextended(k, 1936487781) AS h
               FROM pg_catalog.unnest(p_keys) AS k ORDER BY 1) AS q;
    now_us := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
    WITH gone AS (
        DELETE FROM @schema@.sluice_counters AS t WHERE t.key = ANY (p_keys) RETURNING t.expires_at
    )
    SELECT pg_catalog.count(*) INTO removed FROM gone WHERE gone.expires_at > now_us;
    WITH gone AS (
        DELETE FROM @schema@.sluice_slots AS t WHERE t.key = ANY (p_keys) RETURNING t.key, t.expires_at
    )
    SELECT pg_catalog.count(DISTINCT gone.key) INTO released FROM gone WHERE gone.expires_at > now_us;
    RETURN removed + released;
END
$sluice$;

-- Deletes up to p_batch counters, up to p_batch slots and up to p_batch holds that
-- expired more than p_grace_us ago; returns how many rows went (p_batch or more: call
-- again), or -1 when another instance swept less than p_every_us ago (p_every_us = 0:
-- sweep regardless, to go on after a full batch).
-- Rows a decision or a settlement holds are skipped, so a sweep never waits for one
-- nor makes one wait long. Expired slots and holds count for nothing already (every
-- reader compares expires_at with its clock): the sweep only reclaims their space.
CREATE OR REPLACE FUNCTION @schema@.sluice_sweep(p_batch integer, p_grace_us bigint, p_every_us bigint)
RETURNS bigint
LANGUAGE plpgsql
AS $sluice$
DECLARE
    now_us bigint := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
    deleted bigint;
    more bigint;
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
    DELETE FROM @schema@.sluice_slots AS t
     WHERE (t.key, t.hold) IN (SELECT d.key, d.hold FROM @schema@.sluice_slots AS d
                                WHERE d.expires_at < now_us - p_grace_us
                                LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS more = ROW_COUNT;
    deleted := deleted + more;
    DELETE FROM @schema@.sluice_holds AS t
     WHERE t.id IN (SELECT d.id FROM @schema@.sluice_holds AS d
                     WHERE d.expires_at < now_us - p_grace_us
                     LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS more = ROW_COUNT;
    RETURN deleted + more;
END
$sluice$;

-- Moves counters by signed amounts, under the same advisory locks as decisions: the
-- engine's Window::refund when negative and Window::force when positive, as
-- Store::refund and Store::settle need them. A refund: gcra moves the tat back by cost
-- intervals, never before now; a fixed window's current count goes down; a sliding
-- window's current count, then its previous one; never below an empty counter, and an
-- absent or expired counter is left alone. A forced charge brings the state to now and
-- charges it whatever the limit says: a gcra tat up to 2^50 µs ahead of now (the
-- engine's MAX_DEBT_MICROS), window counts up to 2^61 (so that every sum of two, in
-- sluice_reserve, stays a bigint).
--   p_keys: the distinct counters moved; p_args: 6 values per window: slot (1-based
--   index into p_keys), algorithm (0 gcra, 1 fixed, 2 sliding; 3 concurrency is
--   skipped: its slots are not moved this way), capacity, period (µs; -1: a UTC
--   calendar month, fixed windows only), gcra interval (µs), amount; p_sign: 1
--   (amounts are signed changes) or -1 (amounts are refunds: minus each, negative ones
--   counting as 0). Returns the number of counters written.
CREATE OR REPLACE FUNCTION @schema@.sluice_move(p_keys text[], p_args bigint[], p_sign integer)
RETURNS bigint
LANGUAGE plpgsql
AS $sluice$
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_args, 1), 0) / 6;
    slots integer := coalesce(pg_catalog.array_length(p_keys, 1), 0);
    max_debt constant bigint := 1125899906842624;
    max_count constant bigint := 2305843009213693952;
    now_us bigint;
    wp boolean[]; wa bigint[]; wb bigint[]; wc bigint[]; sa bigint[]; sp bigint[];
    dirty boolean[];
    r record;
    i integer; o integer; s integer;
    alg bigint; period bigint; ivl bigint; delta bigint; cost bigint;
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
        period := p_args[o + 4]; ivl := GREATEST(p_args[o + 5], 1);
        -- A refund never charges, whatever it is given.
        IF p_sign < 0 THEN delta := -GREATEST(p_args[o + 6], 0); ELSE delta := p_args[o + 6]; END IF;
        sa[s] := alg; sp[s] := period;
        CONTINUE WHEN delta = 0 OR alg = 3;
        -- A fixed or sliding window's current start; a calendar month's for period -1.
        IF alg = 0 THEN ws := 0;
        ELSIF period < 0 THEN ws := @schema@.sluice_month_start(now_us, 0);
        ELSE ws := now_us - (now_us % period);
        END IF;
        IF delta < 0 THEN
            CONTINUE WHEN NOT wp[s];
            cost := -delta;
            IF alg = 0 THEN
                ca := GREATEST(wa[s], now_us);
                cb := GREATEST(ca - LEAST(cost, 9223372036854775807 / ivl) * ivl, now_us);
                IF cb <> ca THEN
                    wa[s] := cb; wb[s] := 0; wc[s] := 0; dirty[s] := true;
                END IF;
            ELSE
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
        ELSE
            cost := LEAST(delta, max_count);
            IF alg = 0 THEN
                IF wp[s] AND wa[s] > now_us THEN ca := wa[s]; ELSE ca := now_us; END IF;
                IF cost > max_debt / ivl THEN
                    ca := now_us + max_debt;
                ELSE
                    ca := LEAST(ca + cost * ivl, now_us + max_debt);
                END IF;
                wa[s] := ca; wb[s] := 0; wc[s] := 0;
            ELSE
                -- As in sluice_reserve, a later window's state is the current one.
                IF wp[s] AND wa[s] >= ws THEN
                    ca := wa[s]; cb := LEAST(wb[s], max_count); cc := wc[s];
                ELSIF alg = 2 AND wp[s] AND wa[s] = ws - period THEN
                    ca := ws; cb := 0; cc := wb[s];
                ELSE
                    ca := ws; cb := 0; cc := 0;
                END IF;
                IF alg = 1 THEN cc := 0; END IF;
                cb := CASE WHEN cost >= max_count - cb THEN max_count ELSE cb + cost END;
                wa[s] := ca; wb[s] := cb; wc[s] := cc;
            END IF;
            wp[s] := true; dirty[s] := true;
        END IF;
    END LOOP;
    FOR s IN 1 .. slots LOOP
        CONTINUE WHEN NOT dirty[s];
        INSERT INTO @schema@.sluice_counters AS t (key, a, b, c, expires_at)
             VALUES (p_keys[s], wa[s], wb[s], wc[s],
                     CASE WHEN sa[s] = 0 THEN wa[s]
                          WHEN sp[s] < 0 THEN @schema@.sluice_month_start(wa[s], 1)
                          WHEN sa[s] = 1 OR wb[s] = 0 THEN wa[s] + sp[s]
                          ELSE wa[s] + 2 * sp[s] END)
        ON CONFLICT (key) DO UPDATE
           SET a = excluded.a, b = excluded.b, c = excluded.c, expires_at = excluded.expires_at;
        written := written + 1;
    END LOOP;
    RETURN written;
END
$sluice$;

-- Gives back what an earlier decision charged (Store::refund): sluice_move by minus
-- each cost (p_args as there, the amount being the cost). Returns the number of
-- counters written.
CREATE OR REPLACE FUNCTION @schema@.sluice_refund(p_keys text[], p_args bigint[])
RETURNS bigint
LANGUAGE sql
AS $sluice$
SELECT @schema@.sluice_move(p_keys, p_args, -1)
$sluice$;

-- Settles a reservation (Store::settle; the engine's reservation::settle): moves every
-- charged window by its check's actual - estimate with sluice_move (a refund when
-- negative, a forced charge into debt when positive).
--   p_keys, p_args: as sluice_move's, the amount being the signed change.
--   p_slot_keys: the request's concurrency windows, whose slot the hold gives back.
--   p_hold, p_digest: the reservation; a NULL p_hold books the change unconditionally
--     (work already done, no reservation to check).
-- Returns 0: settled now; 1: settled before (nothing changed); 2: no open hold has this
-- id and digest (never made, expired, or forged; nothing changed).
--
-- The hold's row is locked first (FOR UPDATE: two settlements of one hold queue, and
-- the second finds it settled), then the counters' advisory locks in ascending hash
-- order as decisions take them. A reservation never waits for a hold's row while it
-- holds advisory locks (it only inserts new ones), so the two never wait on each other
-- in a cycle. Slots are deleted without their key's lock: a reservation counting them
-- meanwhile sees them until this commits, an over-count never an under-count.
CREATE OR REPLACE FUNCTION @schema@.sluice_settle(p_keys text[], p_args bigint[], p_slot_keys text[],
                                                  p_hold text, p_digest text)
RETURNS integer
LANGUAGE plpgsql
AS $sluice$
DECLARE
    now_us bigint;
    held record;
BEGIN
    IF p_hold IS NOT NULL THEN
        SELECT t.digest, t.expires_at, t.settled INTO held
          FROM @schema@.sluice_holds AS t WHERE t.id = p_hold FOR UPDATE;
        IF NOT FOUND THEN
            RETURN 2;
        END IF;
        now_us := (EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) * 1000000)::bigint;
        IF held.expires_at <= now_us OR held.digest <> p_digest THEN
            RETURN 2;
        END IF;
        IF held.settled THEN
            RETURN 1;
        END IF;
        UPDATE @schema@.sluice_holds AS t SET settled = true WHERE t.id = p_hold;
        IF coalesce(pg_catalog.cardinality(p_slot_keys), 0) > 0 THEN
            DELETE FROM @schema@.sluice_slots AS t WHERE t.key = ANY (p_slot_keys) AND t.hold = p_hold;
        END IF;
    END IF;
    PERFORM @schema@.sluice_move(p_keys, p_args, 1);
    RETURN 0;
END
$sluice$;

INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (1, 'counter table; sluice_decide, sluice_reset and sluice_sweep')
ON CONFLICT (version) DO NOTHING;
INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (2, 'sluice_refund')
ON CONFLICT (version) DO NOTHING;
INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (3, 'calendar-month windows (sluice_month_start, period -1); reservations: sluice_holds, sluice_slots, sluice_reserve, sluice_settle and sluice_move')
ON CONFLICT (version) DO NOTHING;
INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (4, 'runtime records: sluice_records, sluice_records_version')
ON CONFLICT (version) DO NOTHING;
INSERT INTO @schema@.sluice_migrations (version, description)
     VALUES (5, 'batched decisions: sluice_decide_batch, over sluice_load, sluice_apply and sluice_write')
ON CONFLICT (version) DO NOTHING;
