//! Rates: "N requests per period", written `N/unit` or `N/Munit`.
//!
//! Units are `second`, `minute`, `hour`, `day` (also `s`, `m`, `h`, `d` and the
//! plurals). A multiplier sits between the slash and the unit: `100/10s` is a
//! hundred every ten seconds. Periods are whole seconds, so windows align to
//! the Unix epoch exactly.

use std::fmt;
use std::str::FromStr;

/// The longest period a rate may have: 366 days, so every counter expires within a year.
pub const MAX_PERIOD_SECS: u64 = 366 * 86_400;

/// The largest quota a rate may have. Keeps every intermediate product inside `i64`
/// microseconds and inside the 53-bit integers that store scripts (Lua) compute with.
pub const MAX_QUOTA: u64 = 1_000_000_000;

/// A quota of `quota` per `period_secs` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    quota: u64,
    period_secs: u64,
}

/// Why a rate string was rejected; the message says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// No `/` between quota and unit.
    #[error("rate {0:?} has no '/': write it as N/unit, e.g. 5/minute, 100/10s or 50/day")]
    MissingSlash(String),
    /// The quota is not a whole number of at least 1.
    #[error("rate {0:?}: the quota before '/' must be a whole number from 1 to {MAX_QUOTA}")]
    BadQuota(String),
    /// The unit is not one of the known ones.
    #[error(
        "rate {0:?}: unknown unit; use second, minute, hour or day (or s, m, h, d), optionally with a multiplier as in 100/10s"
    )]
    BadUnit(String),
    /// The multiplier is zero or the period is too long.
    #[error("rate {0:?}: the period must be from 1 second to 366 days")]
    BadPeriod(String),
}

impl Rate {
    /// A rate of `quota` per `period_secs` seconds; both must be in range.
    pub fn new(quota: u64, period_secs: u64) -> Result<Self, RateError> {
        let text = || format!("{quota}/{period_secs}s");
        if quota == 0 || quota > MAX_QUOTA {
            return Err(RateError::BadQuota(text()));
        }
        if period_secs == 0 || period_secs > MAX_PERIOD_SECS {
            return Err(RateError::BadPeriod(text()));
        }
        Ok(Rate { quota, period_secs })
    }

    /// How many units of cost the window admits.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// The window length in seconds.
    pub fn period_secs(&self) -> u64 {
        self.period_secs
    }

    /// The window length in microseconds.
    pub fn period_micros(&self) -> i64 {
        // Bounded by MAX_PERIOD_SECS, far inside i64.
        (self.period_secs * 1_000_000) as i64
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        let (quota, per) = text
            .split_once('/')
            .ok_or_else(|| RateError::MissingSlash(text.to_string()))?;
        let quota: u64 = quota
            .trim()
            .parse()
            .map_err(|_| RateError::BadQuota(text.to_string()))?;
        let per = per.trim();
        let digits = per.bytes().take_while(u8::is_ascii_digit).count();
        let (multiplier, unit) = per.split_at(digits);
        let multiplier: u64 = if multiplier.is_empty() {
            1
        } else {
            multiplier
                .parse()
                .map_err(|_| RateError::BadPeriod(text.to_string()))?
        };
        let unit_secs = match unit.trim() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600,
            "d" | "day" | "days" => 86_400,
            _ => return Err(RateError::BadUnit(text.to_string())),
        };
        let period = multiplier
            .checked_mul(unit_secs)
            .ok_or_else(|| RateError::BadPeriod(text.to_string()))?;
        Rate::new(quota, period).map_err(|error| match error {
            RateError::BadQuota(_) => RateError::BadQuota(text.to_string()),
            _ => RateError::BadPeriod(text.to_string()),
        })
    }
}

/// Canonical form: `5/minute` for a single unit, `100/10s` for a multiple.
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.quota;
        match self.period_secs {
            1 => write!(f, "{q}/second"),
            60 => write!(f, "{q}/minute"),
            3_600 => write!(f, "{q}/hour"),
            86_400 => write!(f, "{q}/day"),
            p if p % 86_400 == 0 => write!(f, "{q}/{}d", p / 86_400),
            p if p % 3_600 == 0 => write!(f, "{q}/{}h", p / 3_600),
            p if p % 60 == 0 => write!(f, "{q}/{}m", p / 60),
            p => write!(f, "{q}/{p}s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn parses_units_multipliers_and_aliases() {
        assert_eq!(rate("5/minute"), Rate::new(5, 60).unwrap());
        assert_eq!(rate("5/m"), Rate::new(5, 60).unwrap());
        assert_eq!(rate("100/10s"), Rate::new(100, 10).unwrap());
        assert_eq!(rate("50/day"), Rate::new(50, 86_400).unwrap());
        assert_eq!(rate(" 60 / hour "), Rate::new(60, 3_600).unwrap());
        assert_eq!(rate("10/2 hours"), Rate::new(10, 7_200).unwrap());
    }

    #[test]
    fn displays_canonically() {
        assert_eq!(rate("5/m").to_string(), "5/minute");
        assert_eq!(rate("100/10s").to_string(), "100/10s");
        assert_eq!(rate("1/120s").to_string(), "1/2m");
        assert_eq!(rate("7/2d").to_string(), "7/2d");
    }

    #[test]
    fn rejects_malformed_rates_with_a_reason() {
        assert!(matches!(
            "5 per minute".parse::<Rate>(),
            Err(RateError::MissingSlash(_))
        ));
        assert!(matches!(
            "0/minute".parse::<Rate>(),
            Err(RateError::BadQuota(_))
        ));
        assert!(matches!(
            "-1/minute".parse::<Rate>(),
            Err(RateError::BadQuota(_))
        ));
        assert!(matches!(
            "1.5/minute".parse::<Rate>(),
            Err(RateError::BadQuota(_))
        ));
        assert!(matches!(
            "5/minit".parse::<Rate>(),
            Err(RateError::BadUnit(_))
        ));
        assert!(matches!(
            "5/0s".parse::<Rate>(),
            Err(RateError::BadPeriod(_))
        ));
        assert!(matches!(
            "5/400d".parse::<Rate>(),
            Err(RateError::BadPeriod(_))
        ));
        assert!(matches!(
            "5/99999999999999999999d".parse::<Rate>(),
            Err(RateError::BadPeriod(_))
        ));
        let message = "5/minit".parse::<Rate>().unwrap_err().to_string();
        assert!(message.contains("second, minute, hour or day"), "{message}");
    }
}
