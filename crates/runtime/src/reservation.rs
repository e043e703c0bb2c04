//! Reservation tickets: what a front door hands out for an allowed reservation and
//! takes back to settle it (docs/design/front-doors.md, "Reservations").
//!
//! A ticket names the reservation (128 random bits) and carries what it charged: each
//! check's limit, key and estimate, and when it expires. The token a client holds is
//! the ticket's JSON in base64url, so any instance can settle any other's reservation
//! from the token alone; the store keeps only the id, a digest of the ticket and the
//! expiry, and refuses a settlement whose ticket does not match that digest. A client
//! can therefore read its ticket (the keys it sent) but not change what it settles.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_engine::{Check, DecisionRequest, HoldId, LimitSet, Settlement};

/// What every token starts with, so a token is recognisable in logs and support tickets.
const PREFIX: &str = "rsv1.";

/// The longest token accepted: 64 checks with 512-byte keys fit comfortably.
pub const MAX_TOKEN_BYTES: usize = 96 * 1024;

/// One reserved check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketCheck {
    /// The limit's name.
    #[serde(rename = "l")]
    pub limit: String,
    /// The key.
    #[serde(rename = "k")]
    pub key: String,
    /// The estimate charged.
    #[serde(rename = "e")]
    pub estimate: u64,
    /// The plan whose rates were charged (a configured plan, or `override` for a rate
    /// set at run time), so the settlement moves the same windows.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// A reservation as its holder knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// 32 hex digits, random.
    #[serde(rename = "i")]
    pub id: String,
    /// When it expires, in milliseconds since the Unix epoch (this instance's clock).
    #[serde(rename = "x")]
    pub expires_at_ms: u64,
    /// The checks, in request order.
    #[serde(rename = "c")]
    pub checks: Vec<TicketCheck>,
}

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a token this version writes.
    #[error(
        "reservation is not a sluice reservation token (it starts with {PREFIX:?}); pass the `reservation` value /v1/reserve answered, unchanged"
    )]
    Malformed,
    /// Longer than any token sluice writes.
    #[error(
        "reservation is longer than {MAX_TOKEN_BYTES} bytes; pass the value /v1/reserve answered, unchanged"
    )]
    TooLong,
    /// The random source failed.
    #[error("cannot draw a random reservation id: {0}")]
    Random(String),
}

impl Ticket {
    /// A new ticket for `request` (an id drawn now), expiring `ttl` from now.
    pub fn new(request: &DecisionRequest, ttl: Duration) -> Result<Self, TicketError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| TicketError::Random(e.to_string()))?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Ok(Ticket {
            id: hex(&bytes),
            expires_at_ms: now_ms.saturating_add(ttl.as_millis() as u64),
            checks: request
                .checks
                .iter()
                .map(|c| TicketCheck {
                    limit: c.limit().name().to_string(),
                    key: c.key().to_string(),
                    estimate: c.cost(),
                    plan: c.limit().plan().map(str::to_string),
                })
                .collect(),
        })
    }

    fn payload(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The token a client holds, and the hold id the store records for it.
    pub fn encode(&self) -> (String, HoldId) {
        let payload = self.payload();
        let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(payload.as_bytes()));
        (token, self.hold_id(&payload))
    }

    /// Reads a token back, with the hold id its content hashes to.
    pub fn decode(token: &str) -> Result<(Ticket, HoldId), TicketError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TicketError::TooLong);
        }
        let body = token.strip_prefix(PREFIX).ok_or(TicketError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TicketError::Malformed)?;
        let ticket: Ticket =
            serde_json::from_slice(&payload).map_err(|_| TicketError::Malformed)?;
        let valid_id = ticket.id.len() == 32 && ticket.id.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid_id || ticket.checks.is_empty() {
            return Err(TicketError::Malformed);
        }
        // The digest is of the bytes as sent: any change to them is a different ticket.
        let payload = String::from_utf8(payload).map_err(|_| TicketError::Malformed)?;
        let hold = ticket.hold_id(&payload);
        Ok((ticket, hold))
    }

    fn hold_id(&self, payload: &str) -> HoldId {
        let digest = Sha256::digest(payload.as_bytes());
        HoldId {
            id: self.id.clone(),
            digest: hex(&digest[..16]),
        }
    }

    /// The settlement of this ticket at `actual` (one cost per check), against the
    /// limits configured now, at the plan each check was reserved on (a rate override
    /// from `directory`, while it lasts). A check whose limit has since been removed
    /// from the config is left out (its counters are no longer decided on), as is one
    /// whose key is no longer valid; its concurrency slot, if any, expires with the hold.
    pub fn settlement(
        &self,
        hold: HoldId,
        limits: &LimitSet,
        directory: &sluice_access::Directory,
        actual: &[u64],
    ) -> Settlement {
        let now = crate::access::now_ms();
        let mut request = DecisionRequest::default();
        let mut costs = Vec::with_capacity(self.checks.len());
        for (check, &actual) in self.checks.iter().zip(actual) {
            let Some(base) = limits.get(&check.limit) else {
                continue;
            };
            let limit = match check.plan.as_deref() {
                Some(sluice_engine::OVERRIDE_PLAN) => directory
                    .override_of(&check.limit, &check.key, now)
                    .unwrap_or_else(|| Arc::clone(base)),
                plan => Arc::clone(base.for_plan(plan)),
            };
            if let Ok(check) = Check::new(limit, check.key.as_str(), check.estimate) {
                request.checks.push(check);
                costs.push(actual);
            }
        }
        let windows = vec![true; request.window_count()];
        Settlement {
            hold: Some(hold),
            request,
            actual: costs,
            windows,
        }
    }
}

/// Lower-case hex, without a `format!` per byte: this runs twice per reservation.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_engine::{Limit, LimitSpec};

    fn request() -> DecisionRequest {
        let limit = Arc::new(
            Limit::new("tokens", LimitSpec::new(vec!["100/hour".parse().unwrap()])).unwrap(),
        );
        DecisionRequest {
            checks: vec![Check::new(limit, "user:1", 40).unwrap()],
            dry_run: false,
        }
    }

    #[test]
    fn a_token_reads_back_as_the_same_ticket_and_hold() {
        let ticket = Ticket::new(&request(), Duration::from_secs(60)).unwrap();
        let (token, hold) = ticket.encode();
        assert!(token.starts_with("rsv1."));
        let (back, back_hold) = Ticket::decode(&token).unwrap();
        assert_eq!(back, ticket);
        assert_eq!(back_hold, hold);
    }

    #[test]
    fn a_changed_token_has_another_digest_and_garbage_is_refused() {
        let ticket = Ticket::new(&request(), Duration::from_secs(60)).unwrap();
        let (_, hold) = ticket.encode();
        let mut forged = ticket.clone();
        forged.checks[0].estimate = 1_000_000;
        let (token, forged_hold) = forged.encode();
        assert_eq!(forged_hold.id, hold.id);
        assert_ne!(forged_hold.digest, hold.digest, "the store will refuse it");
        assert_eq!(Ticket::decode(&token).unwrap().1, forged_hold);
        for bad in ["", "rsv1.", "rsv1.!!!", "abc", "rsv1.e30"] {
            assert_eq!(
                Ticket::decode(bad).unwrap_err(),
                TicketError::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn two_tickets_never_share_an_id() {
        let a = Ticket::new(&request(), Duration::from_secs(1)).unwrap();
        let b = Ticket::new(&request(), Duration::from_secs(1)).unwrap();
        assert_ne!(a.id, b.id);
    }
}
