//! Rebuilding counters from the usage ledger: what this replica's ledger says was used in the windows still open
//! (this month's and today's spend, this minute's requests and tokens), per project, key and tag value. The memory
//! backend starts from it, so a restart forgets nothing; a Redis that lost this replica's share (flushed, or
//! restarted without its data) is given it again, once (see `redis`).

use std::collections::BTreeMap;
use std::path::Path;

use super::Windows;
use crate::metering::ledger::read::{self, Line};

/// What one subject used in the open windows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sums {
    /// Requests this minute.
    pub requests: u64,
    /// Input tokens this minute.
    pub input: u64,
    /// Output tokens this minute.
    pub output: u64,
    /// Spend today, nano-USD.
    pub day_nanos: u64,
    /// Spend this month, nano-USD.
    pub month_nanos: u64,
}

/// Sums per subject (`project:Name`, ...), for the windows of one moment.
#[derive(Debug)]
pub struct Seeded {
    /// The moment.
    pub windows: Windows,
    /// By subject id.
    pub subjects: BTreeMap<String, Sums>,
    /// Ledger lines read.
    pub lines: u64,
}

/// What the ledger at `path` (and its files rotated this month) says was used in the windows of `now`, by the
/// requests that ended at `until` (ms since the epoch) or before.
pub fn from_ledger(path: &Path, now: Windows, until: u64) -> anyhow::Result<Seeded> {
    let mut seeded = Seeded { windows: now, subjects: BTreeMap::new(), lines: 0 };
    let month_start = crate::limits::window::rfc3339(now.month_start_ms());
    for text in read::lines(&read::files_from(path, &month_start[..10])) {
        let text = text.map_err(|e| anyhow::anyhow!("limits: rebuilding spend: {e:#}"))?;
        if let Some(line) = Line::parse(&text) {
            add(&mut seeded, &line, until);
        }
    }
    Ok(seeded)
}

fn add(seeded: &mut Seeded, line: &Line<'_>, until: u64) {
    if line.refused_by.is_some() {
        return;
    }
    let Some(time) = line.time() else { return };
    let ms = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let (at, now) = (Windows::at(ms), seeded.windows);
    if at.month != now.month || ms > until {
        return;
    }
    seeded.lines += 1;
    let nanos = line.cost_usd.map_or(0, super::nanos);
    for subject in line.subjects() {
        let sums = seeded.subjects.entry(subject.to_string()).or_default();
        sums.month_nanos += nanos;
        if at.day == now.day {
            sums.day_nanos += nanos;
        }
        if at.minute == now.minute {
            sums.requests += 1;
            sums.input += line.input_tokens;
            sums.output += line.output_tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_open_windows_of_every_subject() {
        let dir = std::env::temp_dir().join(format!("mantlegate-seed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("usage.jsonl");
        let line = |time: &str, key: &str, cost: f64, refused: bool| {
            let refused = if refused { r#","refused_by":"project:A/usd_per_day""# } else { "" };
            format!(
                r#"{{"time":"{time}","key":"{key}","project":"A","tags":{{"Team":"T"}},"input_tokens":10,"output_tokens":5,"cost_usd":{cost}{refused}}}"#
            ) + "\n"
        };
        // Last month (rotated, its last batch holding this month's first line), earlier this month (rotated),
        // today, this minute, a refusal, a line torn inside a character, a torn last line.
        let last_month =
            line("2026-11-30T10:00:00Z", "k", 1.0, false) + &line("2026-12-01T00:00:00.010Z", "k", 2.0, false);
        std::fs::write(dir.join("usage.2026-11-30.jsonl"), last_month).expect("write");
        std::fs::write(dir.join("usage.2026-12-01.jsonl"), line("2026-12-01T10:00:00Z", "k", 0.25, false))
            .expect("write");
        let today = line("2026-12-02T09:00:00Z", "k", 0.5, false)
            + &line("2026-12-02T15:20:10Z", "j", 0.125, false)
            + &line("2026-12-02T15:20:20Z", "j", 9.0, true)
            + "{\"time\":";
        let mut today = today.into_bytes();
        today.splice(0..0, b"{\"time\":\"2026-12-02T\xc3\n".iter().copied());
        std::fs::write(&path, today).expect("write");
        let now = Windows::at(
            humantime::parse_rfc3339("2026-12-02T15:20:30Z")
                .map_or(0, |t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)),
        );
        let seeded = from_ledger(&path, now, now.now_ms).expect("seeded");
        let nanos = |usd: f64| super::super::nanos(usd);
        assert_eq!(
            seeded.subjects["project:A"],
            Sums { requests: 1, input: 10, output: 5, day_nanos: nanos(0.625), month_nanos: nanos(2.875) }
        );
        assert_eq!(seeded.subjects["tag:Team=T"], seeded.subjects["project:A"]);
        assert_eq!(
            seeded.subjects["key:k"],
            Sums { requests: 0, input: 0, output: 0, day_nanos: nanos(0.5), month_nanos: nanos(2.75) }
        );
        assert_eq!(seeded.subjects["key:j"].month_nanos, nanos(0.125));
        assert_eq!(seeded.lines, 4);
        // Lines that ended after the time asked for are left out.
        let earlier = from_ledger(&path, now, now.now_ms - 25_000).expect("seeded");
        assert_eq!(earlier.subjects["project:A"].requests, 0);
        assert_eq!(earlier.lines, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
