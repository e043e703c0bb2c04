//! The Redis counter store: counters shared by every sluice instance that points at
//! one Redis.
//!
//! # One round trip per decision, or less
//! A decision, whatever its number of checks and windows, is one `EVALSHA` of one Lua
//! script (`decide.lua`, loaded once per connection by [`redis::Script`], which loads it
//! again by itself when the server answers `NOSCRIPT`, e.g. after a restart). The
//! script reads the time from the Redis server (`TIME`), so instances with skewed
//! clocks agree, and runs the engine's arithmetic (`crates/engine/src/algorithm.rs`) and
//! its two-pass atomic rule (`sluice_engine::apply`): two checks on one counter see
//! each other, and a denied decision charges only `charge_denied` windows whose cost
//! could fit. Redis runs a script alone, so concurrent decisions never interleave.
//!
//! Concurrent decisions share round trips (see [`batch`]; in a cluster, decisions of
//! one slot): one arriving while two calls are in flight waits, and everything that waited goes
//! in one `EVALSHA` of a batch script that runs `decide.lua` for each request in turn;
//! a decision alone goes at once.
//!
//! # Keys and state
//! A counter lives at `{prefix}{{limit}:{key}}:{window}`, e.g.
//! `sluice:{chat:user:42}:g60` for the 60-second gcra window of limit `chat` on key
//! `user:42`, `...:f1mo` for a calendar-month window (the braces are a Redis Cluster
//! hash tag: every window of one check lives in one slot). Its value is a short string: gcra `"tat"`, fixed window `"start:count"`, sliding window
//! `"start:count:previous"` (microseconds and units of cost). Every write sets an
//! absolute expiry (`PXAT`) at the moment the state becomes indistinguishable from no
//! state (the engine's `expires_at`, rounded up to the millisecond), so a flood of
//! one-off keys leaves nothing behind once its windows have passed.
//!
//! A concurrency window (`concurrency: N`, window tag `c`, e.g. `sluice:{llm:user:42}:c`)
//! is a sorted set of the reservations holding its slots: member the reservation's id,
//! score its expiry (µs). Its state is counted from it (`open`: members scored after
//! now; `free_at`: the smallest such score); the set expires (`PEXPIREAT`) with its last
//! holder. A reservation's hold lives at `{prefix}{{limit}:{key}}:r:{id}`, in the slot of
//! the request's first check (in a cluster: of each part's first check, one copy per
//! part), with value `open:{digest}` until it is settled and `settled:{digest}` after,
//! expiring (`PXAT`) when the reservation does. `reset` and `reset_limit` remove
//! counters, concurrency sets included, and leave holds (as the memory store does).
//!
//! # Numbers
//! Lua numbers are doubles: times (about 2^50 µs today) and counts stay exact below
//! 2^53, and the two products that can exceed it (a sliding window's weighted count and
//! its retry time, quota × period) are computed exactly by long multiplication. Costs
//! are capped at a window's capacity + 1 before they are sent, which decides the same.
//! Debt stays exact too: a forced gcra TAT goes at most [`MAX_DEBT_MICROS`] (2^50 µs)
//! past now, as in the engine, and a forced count at most 2^50 (the engine's saturates
//! at 2^64; both deny until the window has passed). A settlement's moves and a hold's
//! ttl are capped at 2^50 before they are sent.
//!
//! # Refunds and reservations
//! `refund` runs a second small script (`settle.lua`, the engine's `Window::refund`) on
//! the charged windows: one round trip, never repeated.
//!
//! `reserve` is a decision by the same script (`decide.lua`) with a hold: when the
//! decision is allowed (and not a dry run), the script also records the hold and adds
//! it to every concurrency window it charged. A plain decision only reads concurrency
//! windows. One round trip. `settle` is one run of `settle.lua`: with a hold, it checks
//! the hold is open with the same digest (else it answers `Unknown`, or
//! `AlreadySettled`, and moves nothing), marks it settled (keeping its expiry), moves
//! every window the reservation charged by `actual - estimate` (`Window::refund` when
//! less, `Window::force` when more) and takes the reservation out of every concurrency
//! window; without a hold, it moves the windows unconditionally. One round trip (none
//! for a settlement without a hold that moves nothing). Neither is ever repeated after
//! a possible send.
//!
//! # Local deny cache
//! With [`RedisStoreConfig::local_deny_cache`] (the default), a decision Redis denied is
//! answered again by this process, without a round trip, until the first instant it
//! could be allowed; every give-back (a refund, a settlement, a reset, on any instance)
//! is published from its script on `{prefix}deny-cache`, and every instance subscribed
//! there drops what it names. Off while the subscription is down; never for
//! `charge_denied` limits or reservations. See [`deny_cache`].
//!
//! # Connection
//! One multiplexed connection serves every decision (see [`connection`]); it
//! reconnects by itself. A call that charges (a decision, a reservation, a refund, a
//! settlement) is never repeated after a dropped connection or a timeout (it may have
//! run); dry runs, resets and pings are retried once. `timeout` bounds every command and
//! every connection attempt.
//!
//! With `sentinel`, the primary is the server Redis Sentinel names, asked again after a
//! command fails as a failover makes it fail (see [`connection`]). `rediss://` URLs use
//! TLS (rustls), with the certificates of [`TlsSettings`] when given.
//!
//! # Redis Cluster
//! With `cluster`, a decision whose checks live in several slots runs one script per
//! slot, concurrently, and a decision denied by one slot gives back what the others
//! charged (`settle.lua`): see [`slots`] for how and what it costs. A reservation
//! records its hold in every slot that allowed, and a denied one releases those copies
//! and their concurrency slots with the give-back; a settlement runs one script per
//! slot, each checking its own copy. Across slots, neither is atomic: a settlement may
//! land in one slot and fail in another (the error is returned; settling again settles
//! only what is still open).

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use sluice_engine::{
    Algorithm, Check, DecisionRequest, Hold, Limit, LimitWindow, MAX_DEBT_MICROS, Micros, Outcomes,
    Rate, Record, Records, SettleStatus, Settlement, Store, StoreError, StoreFuture, StoreStats,
    WindowOutcome,
};

mod batch;
mod connection;
mod deny_cache;
mod records;
mod slots;

use connection::{Connection, Connections};
use deny_cache::{DenyCache, RequestKey};
use slots::{Part, PartReply};

/// The decision script; see the module doc.
const DECIDE_LUA: &str = concat!(include_str!("state.lua"), include_str!("decide.lua"));

/// The settle script: moves counters by signed amounts. It gives back what a decision
/// charged (`Store::refund`, and a cluster decision that another slot denied; see
/// [`slots`]), settles a reservation (`Store::settle`), and releases one another slot
/// denied.
const SETTLE_LUA: &str = concat!(
    include_str!("state.lua"),
    include_str!("announce.lua"),
    include_str!("settle.lua")
);

/// The reset script: removes one check's counters and announces it to the deny caches.
const RESET_LUA: &str = concat!(include_str!("announce.lua"), include_str!("reset.lua"));

/// The batch script: `decide.lua` as a function of its KEYS and ARGV, run once per
/// request of a batch (see [`batch`]).
const BATCH_LUA: &str = concat!(
    include_str!("state.lua"),
    "local function decide_one(KEYS, ARGV)\n",
    include_str!("decide.lua"),
    "\nend\n",
    include_str!("batch.lua")
);

/// The period sent for a calendar-month window (`N/month`): the scripts find the
/// month's bounds on the server's clock (`window_start` and `window_end` in `state.lua`).
const CALENDAR_MONTH: i64 = -1;

/// How many keys one `SCAN` step asks for and one `UNLINK` removes.
const SCAN_BATCH: usize = 500;

/// Every command the store sends and its scripts run, as Redis ACL rules: a
/// least-privilege user is
/// `ACL SETUSER sluice on >PASSWORD resetkeys ~sluice:* resetchannels &sluice:* -@all`
/// followed by these (`~` and `&` + the configured prefix + `*`: the deny cache's channel
/// is `{prefix}deny-cache`). `ping` (readiness), `evalsha` and
/// `script|load` (the scripts), `scan` and `unlink` (resets), `time` and the key
/// commands the scripts call, `role` (a primary found through Sentinel is checked with
/// it), `cluster|slots` and `cluster|nodes` (a Redis Cluster's layout, and the primaries
/// a limit's reset scans). README's Redis section prints the whole line; a test runs the
/// semantic suite as such a user. `publish` and `subscribe` are the deny cache's (see
/// [`RedisStoreConfig::local_deny_cache`]); without them, or without the channel, the
/// cache stays off and everything else works.
pub const ACL_COMMANDS: &str = "+ping +evalsha +script|load +scan +unlink +time +get +set +del +pexpireat +zadd +zcount +zrange +zrangebyscore +zrem +zremrangebyscore +hset +hdel +hgetall +incr +role +cluster|slots +cluster|nodes +publish +subscribe";

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. With `cluster`,
    /// one node of the cluster. With `sentinel`, the credentials, database and TLS of the
    /// primary (its host is the service's name and is not dialled); may be empty there.
    pub url: String,
    /// The URLs name nodes of a Redis Cluster: `url` and `cluster_seeds` are where the
    /// client first learns the cluster's layout. Default false.
    pub cluster: bool,
    /// More cluster nodes to learn the layout from, when `url`'s node is down.
    pub cluster_seeds: Vec<String>,
    /// Find the primary through Redis Sentinel, and follow it across failovers.
    pub sentinel: Option<SentinelSettings>,
    /// Certificates for `rediss://` connections; without, the system's trusted CAs and no
    /// client certificate.
    pub tls: Option<TlsSettings>,
    /// Prepended to every key, so deployments can share one Redis. Default `sluice:`.
    pub prefix: String,
    /// How long one command (or one connection attempt) may take. Default 200 ms.
    pub timeout: Duration,
    /// Answer a decision Redis denied again from this process, without a round trip,
    /// until it could first be allowed; refunds, settlements and resets on any instance
    /// drop it (see the crate doc, "Local deny cache"). Default true.
    pub local_deny_cache: bool,
}

/// Where Redis Sentinel is and which service it watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelSettings {
    /// The service's name, as `sentinel monitor <name> ...` gives it.
    pub master: String,
    /// The sentinels' URLs (`redis://[user:password@]host:26379`, or `rediss://`), at
    /// least one.
    pub nodes: Vec<String>,
}

/// PEM text for TLS connections. Never shown by `Debug` (the key is a secret).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// The CAs that may sign the server's certificate, instead of the system's.
    pub ca: Option<Vec<u8>>,
    /// A client certificate (chain) and its private key, for servers that ask for one
    /// (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca", &self.ca.as_ref().map(|_| "[pem]"))
            .field("client", &self.client.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl TlsSettings {
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

impl RedisStoreConfig {
    /// Settings for one server with the default prefix and timeout.
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreConfig {
            url: url.into(),
            cluster: false,
            cluster_seeds: Vec::new(),
            sentinel: None,
            tls: None,
            prefix: "sluice:".to_string(),
            timeout: Duration::from_millis(200),
            local_deny_cache: true,
        }
    }

    /// Settings for a Redis Cluster known by these nodes (at least one).
    pub fn cluster(seeds: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let mut seeds: Vec<String> = seeds.into_iter().map(Into::into).collect();
        let url = if seeds.is_empty() {
            String::new()
        } else {
            seeds.remove(0)
        };
        RedisStoreConfig {
            cluster: true,
            cluster_seeds: seeds,
            ..RedisStoreConfig::new(url)
        }
    }

    /// Settings for the primary of service `master`, found through these sentinels.
    pub fn sentinel(
        master: impl Into<String>,
        nodes: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        RedisStoreConfig {
            sentinel: Some(SentinelSettings {
                master: master.into(),
                nodes: nodes.into_iter().map(Into::into).collect(),
            }),
            ..RedisStoreConfig::new("")
        }
    }
}

/// Why a [`RedisStore`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The URL is not a Redis URL.
    #[error("storage.url {url:?} is not a Redis URL ({source}); write it as redis://host:6379")]
    BadUrl {
        /// The URL as given (passwords included: do not log it).
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// The TLS settings cannot be used (unreadable PEM, TLS settings on a plain URL).
    #[error("storage.tls: {0}")]
    BadTls(String),
    /// Redis did not answer.
    #[error("cannot reach Redis at {address}: {source}")]
    Unreachable {
        /// host:port, without credentials.
        address: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// The TLS handshake failed: the server's certificate is not signed by a trusted CA
    /// or not for this host, or the server refused sluice's client certificate.
    #[error(
        "TLS with Redis at {address} failed: {reason}. Check storage.tls.ca_file (the CA that signed the server's certificate), that the URL's host is a name or IP the certificate holds, and storage.tls.cert_file/key_file when the server asks for a client certificate"
    )]
    Tls {
        /// host:port.
        address: String,
        /// What the TLS layer said.
        reason: String,
    },
    /// Redis answered but refused sluice's user, password or commands.
    #[error(
        "Redis at {address} refused sluice: {source}. Check the user and password in storage.url, and that the user may run the commands in README's ACL line"
    )]
    Refused {
        /// host:port.
        address: String,
        /// What the server said.
        source: redis::RedisError,
    },
}

impl RedisStoreError {
    /// Whether the error is a setting to fix rather than a server that is down: a bad URL
    /// or TLS setting, a certificate that fails, credentials or permissions refused.
    /// Starting anyway would decide by `on_error` until someone notices.
    pub fn is_misconfiguration(&self) -> bool {
        !matches!(self, RedisStoreError::Unreachable { .. })
    }

    /// An error of the first command, sorted into what it says.
    fn at_start(address: &str, source: redis::RedisError) -> Self {
        let address = address.to_string();
        if let Some(reason) = tls_failure(&source) {
            return RedisStoreError::Tls { address, reason };
        }
        let refused = source.kind() == redis::ErrorKind::AuthenticationFailed
            || source
                .code()
                .is_some_and(|code| matches!(code, "NOPERM" | "NOAUTH" | "WRONGPASS"));
        if refused {
            RedisStoreError::Refused { address, source }
        } else {
            RedisStoreError::Unreachable { address, source }
        }
    }
}

/// The TLS layer's complaint in `error`, if the handshake is what failed.
fn tls_failure(error: &redis::RedisError) -> Option<String> {
    // rustls's error reaches here inside an io::Error inside the client's error; its
    // words are the most stable handle on it.
    let text = error.to_string();
    let marks = [
        "invalid peer certificate",
        "received fatal alert",
        "InvalidCertificate",
        "peer is incompatible",
        "corrupt message",
        "invalid dnsname",
    ];
    marks.iter().any(|mark| text.contains(mark)).then_some(text)
}

/// A [`Store`] on one Redis server or a Redis Cluster. Cheap to share behind an `Arc`.
pub struct RedisStore {
    connections: Connections,
    /// Shares round trips between concurrent decisions (per slot in a cluster).
    batcher: batch::Batcher,
    decide_script: redis::Script,
    settle_script: redis::Script,
    reset_script: redis::Script,
    prefix: String,
    address: String,
    /// The local deny cache, when configured; on only while subscribed.
    deny_cache: Option<std::sync::Arc<DenyCache>>,
    /// Where give-backs are announced (`{prefix}deny-cache`).
    channel: String,
    /// The task keeping the deny cache subscribed, stopped with the store.
    follower: Option<tokio::task::AbortHandle>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.abort();
        }
    }
}

impl RedisStore {
    /// Connects now and fails when Redis does not answer.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self, RedisStoreError> {
        let store = Self::lazy(config)?;
        let mut connection = store.connections.get();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|source| RedisStoreError::at_start(&store.address, source))?;
        Ok(store)
    }

    /// A store that connects on first use (and reconnects whenever needed): for a
    /// server that should start even while Redis is down. Must be called inside a
    /// Tokio runtime.
    pub fn lazy(config: RedisStoreConfig) -> Result<Self, RedisStoreError> {
        if config.tls.is_some() || config.url.starts_with("rediss://") {
            // rustls needs a process-wide crypto provider; ring is the one ureq already
            // brings (an error only says one is installed).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let (connections, address) = if let Some(sentinel) = &config.sentinel {
            sentinel_connections(&config, sentinel)?
        } else if config.cluster {
            cluster_connections(&config)?
        } else {
            single_connection(&config)?
        };
        let channel = deny_cache::channel(&config.prefix);
        let (deny_cache, follower) = if config.local_deny_cache {
            let cache = std::sync::Arc::new(DenyCache::new());
            let source = subscription_source(&config, &connections)?;
            let task = tokio::spawn(deny_cache::follow(
                std::sync::Arc::clone(&cache),
                source,
                channel.clone(),
                config.timeout,
            ));
            (Some(cache), Some(task.abort_handle()))
        } else {
            (None, None)
        };
        let batcher = batch::Batcher::new(
            connections.clone(),
            redis::Script::new(DECIDE_LUA),
            redis::Script::new(BATCH_LUA),
            address.clone(),
        );
        Ok(RedisStore {
            connections,
            batcher,
            decide_script: redis::Script::new(DECIDE_LUA),
            settle_script: redis::Script::new(SETTLE_LUA),
            reset_script: redis::Script::new(RESET_LUA),
            prefix: config.prefix,
            address,
            deny_cache,
            channel,
            follower,
        })
    }

    /// `host:port` of the server (with a cluster: of the first seed node), without
    /// credentials.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the local deny cache is on: configured, and subscribed to the give-backs
    /// of every instance (off while the subscription is down).
    pub fn local_deny_cache_on(&self) -> bool {
        self.deny_cache.as_ref().is_some_and(|cache| cache.is_up())
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.connections.is_cluster()
    }

    /// The Redis key of one window of a check: `{prefix}{{limit}:{key}}:{window}`.
    pub fn key(&self, window: &LimitWindow, key: &str) -> String {
        // `counter` is `limit:window`; limit names have no `:`, window tags neither.
        let (limit, tag) = window
            .counter
            .rsplit_once(':')
            .unwrap_or((&window.counter, ""));
        self.tagged(limit, key, tag)
    }

    /// The Redis key of a reservation's hold, in the slot of `check`'s counters:
    /// `{prefix}{{limit}:{key}}:r:{id}` (no window tag has a `:`, so it is no counter's).
    fn hold_key(&self, check: &Check, id: &str) -> String {
        let mut tail = String::with_capacity(id.len() + 2);
        tail.push_str("r:");
        tail.push_str(id);
        self.tagged(check.limit().name(), check.key(), &tail)
    }

    /// `{prefix}{{limit}:{key}}:{tail}`: the braces are the Redis Cluster hash tag.
    fn tagged(&self, limit: &str, key: &str, tail: &str) -> String {
        let mut k =
            String::with_capacity(self.prefix.len() + limit.len() + key.len() + tail.len() + 4);
        k.push_str(&self.prefix);
        k.push('{');
        k.push_str(limit);
        k.push(':');
        k.push_str(key);
        k.push_str("}:");
        k.push_str(tail);
        k
    }

    /// The request's windows grouped into script calls: one part on a single server, one
    /// per slot in a cluster (see [`slots`]).
    fn parts(&self, windows: &[(&Check, &LimitWindow)]) -> Vec<Part> {
        let cluster = self.is_cluster();
        slots::split(
            windows,
            |lw, key| self.key(lw, key),
            |key| cluster.then(|| Slot::for_key(key)),
        )
    }

    /// Runs `op` on the shared connection, once more if the first attempt found the
    /// connection dropped (the manager reconnects in between). Only for calls that are
    /// safe to repeat: see [`RedisStore::once`].
    async fn with_retry<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.attempt(op, true).await
    }

    /// Runs `op` once (again only when the connection was refused, so nothing was
    /// sent). A call that charges must not be repeated: when the connection drops or
    /// times out, the script may already have run, and a second run would charge twice. The failure goes to the `on_error` policy instead, and the next
    /// decision finds the reconnected connection.
    async fn once<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.attempt(op, false).await
    }

    async fn attempt<T, F, Fut>(&self, op: F, may_retry: bool) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match op(self.connections.get()).await {
            Ok(value) => Ok(value),
            // A refused connection never carried the command, so even a charging call may
            // go again (the manager has reconnected by then).
            Err(error) if (may_retry && retryable(&error)) || error.is_connection_refusal() => {
                op(self.connections.get())
                    .await
                    .map_err(|e| store_error(&self.address, e))
            }
            Err(error) => Err(store_error(&self.address, error)),
        }
    }

    /// Runs the decision script for one part of a decision; with `hold` (a reservation,
    /// not a dry run), the part records its copy of the hold when it allows.
    async fn decide_part(
        &self,
        windows: &[(&Check, &LimitWindow)],
        part: &Part,
        dry_run: bool,
        hold: Option<&HoldArgs<'_>>,
    ) -> Result<PartReply, StoreError> {
        let mut keys = part.keys.clone();
        if let Some(hold) = hold {
            keys.push(self.part_hold_key(windows, part, hold));
        }
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + 7 * part.windows.len() + 3);
        fn push<T: redis::ToRedisArgs>(args: &mut Vec<Vec<u8>>, value: T) {
            args.extend(value.to_redis_args());
        }
        push(&mut args, if dry_run { "1" } else { "0" });
        push(&mut args, part.windows.len());
        for &(index, key_index) in &part.windows {
            let (check, lw) = windows[index];
            let window = WindowArgs::new(check, lw);
            push(&mut args, key_index);
            push(&mut args, window.tag);
            push(&mut args, window.capacity);
            push(&mut args, window.period);
            push(&mut args, window.interval);
            push(&mut args, window.cost);
            push(&mut args, window.flags);
        }
        if let Some(hold) = hold {
            push(&mut args, &hold.id);
            push(&mut args, hold.digest);
            push(&mut args, hold.ttl);
        }
        let reply: Vec<i64> = match (dry_run, hold) {
            // The hot path: a plain decision may share its round trip with others.
            (false, None) => self.batcher.decide(batch::Call { keys, args }).await?,
            _ => {
                let mut invocation = self.decide_script.prepare_invoke();
                for key in &keys {
                    invocation.key(key);
                }
                for arg in &args {
                    invocation.arg(arg.as_slice());
                }
                let run = |mut connection: Connection| {
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut connection).await }
                };
                // A dry run charges nothing, so it may be repeated; a real decision may not.
                if dry_run {
                    self.with_retry(run).await?
                } else {
                    self.once(run).await?
                }
            }
        };
        parse_reply(&reply, part.windows.len())
    }

    /// The key of `part`'s copy of a hold: in the slot of the part's first check.
    fn part_hold_key(
        &self,
        windows: &[(&Check, &LimitWindow)],
        part: &Part,
        hold: &HoldArgs<'_>,
    ) -> String {
        // A part has at least one window (`slots::split` makes none empty).
        let first = part.windows.first().map_or(0, |&(index, _)| index);
        self.hold_key(windows[first].0, &hold.id)
    }

    /// Runs the settle script for one part: moves the listed windows (indexes into
    /// `part.windows`, with signed amounts) and, with a hold, checks or forgets the
    /// part's copy of it and frees its slot in every concurrency window of the part.
    async fn settle_part(
        &self,
        windows: &[(&Check, &LimitWindow)],
        part: &Part,
        moves: &[(usize, i64)],
        hold: HoldMode<'_, '_>,
    ) -> Result<SettleStatus, StoreError> {
        let (mode, held) = match hold {
            HoldMode::Unconditional => ("", None),
            HoldMode::Settle(hold) => ("settle", Some(hold)),
            HoldMode::Release(hold) => ("release", Some(hold)),
        };
        let is_concurrency =
            |k: usize| windows[part.windows[k].0].1.window.algorithm() == Algorithm::Concurrency;
        // Rate windows move by their amount; concurrency windows only give a hold's slot
        // back (the engine never charges or refunds them).
        let mut listed: Vec<(usize, i64)> = moves
            .iter()
            .copied()
            .filter(|&(k, amount)| amount != 0 && !is_concurrency(k))
            .collect();
        if held.is_some() {
            listed.extend(
                (0..part.windows.len())
                    .filter(|&k| is_concurrency(k))
                    .map(|k| (k, 0)),
            );
        }
        let mut invocation = self.settle_script.prepare_invoke();
        for key in &part.keys {
            invocation.key(key);
        }
        match held {
            Some(hold) => {
                invocation
                    .key(self.part_hold_key(windows, part, hold))
                    .arg(mode)
                    .arg(&hold.id)
                    .arg(hold.digest);
            }
            None => {
                invocation.arg(mode).arg("").arg("");
            }
        }
        invocation.arg(listed.len());
        for &(k, amount) in &listed {
            let (index, key_index) = part.windows[k];
            let window = &windows[index].1.window;
            let period = script_period(window.rate());
            invocation
                .arg(key_index)
                .arg(algorithm_tag(window.algorithm()))
                .arg(window.capacity())
                .arg(period)
                .arg(window.rate().period_micros() / window.rate().quota() as i64)
                .arg(amount);
        }
        invocation.arg(&self.channel);
        // Not repeated: a refund or a settlement without a hold that ran twice would move
        // twice.
        let status = self
            .once(|mut connection| {
                let invocation = &invocation;
                async move { invocation.invoke_async::<i64>(&mut connection).await }
            })
            .await;
        // What may admit sooner now leaves this instance's deny cache at once (the script's
        // message does the same on every instance, this one included); also after a
        // failure, as the script may have run.
        if listed.iter().any(|&(_, amount)| amount < 0) || held.is_some() {
            self.forget(part.keys.iter().map(String::as_str));
        }
        match status? {
            1 => Ok(SettleStatus::Settled),
            2 => Ok(SettleStatus::AlreadySettled),
            3 => Ok(SettleStatus::Unknown),
            other => Err(StoreError::Protocol(format!(
                "the settle script answered {other}"
            ))),
        }
    }

    /// Gives back the listed windows of one part (indexes into `part.windows`) what
    /// their check cost, and releases a reservation's hold in that part.
    async fn give_back(
        &self,
        windows: &[(&Check, &LimitWindow)],
        part: &Part,
        which: &[usize],
        hold: Option<&HoldArgs<'_>>,
    ) -> Result<(), StoreError> {
        let moves: Vec<(usize, i64)> = which
            .iter()
            .map(|&k| {
                let (check, lw) = windows[part.windows[k].0];
                // More than the capacity was never charged in one decision.
                (k, -(check.cost().min(lw.window.capacity()) as i64))
            })
            .collect();
        let hold = hold.map_or(HoldMode::Unconditional, HoldMode::Release);
        self.settle_part(windows, part, &moves, hold)
            .await
            .map(|_| ())
    }

    /// Decides `request` with the local deny cache: a denial it holds is answered from
    /// it; a denial Redis answers is put in it (see [`deny_cache`]). Reservations never
    /// use it.
    async fn decide_cached(&self, request: &DecisionRequest) -> Result<Outcomes, StoreError> {
        let Some(cache) = self.deny_cache.as_deref() else {
            return self.decide_inner(request, None).await;
        };
        // Taken before anything is sent: the entry's time counts from here, and a
        // give-back announced meanwhile keeps the answer out of the cache.
        let Some(ticket) = cache.ticket() else {
            return self.decide_inner(request, None).await;
        };
        let mut key = None;
        if cache.has_entries() {
            let built = self.request_key(request);
            if let Some(windows) = cache.lookup(&built.bytes) {
                return Ok(Outcomes {
                    windows,
                    degraded: false,
                });
            }
            key = Some(built);
        }
        let outcomes = self.decide_inner(request, None).await?;
        if deny_cache::denied_for(request, &outcomes.windows).is_some() {
            let key = key.unwrap_or_else(|| self.request_key(request));
            cache.insert(request, key, &outcomes.windows, ticket);
        }
        Ok(outcomes)
    }

    /// The deny cache's key of `request`: every window's counter and script arguments.
    fn request_key(&self, request: &DecisionRequest) -> RequestKey {
        RequestKey::new(request.windows().map(|(check, lw)| {
            let w = WindowArgs::new(check, lw);
            (
                self.key(lw, check.key()),
                w.tag,
                [
                    w.capacity as i64,
                    w.period,
                    w.interval,
                    w.cost as i64,
                    i64::from(w.flags),
                ],
            )
        }))
    }

    /// Drops this instance's deny-cache entries reading `counters` (after a give-back).
    fn forget<'a>(&self, counters: impl IntoIterator<Item = &'a str>) {
        if let Some(cache) = &self.deny_cache {
            cache.invalidate(counters);
        }
    }

    /// Decides `request`; with `hold`, reserves it (see [`Store::reserve`]).
    async fn decide_inner(
        &self,
        request: &DecisionRequest,
        hold: Option<&HoldArgs<'_>>,
    ) -> Result<Outcomes, StoreError> {
        let windows: Vec<(&Check, &LimitWindow)> = request.windows().collect();
        let parts = self.parts(&windows);
        // A dry run holds nothing.
        let hold = hold.filter(|_| !request.dry_run);
        if let [part] = parts.as_slice() {
            // One script decides everything: its answer is the decision.
            let reply = self
                .decide_part(&windows, part, request.dry_run, hold)
                .await?;
            return Ok(Outcomes {
                windows: reply.outcomes.into_iter().collect(),
                degraded: false,
            });
        }
        let answers = futures_util::future::join_all(
            parts
                .iter()
                .map(|part| self.decide_part(&windows, part, request.dry_run, hold)),
        )
        .await;
        if answers.iter().any(Result::is_err) {
            // The decision goes to the on_error policy: what the other parts charged
            // (and held) must not stay behind.
            self.give_back_everything(&windows, &parts, &answers, request.dry_run, hold)
                .await;
            let error = answers.into_iter().find_map(Result::err);
            return Err(error.unwrap_or(StoreError::Protocol(
                "a decision part failed without an error".into(),
            )));
        }
        let replies: Vec<PartReply> = answers.into_iter().filter_map(Result::ok).collect();
        let (outcomes, refunds) = slots::combine(&windows, &parts, &replies, request.dry_run);
        let given_back = futures_util::future::join_all(
            refunds
                .iter()
                // Without a hold, a part with nothing to give back has nothing to do.
                .filter(|refund| hold.is_some() || !refund.windows.is_empty())
                .map(|refund| self.give_back(&windows, &parts[refund.part], &refund.windows, hold)),
        )
        .await;
        for error in given_back.into_iter().filter_map(Result::err) {
            // The decision stands (denied); the charge stays until its window ends, a
            // hold and its slots until the hold expires.
            tracing::warn!(%error, "a denied cluster decision could not give back its charge; it expires with its window");
        }
        Ok(Outcomes {
            windows: outcomes,
            degraded: false,
        })
    }

    /// After a failed part: gives back every charge the other parts made, and releases
    /// the hold where they recorded it.
    async fn give_back_everything(
        &self,
        windows: &[(&Check, &LimitWindow)],
        parts: &[Part],
        answers: &[Result<PartReply, StoreError>],
        dry_run: bool,
        hold: Option<&HoldArgs<'_>>,
    ) {
        if dry_run {
            return;
        }
        for (part, answer) in parts.iter().zip(answers) {
            let Ok(reply) = answer else { continue };
            let charged = slots::charged(windows, part, reply);
            let held = hold.filter(|_| slots::part_allows(windows, part, reply));
            if (!charged.is_empty() || held.is_some())
                && let Err(error) = self.give_back(windows, part, &charged, held).await
            {
                tracing::warn!(%error, "a failed cluster decision could not give back its charge; it expires with its window");
            }
        }
    }

    async fn refund_inner(
        &self,
        request: &DecisionRequest,
        charged: &[bool],
    ) -> Result<(), StoreError> {
        let windows: Vec<(&Check, &LimitWindow)> = request.windows().collect();
        let parts = self.parts(&windows);
        // One script per part (one part on a single server), each giving back its
        // charged windows.
        let windows = &windows;
        let results = futures_util::future::join_all(parts.iter().filter_map(|part| {
            let which: Vec<usize> = part
                .windows
                .iter()
                .enumerate()
                .filter(|&(_, &(index, _))| charged.get(index).copied().unwrap_or(false))
                .map(|(k, _)| k)
                .collect();
            (!which.is_empty())
                .then_some(async move { self.give_back(windows, part, &which, None).await })
        }))
        .await;
        results.into_iter().collect()
    }

    async fn settle_inner(&self, settlement: &Settlement) -> Result<SettleStatus, StoreError> {
        if !settlement.is_well_formed() {
            return Ok(SettleStatus::Unknown);
        }
        let hold = match &settlement.hold {
            None => None,
            Some(hold) => match HoldArgs::new(&hold.id, &hold.digest, 0) {
                Some(args) => Some(args),
                // Not an id a reservation of this store could have.
                None => return Ok(SettleStatus::Unknown),
            },
        };
        let windows: Vec<(&Check, &LimitWindow)> = settlement.request.windows().collect();
        let amounts = amounts(settlement);
        let parts = self.parts(&windows);
        let (windows, hold) = (&windows, &hold);
        // One script per part: each checks its own copy of the hold. Without a hold, only
        // parts with something to move.
        let statuses = futures_util::future::join_all(parts.iter().filter_map(|part| {
            let moves: Vec<(usize, i64)> = part
                .windows
                .iter()
                .enumerate()
                .map(|(k, &(index, _))| (k, amounts[index]))
                .filter(|&(_, amount)| amount != 0)
                .collect();
            let mode = hold
                .as_ref()
                .map_or(HoldMode::Unconditional, HoldMode::Settle);
            (hold.is_some() || !moves.is_empty())
                .then_some(async move { self.settle_part(windows, part, &moves, mode).await })
        }))
        .await;
        let mut answer = if hold.is_some() {
            SettleStatus::Unknown
        } else {
            SettleStatus::Settled
        };
        for status in statuses {
            // Across slots: settled if any part settled now, else settled before if any
            // part was.
            answer = match (answer, status?) {
                (SettleStatus::Settled, _) | (_, SettleStatus::Settled) => SettleStatus::Settled,
                (SettleStatus::AlreadySettled, _) | (_, SettleStatus::AlreadySettled) => {
                    SettleStatus::AlreadySettled
                }
                _ => SettleStatus::Unknown,
            };
        }
        Ok(answer)
    }

    /// Tells every deny cache (this one at once) that counters under `prefix` are gone.
    /// A failed announcement is logged: the keys are gone either way.
    async fn announce_prefix(&self, prefix: &str) {
        if let Some(cache) = &self.deny_cache {
            cache.invalidate_prefix(prefix);
        }
        let payload = deny_cache::Message::prefix_payload(prefix);
        let published = self
            .with_retry(|mut connection| {
                let payload = &payload;
                async move {
                    redis::cmd("PUBLISH")
                        .arg(&self.channel)
                        .arg(payload)
                        .query_async::<i64>(&mut connection)
                        .await
                }
            })
            .await;
        if let Err(error) = published {
            tracing::warn!(%error, "a reset could not be announced to the deny caches of other instances; their entries end with their retry times");
        }
    }

    /// Removes one check's counters with the reset script, which announces it to every
    /// deny cache; forgets them here too.
    async fn reset_counters(&self, keys: Vec<String>) -> Result<(), StoreError> {
        let answer = self
            .with_retry(|mut connection| {
                let mut invocation = self.reset_script.prepare_invoke();
                for key in &keys {
                    invocation.key(key);
                }
                invocation.arg(&self.channel);
                async move { invocation.invoke_async::<i64>(&mut connection).await }
            })
            .await;
        self.forget(keys.iter().map(String::as_str));
        answer.map(|_| ())
    }

    async fn unlink(&self, keys: Vec<String>) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // In a cluster the client splits a multi-slot UNLINK per node and sums.
        self.with_retry(|mut connection| {
            let keys = &keys;
            async move {
                redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async(&mut connection)
                    .await
            }
        })
        .await
    }

    /// The `host:port` of every primary node: the one server, or each cluster master.
    async fn primaries(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        let Connections::Cluster(cluster) = &self.connections else {
            return Ok(vec![None]);
        };
        let nodes: String = self
            .with_retry(|_| {
                let mut cluster = cluster.clone();
                async move {
                    let value = cluster
                        .route_command(
                            redis::cmd("CLUSTER").arg("NODES").clone(),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                        )
                        .await?;
                    Ok(redis::from_redis_value(value)?)
                }
            })
            .await?;
        Ok(nodes
            .lines()
            .filter(|line| {
                line.split(' ')
                    .nth(2)
                    .is_some_and(|flags| flags.split(',').any(|f| f == "master"))
            })
            .filter_map(|line| {
                // `<id> <ip:port@cport[,hostname]> <flags> ...`
                let address = line.split(' ').nth(1)?.split(['@', ',']).next()?;
                let (host, port) = address.rsplit_once(':')?;
                Some((host.to_string(), port.parse().ok()?))
            })
            .map(Some)
            .collect())
    }

    /// One `SCAN` step on one primary (any node on a single server).
    async fn scan_step(
        &self,
        node: &Option<(String, u16)>,
        cursor: u64,
        pattern: &str,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH);
        self.with_retry(|connection| {
            let scan = &scan;
            async move {
                match (connection, node) {
                    (Connection::Cluster(mut cluster), Some((host, port))) => {
                        let value = cluster
                            .route_command(
                                scan.clone(),
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                }),
                            )
                            .await?;
                        Ok(redis::from_redis_value(value)?)
                    }
                    (mut connection, _) => scan.query_async(&mut connection).await,
                }
            }
        })
        .await
    }

    async fn reset_limit_inner(&self, limit: &Limit) -> Result<u64, StoreError> {
        // Every key of the limit starts with `{prefix}{{limit}:`.
        let limit_prefix = format!("{}{{{}:", self.prefix, limit.name());
        let pattern = format!("{}*", glob_escape(&limit_prefix));
        let mut removed = 0;
        for node in self.primaries().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, mut keys) = self.scan_step(&node, cursor, &pattern).await?;
                // Holds are not counters: they stay, so open reservations still settle
                // (as in the memory store).
                keys.retain(|key| !is_hold_key(key));
                let unlinked = self.unlink(keys).await;
                if unlinked.as_ref().is_ok_and(|&n| n > 0) || unlinked.is_err() {
                    // Counters of the limit are gone (or may be): every deny cache forgets
                    // the limit. A separate command, as these keys span slots in a cluster.
                    self.announce_prefix(&limit_prefix).await;
                }
                removed += unlinked?;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }
}

fn bad_url(url: &str) -> impl FnOnce(redis::RedisError) -> RedisStoreError {
    let url = url.to_string();
    move |source| RedisStoreError::BadUrl { url, source }
}

/// `url` as the client reads it, with `tls`'s certificates when it is a `rediss://` URL.
/// TLS settings on a plain URL are refused: they would silently not be used.
fn client_info(url: &str, tls: Option<&TlsSettings>) -> Result<redis::Client, RedisStoreError> {
    let client = redis::Client::open(url).map_err(bad_url(url))?;
    let Some(tls) = tls else {
        return Ok(client);
    };
    if !matches!(
        client.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    ) {
        return Err(RedisStoreError::BadTls(
            "certificates are set but the URL is not rediss://: write rediss:// so they are used (a redis:// URL would talk in the clear)".into(),
        ));
    }
    redis::Client::build_with_tls(url, tls.certificates())
        .map_err(|error| RedisStoreError::BadTls(error.to_string()))
}

/// One server: one multiplexed connection, reconnected by itself.
fn single_connection(config: &RedisStoreConfig) -> Result<(Connections, String), RedisStoreError> {
    let client = client_info(&config.url, config.tls.as_ref())?;
    let address = client.get_connection_info().addr().to_string();
    let manager = ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.timeout))
        .set_connection_timeout(Some(config.timeout))
        // Reconnect attempts stay short so a decision never waits long on a dead
        // server.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(100));
    let manager =
        redis::aio::ConnectionManager::new_lazy_with_config(client, manager).map_err(|source| {
            RedisStoreError::Unreachable {
                address: address.clone(),
                source,
            }
        })?;
    Ok((Connections::Single(manager), address))
}

/// A Redis Cluster, learnt from `url` and the seeds.
fn cluster_connections(
    config: &RedisStoreConfig,
) -> Result<(Connections, String), RedisStoreError> {
    let client = redis::Client::open(config.url.as_str()).map_err(bad_url(&config.url))?;
    let address = client.get_connection_info().addr().to_string();
    let mut nodes = vec![client.get_connection_info().clone()];
    for seed in &config.cluster_seeds {
        let info = redis::Client::open(seed.as_str()).map_err(bad_url(seed))?;
        nodes.push(info.get_connection_info().clone());
    }
    let tls = nodes
        .iter()
        .any(|node| matches!(node.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout)
        // A slot move is followed at once; a dead node is the policy's business.
        .retries(1);
    if let Some(certificates) = &config.tls {
        if !tls {
            return Err(RedisStoreError::BadTls(
                "certificates are set but the cluster's URLs are not rediss://: write rediss:// so they are used".into(),
            ));
        }
        builder = builder.certs(certificates.certificates());
    }
    let cluster = builder.build().map_err(bad_url(&config.url))?;
    let connection = cluster.get_pending_async_connection_with_config(
        ClusterConfig::new()
            .set_connection_timeout(config.timeout)
            .set_response_timeout(config.timeout),
    );
    Ok((Connections::Cluster(connection), address))
}

/// The primary the sentinels name for `sentinel.master`.
fn sentinel_connections(
    config: &RedisStoreConfig,
    sentinel: &SentinelSettings,
) -> Result<(Connections, String), RedisStoreError> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    let mut addresses = Vec::with_capacity(sentinel.nodes.len());
    let mut sentinel_auth = None;
    for node in &sentinel.nodes {
        let client = redis::Client::open(node.as_str()).map_err(bad_url(node))?;
        let info = client.get_connection_info();
        if sentinel_auth.is_none() {
            sentinel_auth = Some((
                info.redis_settings().username().map(str::to_string),
                info.redis_settings().password().map(str::to_string),
            ));
        }
        addresses.push(info.addr().clone());
    }
    let address = format!(
        "sentinel {} ({})",
        sentinel.master,
        addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let sentinels_tls = addresses
        .iter()
        .any(|a| matches!(a, redis::ConnectionAddr::TcpTls { .. }));
    let mut builder = SentinelClientBuilder::new(
        addresses,
        sentinel.master.clone(),
        SentinelServerType::Master,
    )
    .map_err(|source| RedisStoreError::BadUrl {
        url: sentinel.master.clone(),
        source,
    })?;
    if let Some((username, password)) = sentinel_auth {
        if let Some(username) = username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = password {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    let mut db = 0;
    if !config.url.is_empty() {
        // The primary's credentials, database and TLS; its host is the service's name.
        let primary = redis::Client::open(config.url.as_str()).map_err(bad_url(&config.url))?;
        let info = primary.get_connection_info();
        let settings = info.redis_settings();
        db = settings.db();
        builder = builder.set_client_to_redis_db(db);
        if let Some(username) = settings.username() {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(tls) = &config.tls {
                builder = builder.set_client_to_redis_certificates(tls.certificates());
            }
        } else if config.tls.is_some() {
            return Err(RedisStoreError::BadTls(
                "certificates are set but storage.url is not rediss://: write rediss:// so the primary is reached over TLS".into(),
            ));
        }
    }
    if sentinels_tls && let Some(tls) = &config.tls {
        builder = builder.set_client_to_sentinel_certificates(tls.certificates());
    }
    let client = builder.build().map_err(|source| RedisStoreError::BadUrl {
        url: sentinel.nodes.join(","),
        source,
    })?;
    let connection_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout));
    let primary = connection::SentinelPrimary::new(client, connection_config, db);
    Ok((Connections::Sentinel(std::sync::Arc::new(primary)), address))
}

/// A reservation's hold as the scripts take it.
struct HoldArgs<'a> {
    /// The id in lower case: a concurrency set's member and the end of the hold's key.
    id: String,
    /// What the hold's key holds (after `open:` or `settled:`).
    digest: &'a str,
    /// How long it stays open (µs), at most [`MAX_DEBT_MICROS`] so its expiry stays
    /// exact in Lua.
    ttl: Micros,
}

impl<'a> HoldArgs<'a> {
    /// `None` for an id no reservation can have (ids are 32 hex digits), as the memory
    /// store reads them.
    fn new(id: &str, digest: &'a str, ttl: Micros) -> Option<Self> {
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| HoldArgs {
            id: id.to_ascii_lowercase(),
            digest,
            ttl: ttl.clamp(1, MAX_DEBT_MICROS),
        })
    }
}

/// What a settle-script call does with a reservation's hold.
#[derive(Clone, Copy)]
enum HoldMode<'h, 'a> {
    /// No hold: the counters move unconditionally (a refund, a charge for work done).
    Unconditional,
    /// Only if the part's copy of the hold is open with this digest; then it is settled.
    Settle(&'h HoldArgs<'a>),
    /// The reservation was denied by another slot: the part's copy and slots go.
    Release(&'h HoldArgs<'a>),
}

/// How far each window of `settlement` moves, in [`DecisionRequest::windows`] order:
/// its check's `actual - estimate` when the reservation charged it, else 0; capped at
/// [`MAX_DEBT_MICROS`] either way (the scripts' TATs and counts never go further, so
/// the cap changes what a move leaves only for a sliding window owing more than 2^50
/// over its two windows together).
fn amounts(settlement: &Settlement) -> Vec<i64> {
    let cap = i128::from(MAX_DEBT_MICROS);
    settlement
        .request
        .checks
        .iter()
        .enumerate()
        .flat_map(|(index, check)| {
            let amount = settlement.delta(index).clamp(-cap, cap) as i64;
            check.limit().windows().iter().map(move |_| amount)
        })
        .zip(&settlement.windows)
        .map(|(amount, &moved)| if moved { amount } else { 0 })
        .collect()
}

/// One window's arguments to the decision script (after its key index).
struct WindowArgs {
    tag: &'static str,
    capacity: u64,
    period: i64,
    interval: i64,
    /// Capped at capacity + 1, which decides the same.
    cost: u64,
    /// 1: charge_denied, 2: shadow.
    flags: u8,
}

impl WindowArgs {
    fn new(check: &Check, lw: &LimitWindow) -> Self {
        let window = &lw.window;
        let capacity = window.capacity();
        let limit = check.limit();
        WindowArgs {
            tag: algorithm_tag(window.algorithm()),
            capacity,
            period: script_period(window.rate()),
            interval: window.rate().period_micros() / window.rate().quota() as i64,
            cost: check.cost().min(capacity + 1),
            flags: u8::from(limit.charge_denied()) | (u8::from(limit.shadow()) << 1),
        }
    }
}

/// Where the deny cache subscribes: the server, the cluster's nodes (any one hears every
/// `PUBLISH`), or the primary Sentinel names.
fn subscription_source(
    config: &RedisStoreConfig,
    connections: &Connections,
) -> Result<deny_cache::Source, RedisStoreError> {
    if let Connections::Sentinel(primary) = connections {
        return Ok(deny_cache::Source::Sentinel(std::sync::Arc::clone(primary)));
    }
    let mut urls = vec![config.url.as_str()];
    if config.cluster {
        urls.extend(config.cluster_seeds.iter().map(String::as_str));
    }
    let clients = urls
        .into_iter()
        .map(|url| {
            if config.tls.is_some() && url.starts_with("rediss://") {
                client_info(url, config.tls.as_ref())
            } else {
                redis::Client::open(url).map_err(bad_url(url))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(deny_cache::Source::Servers(clients))
}

/// The period the scripts take: microseconds, or [`CALENDAR_MONTH`].
fn script_period(rate: Rate) -> i64 {
    if rate.is_calendar_month() {
        CALENDAR_MONTH
    } else {
        rate.period_micros()
    }
}

fn algorithm_tag(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Gcra => "g",
        Algorithm::FixedWindow => "f",
        Algorithm::SlidingWindow => "s",
        Algorithm::Concurrency => "c",
    }
}

/// Turns the script's flat reply (4 values per window) into outcomes.
fn parse_reply(reply: &[i64], count: usize) -> Result<PartReply, StoreError> {
    if reply.len() != count * 4 {
        return Err(StoreError::Protocol(format!(
            "the decision script answered {} values for {count} windows",
            reply.len()
        )));
    }
    let outcomes = reply
        .chunks_exact(4)
        .map(|w| WindowOutcome {
            allowed: w[0] == 1,
            remaining: w[1].max(0) as u64,
            reset_after: w[2].max(0),
            retry_after: (w[3] >= 0).then_some(w[3]),
        })
        .collect();
    Ok(PartReply { outcomes })
}

/// Whether a key of this store is a reservation's hold (`…}:r:{id}`) rather than a
/// counter (`…}:{window}`: window tags have no `:`, ids no `}`).
fn is_hold_key(key: &str) -> bool {
    key.rsplit_once("}:")
        .is_some_and(|(_, tail)| tail.starts_with("r:"))
}

/// Escapes Redis glob characters so a prefix or counter matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A dropped connection is worth one more attempt: the manager has reconnected by then.
fn retryable(error: &redis::RedisError) -> bool {
    error.is_connection_dropped() || error.is_io_error()
}

/// Only failures of the server as a whole are `Unavailable` (and may switch every
/// client to the `on_error` policy); an error about one request fails that request.
pub(crate) fn store_error(address: &str, error: redis::RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    let server_down = matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        )
            // No primary to talk to (yet): the sentinels name none that answers as one,
            // as during a failover, or the cluster client has no node for the slot.
            | ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::ClusterConnectionNotFound
    );
    if error.is_timeout() {
        StoreError::Unavailable(format!("Redis at {address} timed out: {error}"))
    } else if server_down
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        StoreError::Unavailable(format!("Redis at {address}: {error}"))
    } else {
        StoreError::Protocol(format!("Redis at {address}: {error}"))
    }
}

impl Store for RedisStore {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        Box::pin(self.decide_cached(request))
    }

    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys: Vec<String> = limit.windows().iter().map(|lw| self.key(lw, key)).collect();
            if keys.is_empty() {
                return Ok(());
            }
            self.reset_counters(keys).await
        })
    }

    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        Box::pin(self.reset_limit_inner(limit))
    }

    fn refund<'a>(
        &'a self,
        request: &'a DecisionRequest,
        charged: &'a [bool],
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.refund_inner(request, charged))
    }

    fn reserve<'a>(
        &'a self,
        request: &'a DecisionRequest,
        hold: &'a Hold,
    ) -> StoreFuture<'a, Outcomes> {
        Box::pin(async move {
            // An id no settlement could name: decide without holding anything, as the
            // memory store does.
            let args = HoldArgs::new(&hold.id.id, &hold.id.digest, hold.ttl);
            self.decide_inner(request, args.as_ref()).await
        })
    }

    fn settle<'a>(&'a self, settlement: &'a Settlement) -> StoreFuture<'a, SettleStatus> {
        Box::pin(self.settle_inner(settlement))
    }

    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(self.records_inner())
    }

    fn records_version(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.records_version_inner())
    }

    fn put_record<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, u64> {
        Box::pin(self.put_record_inner(record))
    }

    fn remove_record<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.remove_record_inner(id))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.with_retry(|mut connection| async move {
                redis::cmd("PING").query_async::<()>(&mut connection).await
            })
            .await
        })
    }

    /// `keys` is 0: Redis cannot cheaply count only this deployment's keys (`DBSIZE`
    /// counts every key of the database). Redis's `INFO keyspace` has the totals.
    fn stats(&self) -> StoreStats {
        StoreStats {
            local_denials: self.deny_cache.as_ref().map_or(0, |cache| cache.answered()),
            ..StoreStats::default()
        }
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn hold_keys_are_told_from_counters_whatever_the_key() {
        assert!(is_hold_key(
            "sluice:{chat:user:1}:r:0123456789abcdef0123456789abcdef"
        ));
        assert!(is_hold_key("sluice:{chat:a}:r:b}:r:00ff"));
        assert!(!is_hold_key("sluice:{chat:user:1}:g60"));
        assert!(
            !is_hold_key("sluice:{chat:}:r:x}:c"),
            "a key that looks like a hold"
        );
        assert!(!is_hold_key("sluice:{chat:user:1}:c"));
    }

    #[test]
    fn a_short_reply_is_a_protocol_error() {
        assert!(matches!(
            parse_reply(&[1, 2, 3], 1),
            Err(StoreError::Protocol(_))
        ));
        let ok = parse_reply(&[1, 4, 10, 0, 0, 0, 5, -1], 2).expect("two windows");
        assert_eq!(ok.outcomes[1].retry_after, None);
        assert!(ok.outcomes[0].allowed && !ok.outcomes[1].allowed);
    }
}
