//! UTC calendar months, for `N/month` rates: the start of the month holding an
//! instant, and the start of the month after it.
//!
//! Written by hand from Howard Hinnant's `days_from_civil` and `civil_from_days`
//! (<https://howardhinnant.github.io/date_algorithms.html>): proleptic Gregorian, exact
//! integer arithmetic, any year. The Redis script (`store-redis/src/state.lua`) runs the
//! same arithmetic; PostgreSQL uses its own calendar (`store-postgres/src/schema.sql`).

use crate::clock::Micros;

/// Microseconds in a day.
const DAY: Micros = 86_400 * 1_000_000;

/// Days since 1970-01-01 of the date `year-month-day` (month 1 to 12, day 1 to 31).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    // Years start in March, so the leap day is the last day of the year.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400; // [0, 399]
    let month_from_march = if month > 2 { month - 3 } else { month + 9 }; // [0, 11]
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1; // [0, 365]
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date (year, month 1 to 12, day 1 to 31) `days` days after 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097; // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1; // [1, 31]
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    }; // [1, 12]
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// The first microsecond of the UTC calendar month holding `at`.
pub fn month_start(at: Micros) -> Micros {
    let (year, month, _) = civil_from_days(at.div_euclid(DAY));
    days_from_civil(year, month, 1).saturating_mul(DAY)
}

/// The first microsecond of the UTC calendar month after the one holding `at`: where a
/// calendar-month window that holds `at` ends.
pub fn next_month_start(at: Micros) -> Micros {
    let (year, month, _) = civil_from_days(at.div_euclid(DAY));
    let (year, month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    days_from_civil(year, month, 1).saturating_mul(DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since the epoch of dates checked with `date -u -d ... +%s`.
    const KNOWN: [((i64, u32, u32), i64); 10] = [
        ((1970, 1, 1), 0),
        ((1969, 12, 31), -86_400),
        ((2000, 2, 29), 951_782_400),
        ((2000, 3, 1), 951_868_800),
        ((2024, 10, 4), 1_728_000_000),
        ((2025, 1, 1), 1_735_689_600),
        ((2028, 2, 29), 1_835_395_200),
        ((2100, 3, 1), 4_107_542_400),
        ((1900, 3, 1), -2_203_891_200),
        ((1600, 1, 1), -11_676_096_000),
    ];

    #[test]
    fn known_dates_convert_both_ways() {
        for ((y, m, d), secs) in KNOWN {
            let days = secs / 86_400;
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
        }
    }

    /// Every day for 1200 years, through the 1700/1800/1900/2100 non-leap centuries and
    /// the 1600/2000/2400 leap ones, is the day after the one before.
    #[test]
    fn consecutive_days_are_consecutive_dates() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_length = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let first = days_from_civil(1600, 1, 1);
        let (mut y, mut m, mut d) = (1600, 1, 1);
        for days in first..days_from_civil(2800, 1, 1) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            assert_eq!(days_from_civil(y, m, d), days);
            d += 1;
            if d > month_length(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    fn at(y: i64, m: u32, d: u32) -> Micros {
        days_from_civil(y, m, d) * DAY
    }

    #[test]
    fn month_boundaries() {
        // The last microsecond of January 31 is still January; the next is February.
        let feb = at(2025, 2, 1);
        assert_eq!(month_start(feb - 1), at(2025, 1, 1));
        assert_eq!(next_month_start(feb - 1), feb);
        assert_eq!(month_start(feb), feb);
        assert_eq!(next_month_start(feb), at(2025, 3, 1));
        // December runs into January of the next year.
        let new_year = at(2026, 1, 1);
        assert_eq!(month_start(new_year - 1), at(2025, 12, 1));
        assert_eq!(next_month_start(new_year - 1), new_year);
        assert_eq!(month_start(new_year), new_year);
        // February 2028 has 29 days; 2100's has 28.
        assert_eq!(next_month_start(at(2028, 2, 29)) - at(2028, 2, 1), 29 * DAY);
        assert_eq!(month_start(at(2028, 2, 29) + DAY - 1), at(2028, 2, 1));
        assert_eq!(next_month_start(at(2100, 2, 28)) - at(2100, 2, 1), 28 * DAY);
        // Before the epoch too.
        assert_eq!(month_start(-1), at(1969, 12, 1));
        assert_eq!(next_month_start(-1), 0);
    }
}
