//! The local "denied until t" cache: a decision Redis denied is answered again from
//! this process, without a round trip, until the first instant it could be allowed.
//!
//! # What is cached
//! An entry is keyed by the whole decision as the scripts take it: every window's counter
//! key, algorithm, capacity, period, interval, cost and flags, in order (see
//! [`RequestKey`]). So another cost, another plan's rates or another set of checks is
//! another entry. Only denials are cached, and only when
//! - no limit of the request has `charge_denied` (those charge every attempt, so every
//!   attempt must reach Redis);
//! - every window that denied has a retry time (a cost above a window's capacity never
//!   fits: such an entry lives [`MAX_AGE`]).
//!
//! A denied decision without `charge_denied` writes nothing, so answering it again
//! changes no counter: the replay differs from Redis's answer only if the counters could
//! have become more permissive, which needs time or a give-back.
//!
//! **Time.** The entry lives until the earliest retry time of its denying windows (shadow
//! ones included), counted from the instant the request was *sent*: Redis read its clock
//! after that, so the entry ends at or before the instant Redis would first admit one of
//! them. The earliest, not the latest (the decision's own retry time): every window
//! replayed as denied is still denied, so per-window figures stay true, at the price of
//! one more round trip per entry when windows disagree. Replayed retry and reset times
//! are the stored ones minus the time since the request was sent (slightly short, by at
//! most one round trip); `remaining` is replayed as it was.
//!
//! **Give-backs.** A refund, a settlement that gives back or frees a concurrency slot, a
//! cluster decision's give-back, `reset` and `reset_limit` can make a counter allowed
//! early. Each publishes the counters it moved (or, for `reset_limit`, the limit's key
//! prefix) on the channel [`channel`] names, from inside the script that moves them where
//! there is one (so the message leaves Redis atomically with the change). Every instance
//! subscribes (see [`follow`]) and drops the entries those counters denied (a give-back
//! on a counter whose window allowed cannot end a denial: a global limit refunded on
//! every call does not empty the cache); the instance that gave back also drops its own
//! at once.
//!
//! **The remaining window.** Between Redis running a give-back and an instance reading
//! its message (a few hundred microseconds on a LAN), that instance may still answer a
//! denial from its cache: the same as if the request had reached Redis just before the
//! give-back. A decision that was in flight while a message arrived is not cached (an
//! epoch moves with every message), so a reply overtaken by a message cannot bring back
//! a dropped denial.
//!
//! **Subscription down.** While the subscription is not connected (at start, after a
//! disconnect, during a reconnect, after a failed ping, after a Sentinel failover) the
//! cache is off: neither used nor filled. It is emptied when the subscription comes back,
//! as messages may have been missed in between.
//!
//! **Bounds.** At most [`MAX_ENTRIES`] entries (an attacker with many keys over their
//! limits churns it, costing what no cache costs: a round trip per request); an entry
//! lives at most [`MAX_AGE`], which bounds what a change no message announces (an
//! operator's `DEL` or `FLUSHDB`, Redis evicting a key under `maxmemory`, an older sluice
//! resetting without publishing) can cost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sluice_engine::{DecisionRequest, Micros, WindowOutcome, WindowOutcomes};

use crate::connection::SentinelPrimary;

/// Most entries held at once.
pub(crate) const MAX_ENTRIES: usize = 4096;

/// Longest an entry lives, whatever its retry time.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(10);

/// How often the subscription is pinged, so a dead connection turns the cache off.
const PING_EVERY: Duration = Duration::from_secs(1);

/// Longest wait between two subscription attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How often a full cache may look for expired entries before evicting a live one.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// The channel the give-backs of a deployment (a key prefix) are announced on.
pub(crate) fn channel(prefix: &str) -> String {
    format!("{prefix}deny-cache")
}

/// A decision as the cache keys it: the bytes every window contributes to the scripts'
/// arguments, and each window's counter.
pub(crate) struct RequestKey {
    /// A `Vec` until the key is inserted: a lookup that misses copies nothing.
    pub(crate) bytes: Vec<u8>,
    /// In [`DecisionRequest::windows`] order.
    pub(crate) windows: Vec<String>,
}

impl RequestKey {
    /// Builds the key from each window's counter and script arguments (`fields`: the
    /// algorithm tag, capacity, period, interval, capped cost and flags).
    pub(crate) fn new<'a>(windows: impl Iterator<Item = (String, &'a str, [i64; 5])>) -> Self {
        let mut bytes = Vec::with_capacity(96);
        let mut counters: Vec<String> = Vec::with_capacity(2);
        for (counter, tag, fields) in windows {
            bytes.extend_from_slice(&(counter.len() as u32).to_le_bytes());
            bytes.extend_from_slice(counter.as_bytes());
            bytes.extend_from_slice(tag.as_bytes());
            for field in fields {
                bytes.extend_from_slice(&field.to_le_bytes());
            }
            counters.push(counter);
        }
        RequestKey {
            bytes,
            windows: counters,
        }
    }
}

struct Entry {
    /// When the request that Redis denied was sent.
    sent: Instant,
    /// Until when it is denied (exclusive).
    until: Instant,
    outcomes: WindowOutcomes,
    /// The counters of the windows that denied: only a give-back on one of them can
    /// make the decision allowed before `until` (a window shares its counter with every
    /// other check of the request on it).
    counters: Vec<String>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Arc<[u8]>, Entry>,
    /// The entries each counter denies: what a message drops.
    by_counter: HashMap<String, Vec<Arc<[u8]>>>,
    last_sweep: Option<Instant>,
}

impl Entries {
    fn remove(&mut self, key: &[u8]) {
        let Some(entry) = self.map.remove(key) else {
            return;
        };
        for counter in &entry.counters {
            if let Some(keys) = self.by_counter.get_mut(counter) {
                keys.retain(|k| **k != *key);
                if keys.is_empty() {
                    self.by_counter.remove(counter);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.by_counter.clear();
    }
}

/// The cache of one store (see the module doc).
pub(crate) struct DenyCache {
    /// Whether the subscription is up: the cache is used and filled only then.
    up: AtomicBool,
    /// Moves with every message, every give-back of this instance and every change of
    /// the subscription: a decision is cached only if it did not move while it was in
    /// flight. Changed under the lock.
    epoch: AtomicU64,
    /// Entries held, read without the lock so an empty cache costs nothing.
    len: AtomicUsize,
    /// Decisions answered from the cache.
    answered: AtomicU64,
    entries: Mutex<Entries>,
}

/// What a decision takes before it is sent, to be cached after.
#[derive(Clone, Copy)]
pub(crate) struct Ticket {
    epoch: u64,
    sent: Instant,
}

impl DenyCache {
    /// An empty cache, off until [`DenyCache::set_up`] turns it on.
    pub(crate) fn new() -> Self {
        DenyCache {
            up: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            entries: Mutex::new(Entries::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // No code panics while holding it; a poisoned lock still holds a valid map.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the cache is on (the subscription is up).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Decisions answered from the cache so far.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Taken just before a decision is sent: `None` while the cache is off.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.is_up().then(|| Ticket {
            epoch: self.epoch.load(Ordering::Acquire),
            sent: Instant::now(),
        })
    }

    /// Whether a lookup can find anything (no lock, no key to build otherwise).
    pub(crate) fn has_entries(&self) -> bool {
        self.len.load(Ordering::Relaxed) > 0
    }

    /// The denial cached for `key`, with its times brought to now; an expired entry is
    /// dropped.
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<WindowOutcomes> {
        let mut entries = self.lock();
        if !self.is_up() {
            return None;
        }
        let now = Instant::now();
        let entry = entries.map.get(key)?;
        if now >= entry.until {
            entries.remove(key);
            self.len.store(entries.map.len(), Ordering::Relaxed);
            return None;
        }
        let elapsed = micros(now.duration_since(entry.sent));
        let outcomes = entry
            .outcomes
            .iter()
            .map(|o| WindowOutcome {
                reset_after: (o.reset_after - elapsed).max(0),
                // A denying window's retry time is after `until`, so it stays positive.
                retry_after: o
                    .retry_after
                    .map(|r| if o.allowed { 0 } else { (r - elapsed).max(1) }),
                ..*o
            })
            .collect();
        self.answered.fetch_add(1, Ordering::Relaxed);
        Some(outcomes)
    }

    /// Caches `outcomes` for `key` when they are a denial the cache may replay (see the
    /// module doc) and nothing moved the epoch since `ticket` was taken.
    pub(crate) fn insert(
        &self,
        request: &DecisionRequest,
        key: RequestKey,
        outcomes: &WindowOutcomes,
        ticket: Ticket,
    ) {
        let Some(ttl) = denied_for(request, outcomes) else {
            return;
        };
        let until = ticket.sent + ttl.min(MAX_AGE);
        let mut entries = self.lock();
        if !self.is_up() || self.epoch.load(Ordering::Acquire) != ticket.epoch {
            return;
        }
        let now = Instant::now();
        if until <= now {
            return;
        }
        let mut counters: Vec<String> = Vec::with_capacity(1);
        for (counter, outcome) in key.windows.into_iter().zip(outcomes) {
            if !outcome.allowed && !counters.contains(&counter) {
                counters.push(counter);
            }
        }
        let bytes: Arc<[u8]> = key.bytes.into();
        entries.remove(&bytes);
        if entries.map.len() >= MAX_ENTRIES {
            make_room(&mut entries, now);
        }
        for counter in &counters {
            entries
                .by_counter
                .entry(counter.clone())
                .or_default()
                .push(Arc::clone(&bytes));
        }
        entries.map.insert(
            bytes,
            Entry {
                sent: ticket.sent,
                until,
                outcomes: outcomes.clone(),
                counters,
            },
        );
        self.len.store(entries.map.len(), Ordering::Relaxed);
    }

    /// Drops every entry one of `counters` denies.
    pub(crate) fn invalidate<'a>(&self, counters: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for counter in counters {
            if let Some(keys) = entries.by_counter.remove(counter) {
                for key in keys {
                    entries.remove(&key);
                }
            }
        }
        self.len.store(entries.map.len(), Ordering::Relaxed);
    }

    /// Drops every entry denied by a counter whose key starts with `prefix`.
    pub(crate) fn invalidate_prefix(&self, prefix: &str) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let keys: Vec<Arc<[u8]>> = entries
            .map
            .iter()
            .filter(|(_, entry)| entry.counters.iter().any(|c| c.starts_with(prefix)))
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in keys {
            entries.remove(&key);
        }
        self.len.store(entries.map.len(), Ordering::Relaxed);
    }

    /// Turns the cache on (the subscription is up) or off; either way it starts empty.
    pub(crate) fn set_up(&self, up: bool) {
        let mut entries = self.lock();
        entries.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.up.store(up, Ordering::Release);
        self.len.store(0, Ordering::Relaxed);
    }

    /// Applies one message of the channel (see [`Message`]).
    pub(crate) fn apply(&self, payload: &[u8]) {
        match Message::parse(payload) {
            Some(Message::Counters(counters)) => self.invalidate(counters),
            Some(Message::Prefix(prefix)) => self.invalidate_prefix(prefix),
            None => {
                // Not a message this version writes: drop everything rather than guess.
                tracing::debug!("unreadable deny-cache message; the cache is emptied");
                let mut entries = self.lock();
                entries.clear();
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.len.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A full cache: expired entries go (at most once per [`SWEEP_EVERY`], so a flood of
/// distinct denials cannot make every insert scan the map); else an arbitrary live one.
fn make_room(entries: &mut Entries, now: Instant) {
    if entries
        .last_sweep
        .is_none_or(|last| now.duration_since(last) >= SWEEP_EVERY)
    {
        entries.last_sweep = Some(now);
        let expired: Vec<Arc<[u8]>> = entries
            .map
            .iter()
            .filter(|(_, entry)| entry.until <= now)
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in expired {
            entries.remove(&key);
        }
    }
    while entries.map.len() >= MAX_ENTRIES {
        let Some(key) = entries.map.keys().next().cloned() else {
            break;
        };
        entries.remove(&key);
    }
}

/// How long a decision stays denied, if it may be cached: denied, no `charge_denied`
/// limit, and the earliest retry time of its denying windows (a window that never
/// admits this cost does not shorten it).
pub(crate) fn denied_for(
    request: &DecisionRequest,
    outcomes: &[WindowOutcome],
) -> Option<Duration> {
    if request.checks.iter().any(|c| c.limit().charge_denied()) {
        return None;
    }
    let mut denied = false;
    let mut earliest: Option<Micros> = None;
    for ((check, _), outcome) in request.windows().zip(outcomes) {
        if outcome.allowed {
            continue;
        }
        denied |= !check.limit().shadow();
        if let Some(retry) = outcome.retry_after {
            earliest = Some(earliest.map_or(retry, |e| e.min(retry)));
        }
    }
    if !denied {
        return None;
    }
    match earliest {
        None => Some(MAX_AGE),
        Some(retry) if retry > 0 => Some(Duration::from_micros(retry as u64)),
        Some(_) => None,
    }
}

fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// A message of the channel: `k` then each counter key as `<length>:<key>`, or `p` then
/// one key prefix the same way (every counter of a limit).
pub(crate) enum Message<'a> {
    Counters(Vec<&'a str>),
    Prefix(&'a str),
}

impl<'a> Message<'a> {
    /// The text `settle.lua` and the reset script publish for these counters.
    pub(crate) fn prefix_payload(prefix: &str) -> String {
        format!("p{}:{prefix}", prefix.len())
    }

    fn parse(payload: &'a [u8]) -> Option<Self> {
        let (&kind, mut rest) = payload.split_first()?;
        let mut items = Vec::new();
        while !rest.is_empty() {
            let colon = rest.iter().position(|&b| b == b':')?;
            let len: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
            let body = rest.get(colon + 1..colon + 1 + len)?;
            items.push(std::str::from_utf8(body).ok()?);
            rest = &rest[colon + 1 + len..];
        }
        match (kind, items.as_slice()) {
            (b'k', _) => Some(Message::Counters(items)),
            (b'p', [prefix]) => Some(Message::Prefix(prefix)),
            _ => None,
        }
    }
}

/// Where the subscription connects.
pub(crate) enum Source {
    /// A single server, or the nodes of a Redis Cluster (any node hears every `PUBLISH`:
    /// the cluster bus broadcasts it), tried in turn.
    Servers(Vec<redis::Client>),
    /// The primary Sentinel names; followed again when the store's own connection moved
    /// to another primary.
    Sentinel(Arc<SentinelPrimary>),
}

/// Keeps `cache` subscribed to `channel` for as long as the task runs: on while
/// subscribed, off (and emptied) otherwise. Runs until aborted (the store's drop).
pub(crate) async fn follow(
    cache: Arc<DenyCache>,
    source: Source,
    channel: String,
    timeout: Duration,
) {
    // However the task ends (aborted with the store, dropped with its runtime), the
    // cache must not stay on without a subscription.
    let _off = Off(&cache);
    let mut next = 0usize;
    let mut delay = Duration::from_millis(50);
    // The first failure is worth a warning (a user without `subscribe` or the channel
    // keeps the cache off for good); later ones are the retries of an outage.
    let mut warned = false;
    loop {
        let generation = match &source {
            Source::Sentinel(primary) => primary.generation(),
            Source::Servers(_) => 0,
        };
        match subscribe(&source, &mut next, &channel, timeout).await {
            Ok(pubsub) => {
                delay = Duration::from_millis(50);
                listen(&cache, &source, generation, pubsub, timeout).await;
            }
            Err(error) if !warned => {
                warned = true;
                tracing::warn!(%error, %channel, "the local deny cache cannot subscribe to give-backs; it stays off until it can (the Redis user needs +subscribe and the channel: see README's ACL line)");
            }
            Err(error) => {
                tracing::debug!(%error, "the deny cache cannot subscribe; it stays off");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Turns the cache off when dropped.
struct Off<'a>(&'a DenyCache);

impl Drop for Off<'_> {
    fn drop(&mut self) {
        self.0.set_up(false);
    }
}

async fn subscribe(
    source: &Source,
    next: &mut usize,
    channel: &str,
    timeout: Duration,
) -> redis::RedisResult<redis::aio::PubSub> {
    let attempt = async {
        let client = match source {
            Source::Servers(clients) => {
                let Some(client) = clients.get(*next % clients.len().max(1)) else {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no server to subscribe to",
                    )));
                };
                *next += 1;
                client.clone()
            }
            Source::Sentinel(primary) => primary.client().await?,
        };
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(answer) => answer,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "subscribing timed out",
        ))),
    }
}

/// Turns the cache on, applies messages until the connection fails, a ping is not
/// answered or (Sentinel) the primary changed; then turns it off.
async fn listen(
    cache: &DenyCache,
    source: &Source,
    generation: u64,
    pubsub: redis::aio::PubSub,
    timeout: Duration,
) {
    let (mut sink, mut stream) = pubsub.split();
    cache.set_up(true);
    let mut last_ping = Instant::now();
    loop {
        let wait = PING_EVERY.saturating_sub(last_ping.elapsed());
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(message)) => cache.apply(message.get_payload_bytes()),
            Ok(None) => break,
            Err(_) => {}
        }
        if last_ping.elapsed() >= PING_EVERY {
            last_ping = Instant::now();
            let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
            if !matches!(pong, Ok(Ok(_))) {
                break;
            }
            if let Source::Sentinel(primary) = source
                && primary.generation() != generation
            {
                break;
            }
        }
    }
    cache.set_up(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_engine::{Check, Limit, LimitSpec};

    fn limit(name: &str) -> Arc<Limit> {
        let spec = LimitSpec::new(vec!["1/hour".parse().expect("rate")]);
        Arc::new(Limit::new(name, spec).expect("limit"))
    }

    /// A request on limits `a` and `b` for `key`, its cache key, and outcomes where `a`
    /// allowed and `b` denied for a minute.
    fn denial(key: &str) -> (DecisionRequest, RequestKey, WindowOutcomes) {
        let request = DecisionRequest {
            checks: vec![
                Check::new(limit("a"), key, 1).expect("check"),
                Check::new(limit("b"), key, 1).expect("check"),
            ],
            dry_run: false,
        };
        let windows = ["a", "b"].map(|l| (format!("{l}:{key}"), "g", [1, 2, 3, 4, 0]));
        let outcome = |allowed| WindowOutcome {
            allowed,
            remaining: 0,
            reset_after: 60_000_000,
            retry_after: Some(if allowed { 0 } else { 60_000_000 }),
        };
        let outcomes = [outcome(true), outcome(false)].into_iter().collect();
        (request, RequestKey::new(windows.into_iter()), outcomes)
    }

    fn cached(cache: &DenyCache, key: &str) -> bool {
        let (_, request_key, _) = denial(key);
        cache.lookup(&request_key.bytes).is_some()
    }

    fn on() -> DenyCache {
        let cache = DenyCache::new();
        cache.set_up(true);
        cache
    }

    fn fill(cache: &DenyCache, key: &str) {
        let ticket = cache.ticket().expect("on");
        let (request, request_key, outcomes) = denial(key);
        cache.insert(&request, request_key, &outcomes, ticket);
    }

    #[test]
    fn only_a_give_back_on_a_denying_counter_ends_an_entry() {
        let cache = on();
        fill(&cache, "k");
        assert!(cached(&cache, "k"));
        cache.invalidate(["a:k"]);
        assert!(
            cached(&cache, "k"),
            "a allowed: its give-back changes nothing"
        );
        cache.invalidate(["b:k"]);
        assert!(!cached(&cache, "k"));
        fill(&cache, "k");
        cache.apply(Message::prefix_payload("b:").as_bytes());
        assert!(!cached(&cache, "k"));
    }

    #[test]
    fn a_message_during_the_round_trip_keeps_the_answer_out() {
        let cache = on();
        let ticket = cache.ticket().expect("on");
        cache.apply(b"k3:x:y");
        let (request, request_key, outcomes) = denial("k");
        cache.insert(&request, request_key, &outcomes, ticket);
        assert!(!cached(&cache, "k"));
    }

    #[test]
    fn off_means_neither_used_nor_filled_and_on_again_starts_empty() {
        let cache = on();
        fill(&cache, "k");
        cache.set_up(false);
        assert!(cache.ticket().is_none());
        assert!(!cached(&cache, "k"));
        cache.set_up(true);
        assert!(!cached(&cache, "k"));
        assert!(!cache.has_entries());
    }

    #[test]
    fn a_flood_of_distinct_denials_stays_within_the_bound() {
        let cache = on();
        for n in 0..MAX_ENTRIES + 500 {
            fill(&cache, &format!("k{n}"));
        }
        let entries = cache.lock();
        assert_eq!(entries.map.len(), MAX_ENTRIES);
        let indexed: usize = entries.by_counter.values().map(Vec::len).sum();
        assert_eq!(indexed, MAX_ENTRIES, "the index holds no evicted entry");
    }

    #[test]
    fn messages_are_read_back() {
        let Some(Message::Counters(keys)) = Message::parse(b"k5:a:b:c3:x\ny") else {
            panic!("counters");
        };
        assert_eq!(keys, ["a:b:c", "x\ny"]);
        let payload = Message::prefix_payload("sluice:{chat:");
        assert!(matches!(
            Message::parse(payload.as_bytes()),
            Some(Message::Prefix("sluice:{chat:"))
        ));
        assert!(Message::parse(b"k9:short").is_none());
        assert!(Message::parse(b"x1:a").is_none());
        assert!(Message::parse(b"").is_none());
    }
}
