//! The usage formats, by their config names, and where in an answer each one finds the
//! tokens: in a whole JSON answer ([`answer_usage`]) or in a stream's events
//! ([`StreamUsage`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::Usage;

/// Where an upstream reports the tokens a call used.
///
/// Its config spellings are `openai`, `anthropic`, `openai_responses`, `auto`, or a JSON
/// pointer (RFC 6901) such as `/usage/total_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum UsageFormat {
    /// OpenAI-compatible Chat Completions and Completions (`openai`): the answer's
    /// `usage` with `prompt_tokens`, `completion_tokens`, `total_tokens` and
    /// `prompt_tokens_details.cached_tokens`. A stream carries it in the chunk whose `usage`
    /// is not null, the last one before `[DONE]`, and only when the request asked for it
    /// (`stream_options.include_usage`); a stream without it has no known usage.
    OpenAi,
    /// Anthropic Messages (`anthropic`): the answer's `usage` with `input_tokens`,
    /// `output_tokens`, `cache_creation_input_tokens` and `cache_read_input_tokens`; the
    /// three input counts are added up. A stream reports it in the `message_start` event
    /// (`message.usage`: the input, and usually 1 output token) and in `message_delta`
    /// events (`usage`, whose counts are running totals): the latest value of each count
    /// wins, so a stream cut short is known up to what it had reported.
    Anthropic,
    /// The OpenAI Responses API (`openai_responses`): the answer's `usage` with
    /// `input_tokens`, `output_tokens`, `total_tokens` and
    /// `input_tokens_details.cached_tokens`. A stream carries it as `response.usage` in
    /// its last event (`response.completed`, or `response.incomplete` / `response.failed`).
    OpenAiResponses,
    /// Any of the three above (`auto`), told apart by the answer's content.
    Auto,
    /// A JSON pointer to one whole number in the JSON answer, or in any event of a stream
    /// (the last one found wins). The number is counted as output tokens: it has no split
    /// into input and output, and output is the dearer kind, so a budget in money is not
    /// undercharged.
    Pointer(JsonPointer),
}

impl UsageFormat {
    /// The config spelling.
    pub fn as_str(&self) -> &str {
        match self {
            UsageFormat::OpenAi => "openai",
            UsageFormat::Anthropic => "anthropic",
            UsageFormat::OpenAiResponses => "openai_responses",
            UsageFormat::Auto => "auto",
            UsageFormat::Pointer(pointer) => pointer.as_str(),
        }
    }
}

impl FromStr for UsageFormat {
    type Err = FormatError;

    fn from_str(name: &str) -> Result<Self, FormatError> {
        match name {
            "openai" => Ok(UsageFormat::OpenAi),
            "anthropic" => Ok(UsageFormat::Anthropic),
            "openai_responses" => Ok(UsageFormat::OpenAiResponses),
            "auto" => Ok(UsageFormat::Auto),
            _ if name.starts_with('/') => JsonPointer::new(name).map(UsageFormat::Pointer),
            _ => Err(FormatError::Unknown(name.to_owned())),
        }
    }
}

impl TryFrom<String> for UsageFormat {
    type Error = FormatError;

    fn try_from(name: String) -> Result<Self, FormatError> {
        name.parse()
    }
}

impl fmt::Display for UsageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JSON pointer (RFC 6901) that is well formed: it starts with `/`, and every `~` in it
/// is `~0` (a `~` in a key) or `~1` (a `/` in a key). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer(Arc<str>);

impl JsonPointer {
    /// `text` as a pointer, or what is wrong with it.
    pub fn new(text: &str) -> Result<Self, FormatError> {
        if !text.starts_with('/') {
            return Err(FormatError::Unknown(text.to_owned()));
        }
        let mut after_tilde = text.split('~').skip(1);
        if after_tilde.any(|rest| !rest.starts_with(['0', '1'])) {
            return Err(FormatError::BadEscape(text.to_owned()));
        }
        Ok(JsonPointer(text.into()))
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a usage format name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Neither a known name nor a JSON pointer.
    #[error(
        "unknown usage format {0:?}: use openai, anthropic, openai_responses, auto or a JSON \
         pointer such as /usage/total_tokens"
    )]
    Unknown(String),
    /// A JSON pointer with a `~` that is not `~0` or `~1`.
    #[error(
        "usage format {0:?} is not a valid JSON pointer: a ~ must be followed by 0 or 1; \
         write ~0 for a ~ and ~1 for a / inside a key"
    )]
    BadEscape(String),
}

/// The usage a whole JSON answer reports in `format`, if it reports one.
pub(crate) fn answer_usage(format: &UsageFormat, answer: &Value) -> Option<Usage> {
    let usage = answer.get("usage").and_then(Value::as_object);
    match format {
        UsageFormat::OpenAi => usage.and_then(openai_usage),
        UsageFormat::Anthropic | UsageFormat::OpenAiResponses => usage.and_then(input_output_usage),
        UsageFormat::Auto => {
            usage.and_then(|usage| openai_usage(usage).or_else(|| input_output_usage(usage)))
        }
        UsageFormat::Pointer(pointer) => pointer_usage(answer, pointer),
    }
}

impl UsageFormat {
    /// Whether an event's JSON text can hold what this format reads. Every built-in
    /// format reads a member named `usage`, so an event without those bytes reports
    /// nothing and is not parsed: a long stream is almost all content chunks, and
    /// parsing each one cost more than the rest of proxying it. A name could be written
    /// with escapes (`"us\u0061ge"`), which no provider does; it would only hide usage
    /// the upstream itself reports, which it can leave out anyway. A JSON pointer may
    /// name anything, so its events are all parsed.
    pub(crate) fn may_hold_usage(&self, event: &[u8]) -> bool {
        match self {
            UsageFormat::Pointer(_) => true,
            UsageFormat::OpenAi
            | UsageFormat::Anthropic
            | UsageFormat::OpenAiResponses
            | UsageFormat::Auto => memchr::memmem::find(event, b"usage").is_some(),
        }
    }
}

/// What a stream's events have reported so far.
#[derive(Debug, Default)]
pub(crate) struct StreamUsage {
    /// The usage as of the latest event that said anything about it.
    latest: Option<Usage>,
    /// Anthropic's usage counts as its events have updated them; each event may carry
    /// only some of them (`message_delta` often has only `output_tokens`).
    anthropic: Map<String, Value>,
    /// An Anthropic `message_start` reported usage and no `message_delta` has since:
    /// its output count is the first token's, not the answer's.
    awaiting_delta: bool,
}

impl StreamUsage {
    /// What is known so far.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.latest
    }

    /// The usage the stream reported as its whole: `None` while an Anthropic stream has
    /// sent only its `message_start` counts (input, and 1 output token), which a client
    /// that leaves before the `message_delta` would otherwise settle at, whatever it
    /// streamed. The other formats report usage once, at their end.
    pub(crate) fn final_usage(&self) -> Option<Usage> {
        if self.awaiting_delta {
            return None;
        }
        self.latest
    }

    /// Takes in one event's JSON data.
    pub(crate) fn on_event(&mut self, format: &UsageFormat, event: &Value) {
        match format {
            UsageFormat::OpenAi => {
                self.openai(event);
            }
            UsageFormat::Anthropic => {
                self.anthropic(event);
            }
            UsageFormat::OpenAiResponses => {
                self.responses(event);
            }
            // Anthropic's events first: a `message_delta` has a top-level `usage` that
            // the OpenAI rule would take for the whole usage.
            UsageFormat::Auto => {
                if !self.anthropic(event) && !self.responses(event) {
                    self.openai(event);
                }
            }
            UsageFormat::Pointer(pointer) => {
                if let Some(usage) = pointer_usage(event, pointer) {
                    self.latest = Some(usage);
                }
            }
        }
    }

    /// A chunk with a non-null `usage`. Whether the event had usage.
    fn openai(&mut self, event: &Value) -> bool {
        let usage = event.get("usage").and_then(Value::as_object);
        self.replace(usage.and_then(openai_usage))
    }

    /// `response.usage` of `response.completed` and the other final events.
    fn responses(&mut self, event: &Value) -> bool {
        let usage = event.pointer("/response/usage").and_then(Value::as_object);
        self.replace(usage.and_then(input_output_usage))
    }

    /// `message_start`'s `message.usage` and `message_delta`'s `usage`, merged.
    fn anthropic(&mut self, event: &Value) -> bool {
        let usage = match event.get("type").and_then(Value::as_str) {
            Some("message_start") => event.pointer("/message/usage"),
            Some("message_delta") => event.get("usage"),
            _ => None,
        };
        let Some(counts) = usage.and_then(Value::as_object) else {
            return false;
        };
        self.awaiting_delta = event.get("type").and_then(Value::as_str) == Some("message_start");
        for (name, count) in counts {
            if !count.is_null() {
                self.anthropic.insert(name.clone(), count.clone());
            }
        }
        self.replace(input_output_usage(&self.anthropic))
    }

    fn replace(&mut self, usage: Option<Usage>) -> bool {
        if usage.is_some() {
            self.latest = usage;
        }
        usage.is_some()
    }
}

/// `{prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details.cached_tokens}`.
/// An embeddings answer has no `completion_tokens`: they count as 0.
fn openai_usage(usage: &Map<String, Value>) -> Option<Usage> {
    let input = count(usage, "prompt_tokens");
    let output = count(usage, "completion_tokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    let mut found = Usage::new(input.unwrap_or(0), output.unwrap_or(0));
    found.cached_input_tokens = details(usage, "prompt_tokens_details", "cached_tokens");
    found.total_tokens = count(usage, "total_tokens").unwrap_or(found.total_tokens);
    Some(found)
}

/// Anthropic's and the Responses API's usage object: `input_tokens` and `output_tokens`.
/// Anthropic's `input_tokens` leaves out the prompt cache's writes and reads, reported
/// apart and added here; the Responses API's counts them in and reports the reads in
/// `input_tokens_details.cached_tokens`. Neither has the other's fields, so one reading
/// serves both.
fn input_output_usage(usage: &Map<String, Value>) -> Option<Usage> {
    let uncached = count(usage, "input_tokens");
    let output = count(usage, "output_tokens");
    if uncached.is_none() && output.is_none() {
        return None;
    }
    let cache_writes = count(usage, "cache_creation_input_tokens").unwrap_or(0);
    let cache_reads = count(usage, "cache_read_input_tokens");
    let input = uncached
        .unwrap_or(0)
        .saturating_add(cache_writes)
        .saturating_add(cache_reads.unwrap_or(0));
    let mut found = Usage::new(input, output.unwrap_or(0));
    found.cached_input_tokens =
        cache_reads.or_else(|| details(usage, "input_tokens_details", "cached_tokens"));
    found.total_tokens = count(usage, "total_tokens").unwrap_or(found.total_tokens);
    Some(found)
}

/// The number at `pointer`, as output tokens.
fn pointer_usage(value: &Value, pointer: &JsonPointer) -> Option<Usage> {
    value
        .pointer(pointer.as_str())
        .and_then(whole)
        .map(|tokens| Usage::new(0, tokens))
}

fn count(usage: &Map<String, Value>, name: &str) -> Option<u64> {
    usage.get(name).and_then(whole)
}

fn details(usage: &Map<String, Value>, object: &str, name: &str) -> Option<u64> {
    usage.get(object)?.get(name).and_then(whole)
}

/// A whole number ≥ 0: `12`, or `12.0` from an upstream that writes floats. Fractions,
/// negatives and floats beyond 2^53 (no longer exact) are not counts.
pub(crate) fn whole(value: &Value) -> Option<u64> {
    const EXACT: f64 = (1u64 << 53) as f64;
    value.as_u64().or_else(|| {
        let float = value.as_f64()?;
        (float.fract() == 0.0 && (0.0..=EXACT).contains(&float)).then_some(float as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_parse_and_print_back() {
        for name in [
            "openai",
            "anthropic",
            "openai_responses",
            "auto",
            "/usage/total_tokens",
        ] {
            let format: UsageFormat = name.parse().unwrap();
            assert_eq!(format.to_string(), name);
        }
        let from_config: UsageFormat = serde_json::from_str(r#""/a~1b/c~0d""#).unwrap();
        assert_eq!(from_config.as_str(), "/a~1b/c~0d");
    }

    #[test]
    fn bad_names_say_what_to_write() {
        let err = "opnai".parse::<UsageFormat>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown usage format \"opnai\": use openai, anthropic, openai_responses, auto or \
             a JSON pointer such as /usage/total_tokens"
        );
        assert!(matches!(
            "".parse::<UsageFormat>(),
            Err(FormatError::Unknown(_))
        ));
        assert!(matches!(
            "OpenAI".parse::<UsageFormat>(),
            Err(FormatError::Unknown(_))
        ));
        assert!(matches!(
            JsonPointer::new("usage"),
            Err(FormatError::Unknown(_))
        ));
        let err = "/usage/~2".parse::<UsageFormat>().unwrap_err();
        assert!(matches!(err, FormatError::BadEscape(_)));
        assert!(err.to_string().contains("write ~0 for a ~"), "{err}");
        assert!("/usage~".parse::<UsageFormat>().is_err());
        let err = serde_json::from_str::<UsageFormat>(r#""antropic""#).unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown usage format \"antropic\"")
        );
    }

    #[test]
    fn counts_are_whole_numbers() {
        assert_eq!(whole(&json!(12)), Some(12));
        assert_eq!(whole(&json!(12.0)), Some(12));
        assert_eq!(whole(&json!(12.5)), None);
        assert_eq!(whole(&json!(-1)), None);
        assert_eq!(whole(&json!(1e300)), None);
        assert_eq!(whole(&json!("12")), None);
        assert_eq!(whole(&json!(null)), None);
    }

    #[test]
    fn each_format_reads_only_its_own_usage() {
        let openai = json!({"usage": {"prompt_tokens": 5, "completion_tokens": 7}});
        let anthropic =
            json!({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 7}});
        assert_eq!(
            answer_usage(&UsageFormat::OpenAi, &openai),
            Some(Usage::new(5, 7))
        );
        assert_eq!(answer_usage(&UsageFormat::OpenAi, &anthropic), None);
        assert_eq!(answer_usage(&UsageFormat::Anthropic, &openai), None);
        assert_eq!(
            answer_usage(&UsageFormat::Anthropic, &anthropic),
            Some(Usage::new(5, 7))
        );
        assert_eq!(
            answer_usage(&UsageFormat::Auto, &openai),
            Some(Usage::new(5, 7))
        );
        assert_eq!(
            answer_usage(&UsageFormat::Auto, &anthropic),
            Some(Usage::new(5, 7))
        );
        assert_eq!(
            answer_usage(&UsageFormat::Auto, &json!({"usage": null})),
            None
        );
        assert_eq!(answer_usage(&UsageFormat::Auto, &json!([1, 2])), None);
    }
}
