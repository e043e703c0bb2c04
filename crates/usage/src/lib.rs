//! What an LLM call cost, read from its request and its answer.
//!
//! The reverse proxy reserves an estimated cost before it forwards a request to an
//! LLM-calling upstream, and settles the actual cost once the answer has passed through.
//! This crate is the pure part of that: no HTTP, no async, no I/O.
//!
//! - [`estimate`] reads the request body: the output tokens it may produce (`max_tokens`
//!   and its kin) and a rough size of its prompt, and whether it asked for a stream.
//! - [`UsageReader`] is fed the answer's body chunk by chunk as it passes through
//!   unchanged (a JSON answer or a `text/event-stream`), in bounded memory, and tells the
//!   [`Usage`] the upstream reported, or what it has reported so far when the stream is
//!   cut short.
//! - [`UsageFormat`] says where the usage is: OpenAI Chat Completions, Anthropic
//!   Messages, OpenAI Responses, any of them (`auto`), or a JSON pointer to one number.
//! - [`CostWeights`] turns a [`Usage`] (or an [`Estimate`]) into one cost in the budget's
//!   unit: tokens (every weight 1) or money (weights in micro-dollars per token, say).
//!
//! ```
//! use sluice_usage::{CostWeights, EstimateConfig, ReaderLimits, UsageFormat, UsageReader};
//!
//! let weights = CostWeights::default();
//! let request = br#"{"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi there"}]}"#;
//! let estimate = sluice_usage::estimate(request, &EstimateConfig::default())?;
//! // The prompt's text, "user" and "Hi there", is 12 bytes: about 3 tokens; plus 100 out.
//! assert_eq!(estimate.cost(&weights), 103);
//!
//! let format: UsageFormat = "openai".parse()?;
//! let mut reader = UsageReader::new(format, Some("application/json"), ReaderLimits::default());
//! reader.feed(br#"{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}"#);
//! let usage = reader.finish().expect("the answer reports its usage");
//! assert_eq!(weights.cost(&usage), 21);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cost;
mod estimate;
mod format;
mod reader;
mod sse;
mod tail;

pub use cost::{CostWeights, Usage, WeightsError};
pub use estimate::{Estimate, EstimateConfig, EstimateError, estimate};
pub use format::{FormatError, JsonPointer, UsageFormat};
pub use reader::{ReaderLimits, UsageReader};
