//! How a counter is laid out in the keyspace.
//!
//! Key: the counter name, a zero byte, the key (`chat_user:g60\0user:42`). Counter
//! names never contain a zero byte, so the first one splits the two.
//!
//! Value, little-endian: a format byte (1), `expires_at` (i64 µs since the epoch),
//! a state tag (`g`, `f`, `s`, `c`) and the state's fields as i64/u64. Two
//! variable-length values share the layout's first nine bytes (so the compaction
//! filter reads every expiry alike): a concurrency window's holders, tag `C` then
//! 24 bytes per holder (id as u128, expiry as i64); and a reservation's hold record
//! under [`HOLDS`], tag `h`, a settled byte and the digest.

use sluice_engine::{Micros, State};
use sluice_store_memory::Holder;

/// The counter name hold records are kept under (`~` never appears in a limit name):
/// key `~hold\0<id in hex>`.
pub(crate) const HOLDS: &str = "~hold";

/// The value format written by this version.
const FORMAT: u8 = 1;
/// The longest value: format, expiry, tag, three fields.
pub(crate) const MAX_VALUE: usize = 1 + 8 + 1 + 3 * 8;

/// The keyspace key of `counter` on `key`.
pub(crate) fn key(counter: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(counter.len() + 1 + key.len());
    out.extend_from_slice(counter.as_bytes());
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out
}

/// Splits a keyspace key into counter name and key.
pub(crate) fn split_key(raw: &[u8]) -> Option<(&str, &str)> {
    let at = raw.iter().position(|&b| b == 0)?;
    let counter = std::str::from_utf8(&raw[..at]).ok()?;
    let key = std::str::from_utf8(&raw[at + 1..]).ok()?;
    Some((counter, key))
}

/// An encoded value: a fixed buffer and the length used.
#[derive(Clone, Copy)]
pub(crate) struct Value {
    buf: [u8; MAX_VALUE],
    len: usize,
}

impl Value {
    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Encodes a state and its expiry.
pub(crate) fn value(state: &State, expires_at: Micros) -> Value {
    let mut v = Value {
        buf: [0; MAX_VALUE],
        len: 0,
    };
    let mut put = |bytes: &[u8]| {
        v.buf[v.len..v.len + bytes.len()].copy_from_slice(bytes);
        v.len += bytes.len();
    };
    put(&[FORMAT]);
    put(&expires_at.to_le_bytes());
    match *state {
        State::Gcra { tat } => {
            put(b"g");
            put(&tat.to_le_bytes());
        }
        State::Fixed { start, count } => {
            put(b"f");
            put(&start.to_le_bytes());
            put(&count.to_le_bytes());
        }
        State::Sliding {
            start,
            count,
            previous,
        } => {
            put(b"s");
            put(&start.to_le_bytes());
            put(&count.to_le_bytes());
            put(&previous.to_le_bytes());
        }
        // A concurrency window's holders are journaled with the disk store's holds; the
        // state alone is only what they add up to.
        State::Concurrency { open, free_at } => {
            put(b"c");
            put(&free_at.to_le_bytes());
            put(&open.to_le_bytes());
        }
    }
    v
}

/// When an encoded value expires; `None` when it cannot be read.
pub(crate) fn expires_at(raw: &[u8]) -> Option<Micros> {
    match raw {
        [FORMAT, rest @ ..] => Some(Micros::from_le_bytes(rest.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

/// Decodes a value into its state and expiry; `None` when it cannot be read.
pub(crate) fn decode(raw: &[u8]) -> Option<(State, Micros)> {
    let expires_at = expires_at(raw)?;
    let tag = *raw.get(9)?;
    let field = |i: usize| -> Option<[u8; 8]> { raw.get(10 + 8 * i..18 + 8 * i)?.try_into().ok() };
    let state = match (tag, raw.len()) {
        (b'g', 18) => State::Gcra {
            tat: i64::from_le_bytes(field(0)?),
        },
        (b'f', 26) => State::Fixed {
            start: i64::from_le_bytes(field(0)?),
            count: u64::from_le_bytes(field(1)?),
        },
        (b's', 34) => State::Sliding {
            start: i64::from_le_bytes(field(0)?),
            count: u64::from_le_bytes(field(1)?),
            previous: u64::from_le_bytes(field(2)?),
        },
        (b'c', 26) => State::Concurrency {
            free_at: i64::from_le_bytes(field(0)?),
            open: u64::from_le_bytes(field(1)?),
        },
        _ => return None,
    };
    Some((state, expires_at))
}

/// Encodes a concurrency window's holders, expiring with the last of them.
pub(crate) fn holders_value(holders: &[Holder], expires_at: Micros) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 24 * holders.len());
    out.push(FORMAT);
    out.extend_from_slice(&expires_at.to_le_bytes());
    out.push(b'C');
    for (id, at) in holders {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
    }
    out
}

/// Encodes a reservation's hold record.
pub(crate) fn hold_value(digest: &str, expires_at: Micros, settled: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(11 + digest.len());
    out.push(FORMAT);
    out.extend_from_slice(&expires_at.to_le_bytes());
    out.push(b'h');
    out.push(u8::from(settled));
    out.extend_from_slice(digest.as_bytes());
    out
}

/// What a stored value holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    /// A counter's state.
    Counter(State),
    /// A concurrency window's holders.
    Holders(Vec<Holder>),
    /// A reservation's hold: its digest and whether it was settled.
    Hold { digest: String, settled: bool },
}

/// Decodes any value this version writes, with its expiry.
pub(crate) fn decode_any(raw: &[u8]) -> Option<(Stored, Micros)> {
    match raw.get(9)? {
        b'C' => {
            let expires_at = expires_at(raw)?;
            let rest = &raw[10..];
            if !rest.len().is_multiple_of(24) {
                return None;
            }
            let holders = rest
                .chunks_exact(24)
                .map(|h| {
                    let id = u128::from_le_bytes(h[..16].try_into().ok()?);
                    let at = i64::from_le_bytes(h[16..].try_into().ok()?);
                    Some((id, at))
                })
                .collect::<Option<Vec<_>>>()?;
            Some((Stored::Holders(holders), expires_at))
        }
        b'h' => {
            let expires_at = expires_at(raw)?;
            let settled = *raw.get(10)? == 1;
            let digest = std::str::from_utf8(raw.get(11..)?).ok()?.to_string();
            Some((Stored::Hold { digest, settled }, expires_at))
        }
        _ => decode(raw).map(|(state, at)| (Stored::Counter(state), at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        let states = [
            State::Gcra { tat: -5 },
            State::Fixed {
                start: 1_700_000_000_000_000,
                count: u64::MAX,
            },
            State::Sliding {
                start: 42,
                count: 7,
                previous: 9,
            },
        ];
        for (i, state) in states.iter().enumerate() {
            let encoded = value(state, 1_000 + i as i64);
            assert_eq!(decode(encoded.as_bytes()), Some((*state, 1_000 + i as i64)));
            assert_eq!(expires_at(encoded.as_bytes()), Some(1_000 + i as i64));
        }
        assert_eq!(decode(&[2, 0, 0]), None, "unknown format");
        assert_eq!(
            decode(&value(&states[1], 0).as_bytes()[..20]),
            None,
            "truncated"
        );
    }

    #[test]
    fn holders_and_holds_round_trip() {
        let holders = vec![(u128::MAX - 3, 17), (5, 1_800_000_000_000_000)];
        let raw = holders_value(&holders, 99);
        assert_eq!(decode_any(&raw), Some((Stored::Holders(holders), 99)));
        assert_eq!(expires_at(&raw), Some(99));
        let raw = hold_value("abc123", 7, true);
        assert_eq!(
            decode_any(&raw),
            Some((
                Stored::Hold {
                    digest: "abc123".into(),
                    settled: true
                },
                7
            ))
        );
        assert_eq!(decode_any(&holders_value(&[], 1)[..9]), None, "truncated");
    }

    #[test]
    fn keys_split_at_the_first_zero() {
        let k = key("chat:g60", "user\u{0}42");
        assert_eq!(split_key(&k), Some(("chat:g60", "user\u{0}42")));
        assert_eq!(split_key(b"no-separator"), None);
    }
}
