//! The hours compared: CloudWatch sums `AWS/BedrockMantle` tokens in periods of an hour, so both sides are summed
//! over the same whole hours. The ends asked for are rounded down to the hour (an hour only partly asked for is
//! left out whole, never half counted on one side), and by default the window ends at the last whole hour before
//! [`SETTLE`] ago: metrics arrive in CloudWatch minutes late, and an hour still filling in would read as `missing`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CloudWatch's period for the sums read: an hour (data points of that period are kept 455 days).
pub const PERIOD: Duration = Duration::from_secs(3600);

/// How long after an hour ends its metrics are taken to be complete in CloudWatch.
pub const SETTLE: Duration = Duration::from_secs(15 * 60);

/// Whole periods, `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The first instant in it, on a period boundary.
    pub start: SystemTime,
    /// The first instant after it, on a period boundary.
    pub end: SystemTime,
}

impl Window {
    /// The whole periods between `since` and `until`, each rounded down to a period boundary; an error if that
    /// leaves none.
    pub fn aligned(since: SystemTime, until: SystemTime) -> anyhow::Result<Self> {
        let (start, end) = (floor(since), floor(until));
        if end <= start {
            anyhow::bail!(
                "no whole hour between {} and {} (CloudWatch sums by the hour: the window's ends are rounded down to \
                 the hour)",
                humantime::format_rfc3339_seconds(since),
                humantime::format_rfc3339_seconds(until)
            );
        }
        Ok(Self { start, end })
    }

    /// The `lookback` (whole hours) ending at the last whole hour before [`SETTLE`] before `now`: what the
    /// gateway's scheduled run compares.
    pub fn lookback(now: SystemTime, lookback: Duration) -> Self {
        let end = floor(now.checked_sub(SETTLE).unwrap_or(UNIX_EPOCH));
        let start = floor(end.checked_sub(lookback.max(PERIOD)).unwrap_or(UNIX_EPOCH));
        Self { start, end }
    }

    /// Whether `time` falls in it.
    pub fn contains(&self, time: SystemTime) -> bool {
        self.start <= time && time < self.end
    }

    /// How many periods it holds.
    pub fn periods(&self) -> u64 {
        self.end.duration_since(self.start).map_or(0, |d| d.as_secs() / PERIOD.as_secs())
    }

    /// `2026-12-01T08:00:00Z .. 2026-12-01T11:00:00Z`.
    pub fn describe(&self) -> String {
        format!("{} .. {}", humantime::format_rfc3339_seconds(self.start), humantime::format_rfc3339_seconds(self.end))
    }
}

/// `time` rounded down to a period boundary.
pub fn floor(time: SystemTime) -> SystemTime {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs - secs % PERIOD.as_secs())
}

/// A point in time as the command line gives it: a duration back from `now` (`6h`, `7d`) or an RFC 3339 time
/// (`2026-12-01T08:00:00Z`).
pub fn parse_time(text: &str, now: SystemTime) -> anyhow::Result<SystemTime> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now.checked_sub(ago).unwrap_or(UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        anyhow::anyhow!("{text:?} is neither a duration back from now (6h, 7d) nor a time (2026-12-01T08:00:00Z)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).expect("time")
    }

    #[test]
    fn ends_are_rounded_down_to_whole_hours() {
        let w = Window::aligned(at("2026-12-01T08:59:59Z"), at("2026-12-01T11:30:00Z")).expect("window");
        assert_eq!((w.start, w.end), (at("2026-12-01T08:00:00Z"), at("2026-12-01T11:00:00Z")));
        assert_eq!(w.periods(), 3);
        assert_eq!(w.describe(), "2026-12-01T08:00:00Z .. 2026-12-01T11:00:00Z");
        assert!(w.contains(at("2026-12-01T08:00:00Z")));
        assert!(w.contains(at("2026-12-01T10:59:59Z")));
        assert!(!w.contains(at("2026-12-01T11:00:00Z")), "the end is the next window's");
        assert!(!w.contains(at("2026-12-01T07:59:59Z")));
        // Already on the hour: kept as it is.
        let w = Window::aligned(at("2026-12-01T08:00:00Z"), at("2026-12-01T09:00:00Z")).expect("window");
        assert_eq!(w.periods(), 1);
    }

    #[test]
    fn a_window_without_a_whole_hour_is_refused() {
        let e = Window::aligned(at("2026-12-01T08:10:00Z"), at("2026-12-01T08:50:00Z")).expect_err("no hour");
        assert!(e.to_string().contains("no whole hour"), "{e}");
        assert!(Window::aligned(at("2026-12-01T09:00:00Z"), at("2026-12-01T08:00:00Z")).is_err());
    }

    #[test]
    fn the_scheduled_window_leaves_the_settling_hour_out() {
        // At 10:14 the 09:00 hour is still settling; at 10:15 it is in.
        let w = Window::lookback(at("2026-12-01T10:14:00Z"), Duration::from_secs(6 * 3600));
        assert_eq!((w.start, w.end), (at("2026-12-01T03:00:00Z"), at("2026-12-01T09:00:00Z")));
        let w = Window::lookback(at("2026-12-01T10:15:00Z"), Duration::from_secs(6 * 3600));
        assert_eq!((w.start, w.end), (at("2026-12-01T04:00:00Z"), at("2026-12-01T10:00:00Z")));
    }

    #[test]
    fn times_are_durations_back_or_rfc3339() {
        let now = at("2026-12-01T10:00:00Z");
        assert_eq!(parse_time("6h", now).expect("ago"), at("2026-12-01T04:00:00Z"));
        assert_eq!(parse_time("2026-11-30T23:00:00Z", now).expect("time"), at("2026-11-30T23:00:00Z"));
        assert!(parse_time("yesterday", now).is_err());
    }
}
