//! Rebuilding counters from the usage ledger: what this replica's ledger says was used in the windows still open
//! (this month's and today's spend, this minute's requests and tokens), per project, key and tag value. The memory
//! backend starts from it, so a restart forgets nothing; a Redis that lost this replica's share (flushed, or
//! restarted without its data) is given it again, once (see `redis`).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use super::Windows;
use crate::config::limits::Subject;

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

/// The ledger fields seeding reads.
#[derive(Deserialize)]
struct Line {
    time: String,
    key: Option<String>,
    project: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    cost_usd: Option<f64>,
    /// Set on a request a limit refused: it used nothing and was never forwarded.
    refused_by: Option<String>,
}

/// What the ledger at `path` (and its files rotated this month) says was used in the windows of `now`, by the
/// requests that ended at `until` (ms since the epoch) or before.
pub fn from_ledger(path: &Path, now: Windows, until: u64) -> anyhow::Result<Seeded> {
    let month = &now.month_name()[1..];
    let mut seeded = Seeded { windows: now, subjects: BTreeMap::new(), lines: 0 };
    for file in crate::cli::usage::ledger_files(path) {
        // Rotated files are named by their day: only this month's can hold this month's lines.
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if file != path && !name.contains(&format!(".{month}-")) {
            continue;
        }
        let reader = match std::fs::File::open(&file) {
            Ok(f) => std::io::BufReader::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => anyhow::bail!("limits: cannot read the ledger {} to rebuild spend: {e}", file.display()),
        };
        for text in reader.lines() {
            let text = text.map_err(|e| anyhow::anyhow!("limits: reading {}: {e}", file.display()))?;
            if let Ok(line) = serde_json::from_str::<Line>(&text) {
                add(&mut seeded, &line, until);
            }
        }
    }
    Ok(seeded)
}

fn add(seeded: &mut Seeded, line: &Line, until: u64) {
    if line.refused_by.is_some() {
        return;
    }
    let Ok(time) = humantime::parse_rfc3339_weak(&line.time) else { return };
    let ms = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let (at, now) = (Windows::at(ms), seeded.windows);
    if at.month != now.month || ms > until {
        return;
    }
    seeded.lines += 1;
    let nanos = line.cost_usd.map_or(0, super::nanos);
    let mut subjects = vec![Subject::Project(line.project.clone())];
    subjects.extend(line.key.clone().map(Subject::Key));
    subjects.extend(line.tags.iter().map(|(k, v)| Subject::Tag(k.clone(), v.clone())));
    for subject in subjects {
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
        // Last month (rotated), earlier this month (rotated), today, this minute, a refusal, a torn line.
        std::fs::write(dir.join("usage.2026-11-30.jsonl"), line("2026-11-30T10:00:00Z", "k", 1.0, false))
            .expect("write");
        std::fs::write(dir.join("usage.2026-12-01.jsonl"), line("2026-12-01T10:00:00Z", "k", 0.25, false))
            .expect("write");
        let today = line("2026-12-02T09:00:00Z", "k", 0.5, false)
            + &line("2026-12-02T15:20:10Z", "j", 0.125, false)
            + &line("2026-12-02T15:20:20Z", "j", 9.0, true)
            + "{\"time\":";
        std::fs::write(&path, today).expect("write");
        let now = Windows::at(
            humantime::parse_rfc3339("2026-12-02T15:20:30Z")
                .map_or(0, |t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)),
        );
        let seeded = from_ledger(&path, now, now.now_ms).expect("seeded");
        let nanos = |usd: f64| super::super::nanos(usd);
        assert_eq!(
            seeded.subjects["project:A"],
            Sums { requests: 1, input: 10, output: 5, day_nanos: nanos(0.625), month_nanos: nanos(0.875) }
        );
        assert_eq!(seeded.subjects["tag:Team=T"], seeded.subjects["project:A"]);
        assert_eq!(
            seeded.subjects["key:k"],
            Sums { requests: 0, input: 0, output: 0, day_nanos: nanos(0.5), month_nanos: nanos(0.75) }
        );
        assert_eq!(seeded.subjects["key:j"].month_nanos, nanos(0.125));
        assert_eq!(seeded.lines, 3);
        // Lines that ended after the time asked for are left out.
        let earlier = from_ledger(&path, now, now.now_ms - 25_000).expect("seeded");
        assert_eq!(earlier.subjects["project:A"].requests, 0);
        assert_eq!(earlier.lines, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
