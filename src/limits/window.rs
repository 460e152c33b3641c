//! The windows limits count in: the UTC minute, the UTC day and the UTC calendar month, from a time in
//! milliseconds since the epoch, each with a name (for counter keys) and its end (for `Retry-After`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// The windows a moment falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Minutes since the epoch.
    pub minute: u64,
    /// Days since the epoch.
    pub day: u64,
    /// `year * 12 + month - 1`.
    pub month: u64,
    /// The moment itself, in milliseconds since the epoch.
    pub now_ms: u64,
}

impl Windows {
    /// The windows of `now_ms`.
    pub fn at(now_ms: u64) -> Self {
        let day = now_ms / DAY_MS;
        let (year, month, _) = civil(day);
        Self { minute: now_ms / MINUTE_MS, day, month: year * 12 + month - 1, now_ms }
    }

    /// The windows of the system clock's now.
    pub fn now() -> Self {
        Self::at(now_ms())
    }

    /// The minute window's name: `m29412345`.
    pub fn minute_name(&self) -> String {
        format!("m{}", self.minute)
    }

    /// The day window's name: `d2026-12-02`.
    pub fn day_name(&self) -> String {
        let (y, m, d) = civil(self.day);
        format!("d{y:04}-{m:02}-{d:02}")
    }

    /// The month window's name: `M2026-12`.
    pub fn month_name(&self) -> String {
        format!("M{:04}-{:02}", self.month / 12, self.month % 12 + 1)
    }

    /// How long until the minute ends.
    pub fn minute_left(&self) -> Duration {
        Duration::from_millis(MINUTE_MS - self.now_ms % MINUTE_MS)
    }

    /// The day's end (the next UTC midnight), in milliseconds since the epoch.
    pub fn day_end_ms(&self) -> u64 {
        (self.day + 1) * DAY_MS
    }

    /// The month's start (midnight of its first day), in milliseconds since the epoch.
    pub fn month_start_ms(&self) -> u64 {
        days_from_civil(self.month / 12, self.month % 12 + 1, 1) * DAY_MS
    }

    /// The month's end (midnight of the next month's first day), in milliseconds since the epoch.
    pub fn month_end_ms(&self) -> u64 {
        let next = self.month + 1;
        days_from_civil(next / 12, next % 12 + 1, 1) * DAY_MS
    }
}

/// Milliseconds since the epoch, by the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ms` since the epoch as RFC 3339 to the second (`2026-12-03T00:00:00Z`).
pub fn rfc3339(ms: u64) -> String {
    let (y, m, d) = civil(ms / DAY_MS);
    let s = (ms % DAY_MS) / 1000;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`, for days
/// on or after the epoch).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date on or after it (`days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_utc_calendar_windows() {
        // 2026-12-31T23:59:30.500Z
        let w = Windows::at(1_798_761_570_500);
        assert_eq!(w.day_name(), "d2026-12-31");
        assert_eq!(w.month_name(), "M2026-12");
        assert_eq!(w.minute_left(), Duration::from_millis(29_500));
        assert_eq!(rfc3339(w.day_end_ms()), "2027-01-01T00:00:00Z");
        assert_eq!(rfc3339(w.month_end_ms()), "2027-01-01T00:00:00Z");
        assert_eq!(rfc3339(w.month_start_ms()), "2026-12-01T00:00:00Z");
        // A leap day, and the month after it.
        let leap = Windows::at(days_from_civil(2028, 2, 29) * DAY_MS + 1);
        assert_eq!(leap.day_name(), "d2028-02-29");
        assert_eq!(rfc3339(leap.month_end_ms()), "2028-03-01T00:00:00Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        for days in [0, 59, 365, 10_957, 20_789, 2_932_896] {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
