//! Rates: "N requests per period", written `N/unit` or `N/Munit`.
//!
//! Units are `second`, `minute`, `hour`, `day` (also `s`, `m`, `h`, `d` and the
//! plurals). A multiplier sits between the slash and the unit: `100/10s` is a
//! hundred every ten seconds. Periods are whole seconds, so windows align to
//! the Unix epoch exactly.
//!
//! `month` (also `months`, `mo`) is the UTC calendar month: `N/month` resets at
//! 00:00 UTC on the 1st, like a billing period, however long the month is. It takes no
//! multiplier (no `N/3months`), and only the fixed window can count it (see
//! [`crate::calendar`] and `Window::new`).

use std::fmt;
use std::str::FromStr;

/// The longest period a rate may have: 366 days, so every counter expires within a year.
pub const MAX_PERIOD_SECS: u64 = 366 * 86_400;

/// The largest quota a rate may have. Keeps every intermediate product inside `i64`
/// microseconds and inside the 53-bit integers that store scripts (Lua) compute with.
pub const MAX_QUOTA: u64 = 1_000_000_000;

/// The nominal length of a calendar month in seconds: the mean Gregorian month
/// (365.2425 days / 12). Only for what reports a window's length as a number
/// ([`Rate::period_secs`]); calendar-month windows end at month starts.
pub const MEAN_MONTH_SECS: u64 = 2_629_746;

/// A quota of `quota` per period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    quota: u64,
    period: Period,
}

/// How long a rate's windows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    /// A whole number of seconds, windows aligned to the Unix epoch.
    Seconds(u64),
    /// The UTC calendar month: from 00:00 UTC on the 1st to 00:00 UTC on the next 1st.
    CalendarMonth,
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
        "rate {0:?}: unknown unit; use second, minute, hour, day or month (or s, m, h, d, mo), optionally with a multiplier as in 100/10s"
    )]
    BadUnit(String),
    /// The multiplier is zero or the period is too long.
    #[error("rate {0:?}: the period must be from 1 second to 366 days")]
    BadPeriod(String),
    /// A multiplier on the calendar-month unit.
    #[error(
        "rate {0:?}: calendar months take no multiplier; write N/month (one window per UTC calendar month)"
    )]
    MonthMultiplier(String),
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
        Ok(Rate {
            quota,
            period: Period::Seconds(period_secs),
        })
    }

    /// A rate of `quota` per UTC calendar month (`N/month`); the quota must be in range.
    pub fn per_calendar_month(quota: u64) -> Result<Self, RateError> {
        if quota == 0 || quota > MAX_QUOTA {
            return Err(RateError::BadQuota(format!("{quota}/month")));
        }
        Ok(Rate {
            quota,
            period: Period::CalendarMonth,
        })
    }

    /// How many units of cost the window admits.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// How long the windows are.
    pub fn period(&self) -> Period {
        self.period
    }

    /// Whether the windows are UTC calendar months (`N/month`).
    pub fn is_calendar_month(&self) -> bool {
        self.period == Period::CalendarMonth
    }

    /// The window length in seconds; for a calendar month, the nominal
    /// [`MEAN_MONTH_SECS`] (what `/v1/limits` and the `RateLimit-Policy` header report).
    pub fn period_secs(&self) -> u64 {
        match self.period {
            Period::Seconds(secs) => secs,
            Period::CalendarMonth => MEAN_MONTH_SECS,
        }
    }

    /// The window length in microseconds; for a calendar month, the nominal
    /// [`MEAN_MONTH_SECS`]: window arithmetic must use the month's real bounds instead
    /// (see [`crate::calendar`]).
    pub fn period_micros(&self) -> i64 {
        // Bounded by MAX_PERIOD_SECS, far inside i64.
        (self.period_secs() * 1_000_000) as i64
    }

    /// The period as counter names write it: the seconds (`60`), or `1mo` for a calendar
    /// month. Never the same for two periods, and never changed for existing ones, so
    /// counters survive upgrades.
    pub fn period_tag(&self) -> String {
        match self.period {
            Period::Seconds(secs) => secs.to_string(),
            Period::CalendarMonth => "1mo".to_string(),
        }
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
            "mo" | "month" | "months" => {
                if multiplier != 1 {
                    return Err(RateError::MonthMultiplier(text.to_string()));
                }
                return Rate::per_calendar_month(quota)
                    .map_err(|_| RateError::BadQuota(text.to_string()));
            }
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

/// Canonical form: `5/minute` for a single unit, `100/10s` for a multiple, `100/month`.
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.quota;
        let secs = match self.period {
            Period::Seconds(secs) => secs,
            Period::CalendarMonth => return write!(f, "{q}/month"),
        };
        match secs {
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
        assert!(
            message.contains("second, minute, hour, day or month"),
            "{message}"
        );
    }

    #[test]
    fn calendar_months_parse_display_and_tag_apart_from_seconds() {
        for text in ["100/month", "100/months", "100/mo", " 100 / 1month "] {
            let r = rate(text);
            assert_eq!(r, Rate::per_calendar_month(100).unwrap(), "{text}");
            assert!(r.is_calendar_month());
            assert_eq!(r.to_string(), "100/month");
            assert_eq!(r.period_tag(), "1mo");
        }
        // `m` stays the minute.
        assert!(!rate("5/m").is_calendar_month());
        // A month is not 30 or 31 days, nor the nominal mean month in seconds.
        let month = rate("1/month");
        for other in ["1/30d", "1/31d", &format!("1/{MEAN_MONTH_SECS}s")] {
            assert_ne!(month.period(), rate(other).period(), "{other}");
            assert_ne!(month.period_tag(), rate(other).period_tag(), "{other}");
        }
        assert_eq!(month.period_secs(), MEAN_MONTH_SECS);
        assert_eq!(rate("5/minute").period_tag(), "60");
        for text in ["5/2months", "5/0mo", "5/12mo"] {
            let error = text.parse::<Rate>().unwrap_err();
            assert!(matches!(error, RateError::MonthMultiplier(_)), "{text}");
            assert!(error.to_string().contains("write N/month"), "{error}");
        }
        assert!(matches!(
            "0/month".parse::<Rate>(),
            Err(RateError::BadQuota(_))
        ));
        assert!(matches!(
            "1000000001/month".parse::<Rate>(),
            Err(RateError::BadQuota(_))
        ));
    }
}
