//! [`estimate`]: what a call may cost, read from its request body before it is forwarded,
//! so that the proxy can reserve it and settle the actual usage afterwards.

use serde_json::Value;

use crate::format::whole;
use crate::{CostWeights, Usage};

/// The request fields whose text is the prompt: Chat Completions' and Anthropic's
/// `messages`, the Responses API's `input` and `instructions`, Completions' `prompt`,
/// Anthropic's `system`.
const PROMPT_FIELDS: [&str; 5] = ["messages", "input", "instructions", "prompt", "system"];

/// Keys inside the prompt whose strings are not text but a payload (an image, a file,
/// audio, in base64 or by URL): providers bill those by other rules, and counting their
/// bytes as text would make one image look like a book.
const NOT_TEXT: [&str; 4] = ["data", "url", "image_url", "file_data"];

/// The request fields that cap the output, by API: Anthropic's and the older OpenAI
/// field, Chat Completions' newer one, the Responses API's.
const MAX_OUTPUT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// How to estimate what the request does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EstimateConfig {
    /// The output tokens to expect when the request sets no maximum (default 1024).
    pub default_output_tokens: u64,
}

impl Default for EstimateConfig {
    fn default() -> Self {
        EstimateConfig {
            default_output_tokens: 1024,
        }
    }
}

/// What a request may use, before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The prompt's size: the bytes of its text divided by 4, rounded up. An
    /// approximation (about four characters of English a token is the usual rule of
    /// thumb), not a tokenizer: code, other languages and tool definitions (not counted)
    /// make it off either way.
    pub input_tokens: u64,
    /// The request's output maximum (the largest of `max_tokens`,
    /// `max_completion_tokens` and `max_output_tokens` it sets), or
    /// [`EstimateConfig::default_output_tokens`] without one; times `n`, the number of
    /// choices asked for, where it is more than 1.
    pub output_tokens: u64,
    /// Whether the request asked for a stream (`"stream": true`).
    pub stream: bool,
    /// Whether it asked for the usage in its stream (`stream_options.include_usage`):
    /// an OpenAI Chat Completions stream reports its usage only then.
    pub include_usage: bool,
}

impl Estimate {
    /// The estimate as a [`Usage`], nothing cached.
    pub fn usage(&self) -> Usage {
        Usage::new(self.input_tokens, self.output_tokens)
    }

    /// The estimate's cost under `weights`.
    pub fn cost(&self, weights: &CostWeights) -> u64 {
        weights.cost(&self.usage())
    }
}

/// Why a request body gives no estimate.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// The body does not parse as JSON.
    #[error("the request body is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// The body is JSON but not an object, as every LLM API's request is.
    #[error("the request body is a JSON {0}, not an object with the request's fields")]
    NotAnObject(&'static str),
}

/// Estimates what the request in `body` (its JSON) may use.
pub fn estimate(body: &[u8], config: &EstimateConfig) -> Result<Estimate, EstimateError> {
    let request: Value = serde_json::from_slice(body)?;
    let Value::Object(fields) = &request else {
        return Err(EstimateError::NotAnObject(kind(&request)));
    };
    let text_bytes: u64 = PROMPT_FIELDS
        .iter()
        .filter_map(|name| fields.get(*name))
        .map(text_bytes)
        .sum();
    let max_output = MAX_OUTPUT_FIELDS
        .iter()
        .filter_map(|name| fields.get(*name).and_then(whole))
        .max();
    let choices = fields.get("n").and_then(whole).unwrap_or(1).max(1);
    let is_true = |value: Option<&Value>| value == Some(&Value::Bool(true));
    Ok(Estimate {
        input_tokens: text_bytes.div_ceil(4),
        output_tokens: max_output
            .unwrap_or(config.default_output_tokens)
            .saturating_mul(choices),
        stream: is_true(fields.get("stream")),
        include_usage: is_true(request.pointer("/stream_options/include_usage")),
    })
}

/// The bytes of the strings in `value`, but for [`NOT_TEXT`] payloads. (Recursion is
/// bounded: serde_json refuses JSON nested more than 128 deep.)
fn text_bytes(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.len() as u64,
        Value::Array(items) => items.iter().map(text_bytes).sum(),
        Value::Object(fields) => fields
            .iter()
            .filter(|(name, _)| !NOT_TEXT.contains(&name.as_str()))
            .map(|(_, value)| text_bytes(value))
            .sum(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU64;

    fn estimated(body: &str) -> Estimate {
        estimate(body.as_bytes(), &EstimateConfig::default()).unwrap()
    }

    #[test]
    fn chat_completions_request() {
        let body = r#"{
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"}}
                ]}
            ],
            "max_completion_tokens": 300,
            "stream": true,
            "stream_options": {"include_usage": true}
        }"#;
        // Text: "system" 6 + "Be brief." 9 + "user" 4 + "text" 4 + 24 + "image_url" 9 = 56
        // bytes; the image's URL is not text.
        let estimate = estimated(body);
        assert_eq!(estimate.input_tokens, 14);
        assert_eq!(estimate.output_tokens, 300);
        assert!(estimate.stream && estimate.include_usage);
        assert_eq!(estimate.cost(&CostWeights::default()), 314);
    }

    #[test]
    fn anthropic_messages_request() {
        let body = r#"{
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": [{"type": "text", "text": "You are a terse assistant."}],
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRgABAQAAAQABAAD"}},
                {"type": "text", "text": "Describe it"}
            ]}],
            "stream": true
        }"#;
        // "text" 4 + 26, "user" 4, "image" 5 + "base64" 6 + "image/jpeg" 10, "text" 4 + 11.
        let estimate = estimated(body);
        assert_eq!(estimate.input_tokens, 70_u64.div_ceil(4));
        assert_eq!(estimate.output_tokens, 1024);
        assert!(estimate.stream && !estimate.include_usage);
        // $3 / $15 per million tokens, in micro-dollars.
        let weights = CostWeights {
            input: 3,
            output: 15,
            ..CostWeights::default()
        };
        assert_eq!(estimate.cost(&weights), 18 * 3 + 1024 * 15);
    }

    #[test]
    fn responses_request() {
        let body = r#"{"model": "o4-mini", "instructions": "Answer in French.", "input": "Hello, world", "max_output_tokens": 500}"#;
        let estimate = estimated(body);
        assert_eq!(estimate.input_tokens, (17 + 12_u64).div_ceil(4));
        assert_eq!(estimate.output_tokens, 500);
        assert!(!estimate.stream);
    }

    #[test]
    fn no_maximum_falls_back_to_the_configured_output() {
        let config = EstimateConfig {
            default_output_tokens: 256,
        };
        let body = br#"{"prompt": "abcd", "stream": false}"#;
        let estimate = estimate(body, &config).unwrap();
        assert_eq!((estimate.input_tokens, estimate.output_tokens), (1, 256));
        // A maximum that is no count is no maximum.
        let estimate = estimate_of(br#"{"max_tokens": "many"}"#, &config);
        assert_eq!(estimate.output_tokens, 256);
        // Several choices produce several outputs.
        let estimate = estimate_of(br#"{"n": 3, "max_tokens": 100}"#, &config);
        assert_eq!(estimate.output_tokens, 300);
        let estimate = estimate_of(br#"{"n": 0, "max_tokens": 100}"#, &config);
        assert_eq!(estimate.output_tokens, 100);
        // The largest maximum wins when a request sets two.
        let estimate = estimate_of(
            br#"{"max_tokens": 10, "max_completion_tokens": 20}"#,
            &config,
        );
        assert_eq!(estimate.output_tokens, 20);
        // No prompt at all.
        assert_eq!(estimate.input_tokens, 0);
    }

    fn estimate_of(body: &[u8], config: &EstimateConfig) -> Estimate {
        estimate(body, config).unwrap()
    }

    #[test]
    fn huge_maximums_saturate() {
        let estimate = estimated(r#"{"max_tokens": 18446744073709551615, "n": 2}"#);
        assert_eq!(estimate.output_tokens, u64::MAX);
        let weights = CostWeights {
            divisor: NonZeroU64::new(2).unwrap(),
            ..CostWeights::default()
        };
        assert_eq!(estimate.cost(&weights), u64::MAX / 2 + 1);
    }

    #[test]
    fn bodies_that_are_no_request_are_errors() {
        let config = EstimateConfig::default();
        let err = estimate(b"{\"messages\": [", &config).unwrap_err();
        assert!(matches!(err, EstimateError::NotJson(_)));
        assert!(
            err.to_string().starts_with("the request body is not JSON"),
            "{err}"
        );
        let err = estimate(b"[1]", &config).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the request body is a JSON array, not an object with the request's fields"
        );
    }
}
