//! One entry as an operator writes it (the admin API's JSON, and the stored record's
//! body), and the checks that make it safe to store: a known plan and limit, a rate
//! that parses, an address or CIDR that parses, an expiry in the future.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sluice_engine::{LimitSet, MAX_KEY_BYTES, Rate};

/// The longest reason kept with an entry.
pub const MAX_REASON_CHARS: usize = 200;

/// What an entry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Puts a subject on a plan: every limit with that plan applies its rates to the subject.
    Plan,
    /// Gives a subject its own rates for one limit.
    Rate,
    /// Refuses a subject's or an address's requests before any limit is consulted.
    Block,
    /// Lets a subject's or an address's requests past every limit. A subject matches
    /// only a trusted key (`sluice_engine::Check::key_is_trusted`), never one the
    /// client wrote: see [`crate::Directory::screen`].
    Allow,
}

/// One rate or several, as written: `"2000/hour"` or `["100/minute", "2000/hour"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Rates {
    /// One rate.
    One(String),
    /// Several, one window each.
    Many(Vec<String>),
}

impl Rates {
    fn as_slice(&self) -> &[String] {
        match self {
            Rates::One(rate) => std::slice::from_ref(rate),
            Rates::Many(rates) => rates,
        }
    }
}

/// An entry: what it does, to whom, until when, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// What it does.
    pub kind: Kind,
    /// The subject: a key value as the limits see it (`customer:42`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// An address or CIDR (`block` and `allow` only), normalised when checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The plan (`plan` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The limit (`rate` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// The rates (`rate` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rates>,
    /// When it stops applying, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// On input only: how long it applies from now, instead of `expires_at_ms`.
    #[serde(default, skip_serializing)]
    pub ttl_ms: Option<u64>,
    /// Why, for the operators (a blocked client is told it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was written, in milliseconds since the Unix epoch (set by sluice).
    #[serde(default)]
    pub created_at_ms: u64,
}

/// Why an entry cannot be stored. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// A field the kind needs is missing, or one it does not take is there.
    #[error("{0}")]
    Shape(String),
    /// No configured limit has the plan.
    #[error("unknown plan {plan:?}: no limit has it (known plans: {known})")]
    UnknownPlan {
        /// The plan asked for.
        plan: String,
        /// The configured plans, comma-separated.
        known: String,
    },
    /// No configured limit has the name.
    #[error("unknown limit {0:?}: name one of the `limits:` in the config")]
    UnknownLimit(String),
    /// The rate cannot apply to the limit.
    #[error("rate {rate:?} cannot apply to limit {limit:?}: {message}")]
    BadRate {
        /// The limit.
        limit: String,
        /// The rate as written.
        rate: String,
        /// Why.
        message: String,
    },
    /// Not an address or CIDR.
    #[error(
        "ip {0:?} is neither an address nor a CIDR: write \"203.0.113.7\", \"203.0.113.0/24\" or \"2001:db8::/32\""
    )]
    BadIp(String),
    /// The subject is not a key.
    #[error("subject {0}")]
    BadSubject(String),
    /// The expiry has passed.
    #[error("expires_at_ms {at} is in the past (now is {now}); give a later time or ttl_ms")]
    ExpiryInThePast {
        /// The expiry given.
        at: u64,
        /// Now.
        now: u64,
    },
    /// The reason is too long.
    #[error("reason is longer than {MAX_REASON_CHARS} characters")]
    LongReason,
}

impl Entry {
    /// The entry as it is stored: checked against `limits`, its address normalised, its
    /// expiry absolute, stamped `now_ms`.
    pub fn checked(mut self, limits: &LimitSet, now_ms: u64) -> Result<Entry, EntryError> {
        let shape = |message: &str| Err(EntryError::Shape(message.to_string()));
        if let Some(subject) = &self.subject {
            check_subject(subject)?;
        }
        match self.kind {
            Kind::Plan => {
                if self.subject.is_none() || self.ip.is_some() {
                    return shape(
                        "a plan entry needs a \"subject\" (the key value, e.g. \"customer:42\") and no \"ip\"",
                    );
                }
                if self.limit.is_some() || self.rate.is_some() {
                    return shape(
                        "a plan entry takes no \"limit\" or \"rate\"; to give one limit its own rate, use kind \"rate\"",
                    );
                }
                let Some(plan) = &self.plan else {
                    return shape("a plan entry needs a \"plan\"");
                };
                let mut known: Vec<&str> = limits
                    .iter()
                    .flat_map(|l| l.plans())
                    .filter_map(|p| p.plan())
                    .collect();
                if !known.contains(&plan.as_str()) {
                    known.sort_unstable();
                    known.dedup();
                    return Err(EntryError::UnknownPlan {
                        plan: plan.clone(),
                        known: if known.is_empty() {
                            "none; give a limit `plans:` in the config".to_string()
                        } else {
                            known.join(", ")
                        },
                    });
                }
            }
            Kind::Rate => {
                if self.subject.is_none() || self.ip.is_some() || self.plan.is_some() {
                    return shape(
                        "a rate entry needs a \"subject\", a \"limit\" and a \"rate\", and no \"ip\" or \"plan\"",
                    );
                }
                let (Some(limit), Some(rates)) = (&self.limit, &self.rate) else {
                    return shape(
                        "a rate entry needs a \"limit\" and a \"rate\" such as \"2000/hour\"",
                    );
                };
                override_rates(limits, limit, rates)?;
            }
            Kind::Block | Kind::Allow => {
                if self.plan.is_some() || self.limit.is_some() || self.rate.is_some() {
                    return shape(
                        "a block or allow entry takes a \"subject\" or an \"ip\", and no \"plan\", \"limit\" or \"rate\"",
                    );
                }
                match (&self.subject, &self.ip) {
                    (Some(_), None) => {}
                    (None, Some(ip)) => self.ip = Some(parse_net(ip)?.to_string()),
                    _ => {
                        return shape(
                            "a block or allow entry needs exactly one of \"subject\" or \"ip\"",
                        );
                    }
                }
            }
        }
        if self
            .reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
        {
            return Err(EntryError::LongReason);
        }
        if let Some(ttl) = self.ttl_ms.take() {
            if self.expires_at_ms.is_some() {
                return shape("give \"ttl_ms\" or \"expires_at_ms\", not both");
            }
            if ttl == 0 {
                return shape("ttl_ms must be at least 1");
            }
            self.expires_at_ms = Some(now_ms.saturating_add(ttl));
        }
        if let Some(at) = self.expires_at_ms
            && at <= now_ms
        {
            return Err(EntryError::ExpiryInThePast { at, now: now_ms });
        }
        self.created_at_ms = now_ms;
        Ok(self)
    }

    /// The record id: one entry per kind, limit and subject or address, so writing the
    /// same one again replaces it.
    pub fn id(&self) -> String {
        let target = match (&self.subject, &self.ip) {
            (Some(subject), _) => format!("subject:{subject}"),
            (None, Some(ip)) => format!("ip:{ip}"),
            (None, None) => String::new(),
        };
        // JSON escapes every control character, so ids never hold a NUL (PostgreSQL
        // text cannot) and the parts cannot run into each other.
        serde_json::to_string(&(self.kind, self.limit.as_deref().unwrap_or(""), target))
            .unwrap_or_default()
    }

    /// Whether it applies at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > now_ms)
    }

    /// The stored body.
    pub fn body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The rates of an override of `limit`, checked against the configured limit.
pub(crate) fn override_rates(
    limits: &LimitSet,
    limit: &str,
    rates: &Rates,
) -> Result<sluice_engine::Limit, EntryError> {
    let base = limits
        .get(limit)
        .ok_or_else(|| EntryError::UnknownLimit(limit.to_string()))?;
    let written = rates.as_slice();
    let bad = |rate: &str, message: String| EntryError::BadRate {
        limit: limit.to_string(),
        rate: rate.to_string(),
        message,
    };
    let mut parsed = Vec::with_capacity(written.len());
    for rate in written {
        parsed.push(rate.parse::<Rate>().map_err(|e| bad(rate, e.to_string()))?);
    }
    if parsed.is_empty() {
        return Err(bad("", "give at least one rate".to_string()));
    }
    base.with_override(parsed)
        .map_err(|e| bad(&written.join(", "), e.to_string()))
}

fn check_subject(subject: &str) -> Result<(), EntryError> {
    if subject.is_empty() {
        return Err(EntryError::BadSubject(
            "is empty: give the key value the limits see, e.g. \"customer:42\"".to_string(),
        ));
    }
    if subject.len() > MAX_KEY_BYTES {
        return Err(EntryError::BadSubject(format!(
            "is longer than {MAX_KEY_BYTES} bytes, the longest key"
        )));
    }
    if subject.contains('\0') {
        return Err(EntryError::BadSubject(
            "contains a NUL byte, which no key may".to_string(),
        ));
    }
    Ok(())
}

/// An address (as a one-address network) or a CIDR, host bits cleared.
pub fn parse_net(text: &str) -> Result<IpNet, EntryError> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(canonical(ip)));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| EntryError::BadIp(text.to_string()))?;
    Ok(net.trunc())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, as client addresses are
/// compared.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}
