//! The directory: every live entry, indexed for the hot path. Built from the store's
//! records whenever their version moves (or the config is reloaded), then read without
//! locks by every decision. Lookups are one hash probe per check for subjects and a
//! scan of the (few) address entries; an empty directory costs one branch.

use std::collections::HashMap;

use compact_str::CompactString;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use sluice_engine::{DecisionRequest, Limit, LimitSet, Listed, Record, Records};

use crate::entry::{Entry, Kind, canonical, override_rates, parse_net};

/// What the lists say of a request, before its limits are consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    /// Refused: a block entry matched (blocks win over allows).
    Blocked(Listed),
    /// Let past every limit: an allow entry matched and no block did.
    Allowed(Listed),
    /// Decided by its limits.
    Limits,
}

/// An entry and, for a rate override, the limit it makes.
#[derive(Debug)]
struct Live {
    entry: Entry,
    limit: Option<Arc<Limit>>,
}

/// The tables decisions read: foldhash (seeded per process) over inline keys.
type Map<V> = hashbrown::HashMap<CompactString, V>;

/// A plan assignment as decisions read it.
#[derive(Debug)]
struct PlanSlot {
    plan: Arc<str>,
    expires_at_ms: Option<u64>,
}

/// Every entry, indexed.
#[derive(Debug, Default)]
pub struct Directory {
    version: u64,
    /// The configured limits it was built against: plans are looked up in them.
    limits: LimitSet,
    entries: Vec<Arc<Live>>,
    /// Plan assignments by subject, with what the hot path needs inline: keys up to 24
    /// bytes live in the table itself (no pointer to follow), hashed with foldhash.
    plans: Map<PlanSlot>,
    /// Overrides by limit, then subject: looked up with borrowed names, no allocation.
    rates: Map<Map<Arc<Live>>>,
    blocked: Map<Arc<Live>>,
    allowed: Map<Arc<Live>>,
    /// Address entries: `true` for a block.
    nets: Vec<(IpNet, bool, Arc<Live>)>,
    /// Records that could not be read (written by a newer sluice, or naming a limit or
    /// plan the config no longer has), with why; kept whole, as a reload may make them fit.
    skipped: Vec<(Record, String)>,
}

impl Directory {
    /// The directory of `records` against the configured `limits`. A record that does
    /// not apply to this config (an unknown limit or plan since a reload) is skipped and
    /// listed in [`Directory::skipped`], never guessed at.
    pub fn build(records: &Records, limits: &LimitSet) -> Self {
        let mut directory = Directory {
            version: records.version,
            limits: limits.clone(),
            ..Directory::default()
        };
        // Plan names, shared by every assignment to them.
        let mut plan_names: HashMap<String, Arc<str>> = HashMap::new();
        for record in &records.records {
            let entry: Entry = match serde_json::from_str(&record.body) {
                Ok(entry) => entry,
                Err(error) => {
                    directory.skipped.push((record.clone(), error.to_string()));
                    continue;
                }
            };
            let limit = match (&entry.kind, &entry.limit, &entry.rate) {
                (Kind::Rate, Some(limit), Some(rates)) => {
                    match override_rates(limits, limit, rates) {
                        Ok(limit) => Some(Arc::new(limit)),
                        Err(error) => {
                            directory.skipped.push((record.clone(), error.to_string()));
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let live = Arc::new(Live { entry, limit });
            directory.index(live, &mut plan_names);
        }
        directory
    }

    fn index(&mut self, live: Arc<Live>, plan_names: &mut HashMap<String, Arc<str>>) {
        let entry = &live.entry;
        let subject = entry.subject.as_deref().map(CompactString::from);
        match (entry.kind, subject) {
            (Kind::Plan, Some(subject)) => {
                let name = entry.plan.as_deref().unwrap_or_default();
                let plan = Arc::clone(
                    plan_names
                        .entry(name.to_string())
                        .or_insert_with(|| name.into()),
                );
                let slot = PlanSlot {
                    plan,
                    expires_at_ms: entry.expires_at_ms,
                };
                self.plans.insert(subject, slot);
            }
            (Kind::Rate, Some(subject)) => {
                let limit = CompactString::from(entry.limit.as_deref().unwrap_or_default());
                self.rates
                    .entry(limit)
                    .or_default()
                    .insert(subject, Arc::clone(&live));
            }
            (Kind::Block, Some(subject)) => {
                self.blocked.insert(subject, Arc::clone(&live));
            }
            (Kind::Allow, Some(subject)) => {
                self.allowed.insert(subject, Arc::clone(&live));
            }
            (kind @ (Kind::Block | Kind::Allow), None) => {
                if let Some(net) = entry.ip.as_deref().and_then(|ip| parse_net(ip).ok()) {
                    self.nets
                        .push((net, kind == Kind::Block, Arc::clone(&live)));
                }
            }
            _ => return,
        }
        self.entries.push(live);
    }

    /// The records' version this was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry (expired ones included until they are removed), sorted by kind and
    /// target for listing.
    pub fn entries(&self) -> Vec<&Entry> {
        let mut entries: Vec<&Entry> = self.entries.iter().map(|l| &l.entry).collect();
        // An id is built for each entry once, not per comparison.
        entries.sort_by_cached_key(|e| e.id());
        entries
    }

    /// Records skipped when building (their ids), with why.
    pub fn skipped(&self) -> impl Iterator<Item = (&str, &str)> {
        self.skipped
            .iter()
            .map(|(record, why)| (record.id.as_str(), why.as_str()))
    }

    /// This directory against other `limits` (a reloaded config), from the entries it
    /// holds and the records it skipped: no copy of the records is kept beside it.
    pub fn rebuild(&self, limits: &LimitSet) -> Directory {
        let records = self
            .entries
            .iter()
            .map(|live| Record {
                id: live.entry.id(),
                body: live.entry.body(),
            })
            .chain(self.skipped.iter().map(|(record, _)| record.clone()))
            .collect();
        Directory::build(
            &Records {
                version: self.version,
                records,
            },
            limits,
        )
    }

    /// What the lists say of `request` from `client` (its address, when known) at
    /// `now_ms`: an address entry, a subject block for any check's key, or a subject
    /// allow for a check whose key is trusted ([`sluice_engine::Check::key_is_trusted`]):
    /// an untrusted key equal to an allowed subject is decided by its limits like any
    /// other. A block wins over an allow, whichever matched first.
    pub fn screen(&self, request: &DecisionRequest, client: Option<IpAddr>, now_ms: u64) -> Screen {
        self.screen_with(request, client, &[], now_ms)
    }

    /// [`Directory::screen`], with `subjects` also looked up as subject entries besides
    /// the checks' keys: the Envoy service names each descriptor entry `key=value`, so
    /// `sluice admin block --subject user_id=42` blocks any call that carries it.
    /// `subjects` are trusted (they may match allow entries): pass only what a trusted
    /// party wrote.
    pub fn screen_with(
        &self,
        request: &DecisionRequest,
        client: Option<IpAddr>,
        subjects: &[String],
        now_ms: u64,
    ) -> Screen {
        if self.blocked.is_empty() && self.allowed.is_empty() && self.nets.is_empty() {
            return Screen::Limits;
        }
        let mut allowed = None;
        if let Some(ip) = client.map(canonical) {
            for (net, block, live) in &self.nets {
                if net.contains(&ip) && live.entry.is_live(now_ms) {
                    if *block {
                        return Screen::Blocked(listed(&live.entry));
                    }
                    allowed.get_or_insert_with(|| listed(&live.entry));
                }
            }
        }
        // Every key is looked up as a block (a block only refuses, so a client naming a
        // blocked subject hurts only itself), but only trusted keys as an allow: a key
        // the client writes (`{query.api_key}`) could otherwise name any allow-listed
        // subject, another limit's or an Envoy descriptor's, and take the whole request
        // past every limit. The Envoy service's subjects come from its descriptors,
        // which Envoy's configured actions make, so they count as trusted.
        let keys = request
            .checks
            .iter()
            .map(|check| (check.key(), check.key_is_trusted()));
        for (subject, trusted) in keys.chain(subjects.iter().map(|s| (s.as_str(), true))) {
            if let Some(live) = self.blocked.get(subject)
                && live.entry.is_live(now_ms)
            {
                return Screen::Blocked(listed(&live.entry));
            }
            if trusted
                && allowed.is_none()
                && let Some(live) = self.allowed.get(subject)
                && live.entry.is_live(now_ms)
            {
                allowed = Some(listed(&live.entry));
            }
        }
        match allowed {
            Some(listed) => Screen::Allowed(listed),
            None => Screen::Limits,
        }
    }

    /// Applies plan assignments and rate overrides to `request` in place: a check whose
    /// key has an override for its limit takes the override's rates; otherwise one whose
    /// key is on a plan takes that plan's rates, when its limit has the plan (the
    /// configured limit is looked up by name). Costs and keys stay. Answers whether any
    /// check changed.
    pub fn assign(&self, request: &mut DecisionRequest, now_ms: u64) -> bool {
        if self.plans.is_empty() && self.rates.is_empty() {
            return false;
        }
        let mut changed = false;
        for check in &mut request.checks {
            let name = check.limit().name();
            let key = check.key();
            let limit = if let Some(live) = self.live_override(name, key, now_ms) {
                live.limit.clone()
            } else if let Some(slot) = self
                .plans
                .get(key)
                .filter(|s| s.expires_at_ms.is_none_or(|at| at > now_ms))
            {
                let plan = Some(&*slot.plan);
                let current = check.limit();
                if current.plan() == plan {
                    None
                } else {
                    // A check on the default rates holds the limit with its plans; one
                    // already on a plan (`plan_from`) is looked up by name.
                    let base = if current.plan().is_none() {
                        Some(current)
                    } else {
                        self.limits.get(name)
                    };
                    base.map(|base| base.for_plan(plan))
                        .filter(|l| l.plan() == plan)
                        .cloned()
                }
            } else {
                None
            };
            if let Some(limit) = limit {
                check.set_limit(limit);
                changed = true;
            }
        }
        changed
    }

    /// The override limit of `limit` for `key`, when one is live: what a settlement of
    /// a reservation made under it moves.
    pub fn override_of(&self, limit: &str, key: &str, now_ms: u64) -> Option<Arc<Limit>> {
        self.live_override(limit, key, now_ms)
            .and_then(|l| l.limit.clone())
    }

    fn live_override(&self, limit: &str, key: &str, now_ms: u64) -> Option<&Arc<Live>> {
        self.rates
            .get(limit)?
            .get(key)
            .filter(|l| l.entry.is_live(now_ms))
    }

    /// Ids of entries expired at `now_ms`, for removal from the store.
    pub fn expired(&self, now_ms: u64) -> Vec<String> {
        self.entries
            .iter()
            .filter(|l| !l.entry.is_live(now_ms))
            .map(|l| l.entry.id())
            .collect()
    }
}

fn listed(entry: &Entry) -> Listed {
    Listed {
        blocked: entry.kind == Kind::Block,
        reason: entry.reason.clone(),
        expires_at_ms: entry.expires_at_ms,
    }
}
