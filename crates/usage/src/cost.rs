//! A call's [`Usage`] in tokens, and the [`CostWeights`] that make it one cost.

use std::num::NonZeroU64;

use serde::Deserialize;

/// The tokens one call used, as its upstream reported them (or as an [`crate::Estimate`]
/// expects them).
///
/// Every format is brought to the same meaning: `input_tokens` counts every prompt token,
/// cached or not, and `cached_input_tokens` says how many of them were read from the
/// provider's prompt cache. (OpenAI reports it that way; Anthropic reports the uncached,
/// cache-write and cache-read tokens apart, and they are added up here.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, the cached ones included.
    pub input_tokens: u64,
    /// Generated tokens, reasoning tokens included (every provider counts them in).
    pub output_tokens: u64,
    /// How many of `input_tokens` were read from the prompt cache, where the answer says.
    pub cached_input_tokens: Option<u64>,
    /// The total the upstream reported, or input + output where it reported none.
    pub total_tokens: u64,
}

impl Usage {
    /// A usage of `input_tokens` and `output_tokens`, nothing cached, total their sum.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Usage {
            input_tokens,
            output_tokens,
            cached_input_tokens: None,
            total_tokens: input_tokens.saturating_add(output_tokens),
        }
    }
}

/// What each kind of token costs, in the budget's unit: every weight 1 (the default)
/// makes the budget a number of tokens; weights in micro-dollars per token make it money
/// (input 3 and output 15 for $3 and $15 per million tokens).
///
/// The cost of a [`Usage`] is
///
/// ```text
/// ceil((uncached input tokens * input + cached input tokens * cached_input
///       + output tokens * output + per_request) / divisor)
/// ```
///
/// Prices below one unit per token need the divisor: $0.15 per million tokens is 150
/// with a divisor of 1000, in micro-dollars. Rounding up charges at most one unit too much
/// per call, never too little.
///
/// The arithmetic is done in 128 bits and saturates: a cost too large for a `u64` is
/// `u64::MAX`, which no budget admits, rather than a wrapped small number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WeightsConfig")]
pub struct CostWeights {
    /// Per input token that was not read from the cache. Default 1.
    pub input: u64,
    /// Per output token. Default 1.
    pub output: u64,
    /// Per input token read from the cache; `None` (the default) charges them as
    /// `input`. Anthropic's cache writes are charged as `input` in any case.
    pub cached_input: Option<u64>,
    /// Added once per call, whatever its tokens. Default 0.
    pub per_request: u64,
    /// What the weighted sum is divided by, rounding up. Default 1.
    pub divisor: NonZeroU64,
}

impl Default for CostWeights {
    /// Tokens: input, cached input and output tokens count 1 each.
    fn default() -> Self {
        CostWeights {
            input: 1,
            output: 1,
            cached_input: None,
            per_request: 0,
            divisor: NonZeroU64::MIN,
        }
    }
}

impl CostWeights {
    /// The cost of `usage` in the budget's unit (see [`CostWeights`] for the formula).
    pub fn cost(&self, usage: &Usage) -> u64 {
        let cached = usage
            .cached_input_tokens
            .unwrap_or(0)
            .min(usage.input_tokens);
        let uncached = usage.input_tokens - cached;
        let cached_weight = self.cached_input.unwrap_or(self.input);
        let sum = weighted(uncached, self.input)
            .saturating_add(weighted(cached, cached_weight))
            .saturating_add(weighted(usage.output_tokens, self.output))
            .saturating_add(u128::from(self.per_request));
        let cost = sum.div_ceil(u128::from(self.divisor.get()));
        u64::try_from(cost).unwrap_or(u64::MAX)
    }

    /// Whether these weights make sense for a budget: refuses weights that make every
    /// call free. (Deserializing checks this; a config built by hand should call it.)
    pub fn check(&self) -> Result<(), WeightsError> {
        let all_zero = self.input == 0
            && self.output == 0
            && self.cached_input.unwrap_or(0) == 0
            && self.per_request == 0;
        if all_zero {
            return Err(WeightsError::AllZero);
        }
        Ok(())
    }
}

/// `tokens * weight`, which cannot overflow 128 bits.
fn weighted(tokens: u64, weight: u64) -> u128 {
    u128::from(tokens) * u128::from(weight)
}

/// Why a set of [`CostWeights`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    /// `divisor: 0`.
    #[error(
        "cost weights: divisor must be at least 1 (the weighted sum is divided by it); \
         use 1, or leave it out, for no division"
    )]
    ZeroDivisor,
    /// Every weight 0: every call would be free, and the budget would never run out.
    #[error(
        "cost weights: input, output, cached_input and per_request are all 0, so every call \
         would cost nothing; set input and output to 1 to count tokens, or to a price per token"
    )]
    AllZero,
}

/// The config's spelling of [`CostWeights`]: every field optional, checked on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsConfig {
    #[serde(default = "one")]
    input: u64,
    #[serde(default = "one")]
    output: u64,
    #[serde(default)]
    cached_input: Option<u64>,
    #[serde(default)]
    per_request: u64,
    #[serde(default = "one")]
    divisor: u64,
}

fn one() -> u64 {
    1
}

impl TryFrom<WeightsConfig> for CostWeights {
    type Error = WeightsError;

    fn try_from(config: WeightsConfig) -> Result<Self, WeightsError> {
        let divisor = NonZeroU64::new(config.divisor).ok_or(WeightsError::ZeroDivisor)?;
        let weights = CostWeights {
            input: config.input,
            output: config.output,
            cached_input: config.cached_input,
            per_request: config.per_request,
            divisor,
        };
        weights.check()?;
        Ok(weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cached: Option<u64>, output: u64) -> Usage {
        Usage {
            cached_input_tokens: cached,
            ..Usage::new(input, output)
        }
    }

    fn weights(input: u64, output: u64, cached_input: Option<u64>) -> CostWeights {
        CostWeights {
            input,
            output,
            cached_input,
            ..CostWeights::default()
        }
    }

    #[test]
    fn default_weights_count_tokens() {
        let w = CostWeights::default();
        assert_eq!(w.cost(&usage(120, None, 30)), 150);
        // Cached input tokens are charged as input unless weighted apart.
        assert_eq!(w.cost(&usage(120, Some(100), 30)), 150);
        assert_eq!(w.cost(&Usage::default()), 0);
    }

    #[test]
    fn prices_in_micro_dollars() {
        // $3 / $15 per million tokens, cache reads at $0.30: 0.3 micro-dollars a token,
        // so the weights are in tenths of a micro-dollar and the divisor brings them back.
        let w = CostWeights {
            input: 30,
            output: 150,
            cached_input: Some(3),
            per_request: 0,
            divisor: NonZeroU64::new(10).unwrap(),
        };
        // 1000 uncached * 30 + 9000 cached * 3 + 500 * 150 = 132_000 tenths.
        assert_eq!(w.cost(&usage(10_000, Some(9_000), 500)), 13_200);
        // 1 output token: 150 tenths = 15.
        assert_eq!(w.cost(&usage(0, None, 1)), 15);
        // 1 cached token: 3 tenths, rounded up to 1 micro-dollar.
        assert_eq!(w.cost(&usage(1, Some(1), 0)), 1);
    }

    #[test]
    fn per_request_is_added_once() {
        let w = CostWeights {
            per_request: 7,
            ..weights(3, 15, None)
        };
        assert_eq!(w.cost(&usage(10, None, 2)), 30 + 30 + 7);
        assert_eq!(w.cost(&Usage::default()), 7);
    }

    #[test]
    fn cached_beyond_input_is_capped_at_input() {
        // An upstream reporting more cached than input tokens charges no negative input.
        let w = weights(10, 1, Some(1));
        assert_eq!(w.cost(&usage(5, Some(8), 0)), 5);
    }

    #[test]
    fn huge_costs_saturate_instead_of_wrapping() {
        let w = weights(u64::MAX, u64::MAX, None);
        assert_eq!(w.cost(&usage(u64::MAX, None, u64::MAX)), u64::MAX);
        assert_eq!(w.cost(&usage(2, None, 0)), u64::MAX);
        // Large intermediate sums still divide exactly when the result fits.
        let w = CostWeights {
            divisor: NonZeroU64::new(1 << 32).unwrap(),
            ..weights(1 << 40, 0, None)
        };
        assert_eq!(w.cost(&usage(1 << 30, None, 0)), 1 << 38);
    }

    #[test]
    fn config_fills_defaults_and_refuses_nonsense() {
        let parse = |json: &str| serde_json::from_str::<CostWeights>(json);
        assert_eq!(parse("{}").unwrap(), CostWeights::default());
        let w = parse(r#"{"input": 3, "output": 15, "per_request": 100}"#).unwrap();
        assert_eq!(
            (w.input, w.output, w.cached_input, w.per_request),
            (3, 15, None, 100)
        );
        assert_eq!(w.divisor.get(), 1);

        let err = parse(r#"{"divisor": 0}"#).unwrap_err().to_string();
        assert!(err.contains("divisor must be at least 1"), "{err}");
        let err = parse(r#"{"input": 0, "output": 0}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("all 0") && err.contains("set input and output"),
            "{err}"
        );
        let err = parse(r#"{"ouput": 15}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `ouput`"), "{err}");
        assert!(parse(r#"{"input": -1}"#).is_err());
        // Cached reads alone may cost something: not all zero.
        assert!(parse(r#"{"input": 0, "output": 0, "cached_input": 1}"#).is_ok());
    }
}
