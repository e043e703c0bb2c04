//! [`UsageReader`]: the usage an answer reports, read from its body as it passes through.

use serde_json::Value;

use crate::Usage;
use crate::format::{StreamUsage, UsageFormat, answer_usage};
use crate::sse::{Event, SseParser};
use crate::tail::Tail;

/// How much of an answer a [`UsageReader`] keeps at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderLimits {
    /// The largest JSON answer that is read (default 4 MiB). A JSON answer has to be
    /// whole before it can be parsed, so it is kept up to this size; past it the reader
    /// lets go of it and keeps only its end, where its `usage` is (see `tail`).
    pub max_json_bytes: usize,
    /// The longest line, and the most data one event may have, in a stream (default
    /// 1 MiB). A stream's reader keeps one line and one event's data, each at most this
    /// long; of a longer one it keeps the start and the end, where the event's type and
    /// usage are.
    pub max_event_bytes: usize,
}

impl Default for ReaderLimits {
    fn default() -> Self {
        ReaderLimits {
            max_json_bytes: 4 << 20,
            max_event_bytes: 1 << 20,
        }
    }
}

/// Reads the usage an upstream reports in its answer, fed the body chunk by chunk as the
/// proxy passes it on unchanged.
///
/// The answer's `Content-Type` decides how: `text/event-stream` is read as server-sent
/// events, event by event, keeping at most one line and one event (so a stream of any
/// length costs bounded memory); `application/json` (or any `…+json`) is kept whole, up to
/// [`ReaderLimits::max_json_bytes`], and parsed at [`finish`](Self::finish). Any other
/// type, or none, reports no usage and keeps nothing.
///
/// The body must be the bytes as decoded: a compressed answer (`Content-Encoding: gzip`)
/// reads as no usage.
#[derive(Debug)]
pub struct UsageReader {
    format: UsageFormat,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Stream {
        parser: SseParser,
        usage: StreamUsage,
    },
    Json {
        buffer: Vec<u8>,
        max: usize,
        too_long: bool,
        /// The answer's end, once it went over `max`.
        end: Tail,
    },
    Other,
}

impl UsageReader {
    /// A reader for one answer of `content_type` (the header's value, parameters and all),
    /// looking for `format`.
    pub fn new(format: UsageFormat, content_type: Option<&str>, limits: ReaderLimits) -> Self {
        let media_type = content_type
            .map(|value| value.split_once(';').map_or(value, |(essence, _)| essence))
            .unwrap_or("")
            .trim();
        let body = if media_type.eq_ignore_ascii_case("text/event-stream") {
            Body::Stream {
                parser: SseParser::new(limits.max_event_bytes),
                usage: StreamUsage::default(),
            }
        } else if is_json(media_type) {
            Body::Json {
                buffer: Vec::new(),
                max: limits.max_json_bytes,
                too_long: false,
                end: Tail::default(),
            }
        } else {
            Body::Other
        };
        UsageReader { format, body }
    }

    /// Takes in the body's next bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        match &mut self.body {
            Body::Stream { parser, usage } => {
                parser.feed(bytes, &mut |event| on_event(&self.format, usage, event));
            }
            Body::Json {
                buffer,
                max,
                too_long,
                end,
            } => {
                if *too_long {
                    end.push(bytes);
                    return;
                }
                if buffer.len() + bytes.len() > *max {
                    *too_long = true;
                    end.push(buffer);
                    end.push(bytes);
                    *buffer = Vec::new();
                } else {
                    buffer.extend_from_slice(bytes);
                }
            }
            Body::Other => {}
        }
    }

    /// The usage known so far: a stream's as of its latest event that reported any (for
    /// Anthropic, the input and the output so far, from the first event on; for OpenAI,
    /// nothing until the usage chunk at the end). A JSON answer's is known only once it
    /// is whole, at [`finish`](Self::finish): `None` until then.
    pub fn usage(&self) -> Option<Usage> {
        match &self.body {
            Body::Stream { usage, .. } => usage.usage(),
            Body::Json { .. } | Body::Other => None,
        }
    }

    /// The body ended (or was cut short): the usage it reported as its whole, if any. An
    /// Anthropic stream cut before its `message_delta` has reported only its input and
    /// first output token ([`usage`](Self::usage) has those): that is not the answer's
    /// usage, so `None`, and its caller falls back to the estimate.
    pub fn finish(mut self) -> Option<Usage> {
        match &mut self.body {
            Body::Stream { parser, usage } => {
                parser.finish(&mut |event| on_event(&self.format, usage, event));
                usage.final_usage()
            }
            Body::Json {
                buffer,
                too_long: false,
                ..
            } => {
                let answer = serde_json::from_slice::<Value>(buffer).ok()?;
                answer_usage(&self.format, &answer)
            }
            // A pointer may name anything, not only a `usage` at the end.
            Body::Json { end, .. } if !matches!(self.format, UsageFormat::Pointer(_)) => {
                answer_usage(&self.format, &end.answer_usage()?)
            }
            Body::Json { .. } | Body::Other => None,
        }
    }

    /// Whether part of the body was too long to read ([`ReaderLimits`]): a JSON answer
    /// over its cap, or a stream's line or event over its cap. For logs: it explains an
    /// unknown usage.
    pub fn over_limit(&self) -> bool {
        match &self.body {
            Body::Stream { parser, .. } => parser.dropped(),
            Body::Json { too_long, .. } => *too_long,
            Body::Other => false,
        }
    }
}

/// `application/json` or a structured `…+json` type such as `application/vnd.x+json`.
fn is_json(media_type: &str) -> bool {
    let suffix = media_type.get(media_type.len().saturating_sub("+json".len())..);
    media_type.eq_ignore_ascii_case("application/json")
        || suffix.is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json"))
}

/// One event: its data, JSON or something else (OpenAI's `[DONE]`) that says nothing;
/// or, for an event too long to keep, the usage its end holds.
fn on_event(format: &UsageFormat, usage: &mut StreamUsage, event: Event<'_>) {
    let data = match event {
        Event::Data(data) => data,
        Event::Oversize(_) if matches!(format, UsageFormat::Pointer(_)) => return,
        Event::Oversize(long) => {
            if let Some(event) = long.event_usage() {
                usage.on_event(format, &event);
            }
            return;
        }
    };
    if !format.may_hold_usage(data) {
        return;
    }
    if let Ok(event) = serde_json::from_slice::<Value>(data) {
        usage.on_event(format, &event);
    }
}
