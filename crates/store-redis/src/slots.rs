//! How one decision is split over Redis Cluster slots and put back together.
//!
//! A Lua script may only touch keys of one slot. On a single server the whole decision
//! is one part (one script call). In a cluster the windows are grouped by the slot of
//! their key; the parts run concurrently, each atomic on its own node. Keys carry a
//! hash tag of the check (`{limit:key}`), so all windows of one check share a slot and a
//! typical decision (per user, per IP, global) is at most one part per check.
//!
//! Parts are decided as if each were the whole decision. When every part allows, the
//! decision is allowed and every charge stands: exactly what one script would have
//! done. When some part denies, the parts that allowed have charged windows that a
//! denied decision must not charge; [`combine`] lists them and the store gives them
//! back with `settle.lua` (charge, then refund: the same script as `Store::refund`).
//! Until the refund lands (one more round trip to those nodes) a concurrent decision
//! may see the charge and be denied where it would have fit: an over-count for a few
//! hundred microseconds, never an under-count, so a limit is never exceeded.
//!
//! A `Store::reserve` splits the same way. Every part that allows records its own copy
//! of the hold (a key in its slot) and takes its slots of concurrency windows, so each
//! part's settlement can check its own copy; when the reservation is denied, the parts
//! that allowed release their copy and slots in the same call that gives back their
//! charges. A settlement runs one script per part: across slots it is not atomic (a
//! part may settle while another part's node is down), and each part settles at most
//! once.

use sluice_engine::{Check, LimitWindow, WindowOutcome, WindowOutcomes};

/// The windows of one decision that run in one script call.
#[derive(Debug, Default)]
pub(crate) struct Part {
    /// The distinct Redis keys of this part (`KEYS` of the script).
    pub keys: Vec<String>,
    /// Per window of this part: its index in `DecisionRequest::windows()` order and the
    /// 1-based index of its key in `keys`.
    pub windows: Vec<(usize, usize)>,
}

/// What one part's script answered.
#[derive(Debug)]
pub(crate) struct PartReply {
    /// One outcome per window of the part, in part order.
    pub outcomes: Vec<WindowOutcome>,
}

/// What one part that allowed must give back when the decision is denied: the windows
/// it charged (as indexes into the part's windows; possibly none), and, for a
/// reservation, the hold it recorded and the slots it took.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refund {
    /// Which part.
    pub part: usize,
    /// Which of its windows.
    pub windows: Vec<usize>,
}

/// Groups the windows of a decision into parts: one part on a single server, one per
/// slot in a cluster. `key_of` gives a window's Redis key; `slot_of` its slot (the same
/// for every key on a single server).
pub(crate) fn split<'a, S: PartialEq>(
    windows: &[(&'a Check, &'a LimitWindow)],
    key_of: impl Fn(&LimitWindow, &str) -> String,
    slot_of: impl Fn(&str) -> S,
) -> Vec<Part> {
    let mut parts: Vec<(S, Part)> = Vec::new();
    for (index, (check, lw)) in windows.iter().enumerate() {
        let key = key_of(lw, check.key());
        let slot = slot_of(&key);
        let p = match parts.iter().position(|(s, _)| *s == slot) {
            Some(p) => p,
            None => {
                parts.push((slot, Part::default()));
                parts.len() - 1
            }
        };
        let part = &mut parts[p].1;
        let key_index = match part.keys.iter().position(|k| *k == key) {
            Some(k) => k + 1,
            None => {
                part.keys.push(key);
                part.keys.len()
            }
        };
        part.windows.push((index, key_index));
    }
    parts.into_iter().map(|(_, part)| part).collect()
}

/// Whether a part (or a whole decision) allows: every window allows or is shadow.
fn allows<'a>(windows: impl Iterator<Item = (&'a WindowOutcome, &'a Check)>) -> bool {
    windows
        .into_iter()
        .all(|(outcome, check)| outcome.allowed || check.limit().shadow())
}

/// Whether one part's own script allowed (and so charged every window that allowed, and
/// recorded a reservation's hold).
pub(crate) fn part_allows(
    windows: &[(&Check, &LimitWindow)],
    part: &Part,
    reply: &PartReply,
) -> bool {
    allows(
        reply
            .outcomes
            .iter()
            .zip(part.windows.iter().map(|&(i, _)| windows[i].0)),
    )
}

/// Every window one part's script charged, as indexes into the part's windows: what
/// must be given back when the decision cannot stand at all (another part failed).
pub(crate) fn charged(
    windows: &[(&Check, &LimitWindow)],
    part: &Part,
    reply: &PartReply,
) -> Vec<usize> {
    let part_allowed = part_allows(windows, part, reply);
    part.windows
        .iter()
        .zip(&reply.outcomes)
        .enumerate()
        .filter(|&(_, (&(i, _), o))| {
            let check = windows[i].0;
            check.cost() > 0
                && ((part_allowed && o.allowed)
                    || (check.limit().charge_denied() && o.retry_after.is_some()))
        })
        .map(|(k, _)| k)
        .collect()
}

/// Puts the parts' outcomes back in request order and lists what must be given back:
/// when the decision is denied, one [`Refund`] per part which allowed, with every window
/// it charged that a denied decision does not charge (all but `charge_denied` ones;
/// possibly none, yet a reservation's hold must still be released). Those windows'
/// `remaining` is reported as it will be after the refund.
pub(crate) fn combine(
    windows: &[(&Check, &LimitWindow)],
    parts: &[Part],
    replies: &[PartReply],
    dry_run: bool,
) -> (WindowOutcomes, Vec<Refund>) {
    let mut outcomes: Vec<Option<WindowOutcome>> = vec![None; windows.len()];
    for (part, reply) in parts.iter().zip(replies) {
        for (&(index, _), outcome) in part.windows.iter().zip(&reply.outcomes) {
            outcomes[index] = Some(*outcome);
        }
    }
    let outcomes: WindowOutcomes = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(WindowOutcome {
                allowed: false,
                remaining: 0,
                reset_after: 0,
                retry_after: None,
            })
        })
        .collect();
    let decision_allows = allows(outcomes.iter().zip(windows.iter().map(|(c, _)| *c)));
    let mut refunds = Vec::new();
    let mut outcomes = outcomes;
    if decision_allows || dry_run {
        return (outcomes, refunds);
    }
    for (p, (part, reply)) in parts.iter().zip(replies).enumerate() {
        if !part_allows(windows, part, reply) {
            // The part's own script decided "denied": it charged what a denied decision
            // charges, nothing more.
            continue;
        }
        let give_back: Vec<usize> = part
            .windows
            .iter()
            .enumerate()
            .filter(|&(k, &(i, _))| {
                let (check, _) = windows[i];
                reply.outcomes[k].allowed && check.cost() > 0 && !check.limit().charge_denied()
            })
            .map(|(k, _)| k)
            .collect();
        for &k in &give_back {
            let (index, _) = part.windows[k];
            let (check, lw) = windows[index];
            let outcome = &mut outcomes[index];
            outcome.remaining = (outcome.remaining + check.cost()).min(lw.window.capacity());
        }
        refunds.push(Refund {
            part: p,
            windows: give_back,
        });
    }
    (outcomes, refunds)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_engine::{DecisionRequest, Limit, LimitSpec};

    use super::*;

    fn limit(name: &str, rate: &str) -> Arc<Limit> {
        Arc::new(Limit::new(name, LimitSpec::new(vec![rate.parse().unwrap()])).unwrap())
    }

    fn outcome(allowed: bool) -> WindowOutcome {
        WindowOutcome {
            allowed,
            remaining: 3,
            reset_after: 0,
            retry_after: Some(if allowed { 0 } else { 5 }),
        }
    }

    #[test]
    fn windows_are_grouped_by_slot_and_keys_shared_within_a_part() {
        let a = limit("a", "5/minute");
        let request = DecisionRequest {
            checks: vec![
                Check::new(a.clone(), "x", 1).unwrap(),
                Check::new(a.clone(), "y", 1).unwrap(),
                Check::new(a, "x", 1).unwrap(),
            ],
            dry_run: false,
        };
        let windows: Vec<_> = request.windows().collect();
        let parts = split(
            &windows,
            |lw, key| format!("{}:{key}", lw.counter),
            |key| u16::from(key.ends_with('y')),
        );
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].keys, vec!["a:g60:x".to_string()]);
        assert_eq!(parts[0].windows, vec![(0, 1), (2, 1)], "x twice, one key");
        assert_eq!(parts[1].windows, vec![(1, 1)]);
    }

    #[test]
    fn a_denying_part_makes_the_allowing_parts_give_back_all_but_charge_denied() {
        let plain = limit("plain", "5/minute");
        let sticky = Arc::new(
            Limit::new("sticky", {
                let mut spec = LimitSpec::new(vec!["5/minute".parse().unwrap()]);
                spec.charge_denied = true;
                spec
            })
            .unwrap(),
        );
        let full = limit("full", "5/minute");
        let request = DecisionRequest {
            checks: vec![
                Check::new(plain, "u", 2).unwrap(),
                Check::new(sticky, "u", 1).unwrap(),
                Check::new(full, "ip", 1).unwrap(),
            ],
            dry_run: false,
        };
        let windows: Vec<_> = request.windows().collect();
        let parts = split(
            &windows,
            |lw, key| format!("{}:{key}", lw.counter),
            |key| u16::from(key.ends_with("ip")),
        );
        let replies = vec![
            PartReply {
                outcomes: vec![outcome(true), outcome(true)],
            },
            PartReply {
                outcomes: vec![outcome(false)],
            },
        ];
        let (outcomes, refunds) = combine(&windows, &parts, &replies, false);
        assert_eq!(
            refunds,
            vec![Refund {
                part: 0,
                windows: vec![0]
            }],
            "plain is given back, charge_denied keeps its charge, the denying part charged nothing more"
        );
        assert_eq!(outcomes[0].remaining, 5, "3 left + the 2 given back");
        assert_eq!(outcomes[1].remaining, 3);
        assert!(!outcomes[2].allowed);

        let (_, none) = combine(&windows, &parts, &replies, true);
        assert!(none.is_empty(), "a dry run charged nothing");
        // A part that allowed with nothing to give back is still listed: a reservation
        // releases its hold there.
        let sticky_only = split(
            &windows[1..],
            |lw, key| format!("{}:{key}", lw.counter),
            |key| u16::from(key.ends_with("ip")),
        );
        let replies = vec![
            PartReply {
                outcomes: vec![outcome(true)],
            },
            PartReply {
                outcomes: vec![outcome(false)],
            },
        ];
        assert_eq!(
            combine(&windows[1..], &sticky_only, &replies, false).1,
            vec![Refund {
                part: 0,
                windows: vec![]
            }]
        );
        let all_allow = vec![
            PartReply {
                outcomes: vec![outcome(true), outcome(true)],
            },
            PartReply {
                outcomes: vec![outcome(true)],
            },
        ];
        assert!(combine(&windows, &parts, &all_allow, false).1.is_empty());
    }
}
