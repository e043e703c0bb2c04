//! The usage of an answer, or of a stream's event, too large to keep whole.
//!
//! A reader keeps a bounded amount of an answer (`ReaderLimits`), and a client can make
//! an answer larger than that: the Responses API's final event echoes the request's
//! `instructions` and `tools` and the whole output, and `top_logprobs` adds about a
//! kilobyte per token to a chat answer. Dropping such an answer's usage settled the call
//! at its estimate, whatever the upstream reported. Every format puts its `usage`
//! object last, so the reader keeps the first [`HEAD_BYTES`] (where an event names its
//! `type`) and the last [`TAIL_BYTES`] of what it could not keep, and reads the usage
//! from there.
//!
//! A client cannot plant a `"usage":{` of its own in that tail: inside a JSON string
//! every `"` is escaped, so the bytes `"usage":` occur only as a member's name.

use serde_json::{Value, json};

/// How much of the start of an over-long event is kept, to read its `type`.
pub(crate) const HEAD_BYTES: usize = 4 << 10;
/// How much of the end of an over-long event or answer is kept, to read its usage.
pub(crate) const TAIL_BYTES: usize = 64 << 10;

/// The first and last bytes of something too long to keep.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    head: Vec<u8>,
    /// Up to twice [`TAIL_BYTES`], cut back to it when it grows past that.
    tail: Vec<u8>,
}

impl Tail {
    /// Takes in the next bytes.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let room = HEAD_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..room.min(bytes.len())]);
        if bytes.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
            return;
        }
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * TAIL_BYTES {
            self.tail.drain(..self.tail.len() - TAIL_BYTES);
        }
    }

    /// Takes in what `other` kept of what followed: its start and its end (where they
    /// overlap, bytes repeat in between; only the end is read for usage).
    pub(crate) fn append(&mut self, other: &Tail) {
        self.push(b"\n");
        self.push(&other.head);
        self.push(other.end());
    }

    /// Whether what was taken in starts with `prefix`.
    pub(crate) fn starts_with(&self, prefix: &[u8]) -> bool {
        self.head.starts_with(prefix)
    }

    /// The last [`TAIL_BYTES`] taken in.
    fn end(&self) -> &[u8] {
        &self.tail[self.tail.len().saturating_sub(TAIL_BYTES)..]
    }

    /// A stream event's usage, shaped as the event that carried it: the event's `type`
    /// from its start (where providers write it), the last `usage` object from its end.
    /// Without a known type, shaped as both a chat chunk and a Responses event, which
    /// each format reads its own way.
    pub(crate) fn event_usage(&self) -> Option<Value> {
        let usage = last_usage_object(self.end())?;
        Some(match event_type(&self.head).as_deref() {
            Some("message_start") => json!({"type": "message_start", "message": {"usage": usage}}),
            Some(kind @ "message_delta") => json!({"type": kind, "usage": usage}),
            Some(kind) if kind.starts_with("response.") => {
                json!({"type": kind, "response": {"usage": usage}})
            }
            _ => json!({"usage": usage, "response": {"usage": usage}}),
        })
    }

    /// A whole answer's usage, shaped as an answer with a top-level `usage`.
    pub(crate) fn answer_usage(&self) -> Option<Value> {
        last_usage_object(self.end()).map(|usage| json!({"usage": usage}))
    }
}

/// The last `"usage": {...}` object in `bytes` that is whole there.
fn last_usage_object(bytes: &[u8]) -> Option<Value> {
    let finder = memchr::memmem::FinderRev::new(b"\"usage\"");
    let mut end = bytes.len();
    while let Some(at) = finder.rfind(&bytes[..end]) {
        end = at;
        let rest = skip_space(&bytes[at + b"\"usage\"".len()..]);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = skip_space(rest);
        if rest.first() != Some(&b'{') {
            continue;
        }
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
        if let Some(Ok(usage @ Value::Object(_))) = values.next() {
            return Some(usage);
        }
    }
    None
}

/// The event's `"type"` as its start names it.
fn event_type(head: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(head, b"\"type\"")?;
    let rest = skip_space(&head[at + b"\"type\"".len()..]);
    let rest = skip_space(rest.strip_prefix(b":")?);
    serde_json::Deserializer::from_slice(rest)
        .into_iter::<String>()
        .next()?
        .ok()
}

fn skip_space(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(parts: &[&[u8]]) -> Tail {
        let mut tail = Tail::default();
        for part in parts {
            tail.push(part);
        }
        tail
    }

    #[test]
    fn the_last_whole_usage_object_is_read_from_the_end() {
        let filler = "x".repeat(300_000);
        let answer = format!(
            r#"{{"output":"{filler}","note":"he said \"usage\": {{\"input_tokens\": 1}}","usage":{{"input_tokens":7,"output_tokens":9}}}}"#
        );
        let tail = tail_of(&[answer.as_bytes()]);
        assert_eq!(
            tail.answer_usage(),
            Some(json!({"usage": {"input_tokens": 7, "output_tokens": 9}}))
        );
        // Fed in small pieces, the same.
        let pieces: Vec<&[u8]> = answer.as_bytes().chunks(1000).collect();
        assert_eq!(tail_of(&pieces).answer_usage(), tail.answer_usage());
        // No usage, or one cut off at the end: none.
        assert_eq!(tail_of(&[filler.as_bytes()]).answer_usage(), None);
        let cut = &answer.as_bytes()[..answer.len() - 5];
        assert_eq!(tail_of(&[cut]).answer_usage(), None);
    }

    #[test]
    fn an_events_usage_keeps_the_shape_of_its_type() {
        let filler = "y".repeat(200_000);
        let event = format!(
            r#"{{"type":"response.completed","response":{{"instructions":"{filler}","usage":{{"input_tokens":3,"output_tokens":4}}}}}}"#
        );
        assert_eq!(
            tail_of(&[event.as_bytes()]).event_usage(),
            Some(
                json!({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}})
            )
        );
        let chunk = format!(r#"{{"choices":[{{"x":"{filler}"}}],"usage":{{"prompt_tokens":1}}}}"#);
        assert_eq!(
            tail_of(&[chunk.as_bytes()]).event_usage(),
            Some(
                json!({"usage": {"prompt_tokens": 1}, "response": {"usage": {"prompt_tokens": 1}}})
            )
        );
    }
}
