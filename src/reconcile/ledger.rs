//! The gateway's side: the tokens its ledgers recorded in the window, per project and model. Several ledgers (one
//! per replica) are summed, each with its rotated files; a file given twice is read once. Lines a limit refused
//! (`refused_by`) were never forwarded, so AWS never counted them: they are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use super::names::ProjectNames;
use super::window::Window;
use crate::metering::ledger::read::{self, Line};

/// Tokens the gateway forwarded for one project and model.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Input tokens, cached ones included (as upstream's usage reports them).
    pub input: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
    /// The cached part of `input`.
    pub cached_input: u64,
}

impl Counted {
    fn add(&mut self, other: Self) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cached_input = self.cached_input.saturating_add(other.cached_input);
    }
}

/// What the ledgers say of the window.
#[derive(Debug, Default, Clone)]
pub struct GatewayUsage {
    /// Per (project, model).
    pub by_model: BTreeMap<(String, String), Counted>,
    /// The id the ledger gives each project, for those the config may lack.
    pub ids: BTreeMap<String, String>,
    /// The files read.
    pub files: Vec<PathBuf>,
    /// Lines in the window that were counted.
    pub lines: u64,
    /// Lines that could not be read.
    pub skipped: u64,
    /// Lines in the window a limit refused (never forwarded, so not counted).
    pub refused: u64,
}

impl GatewayUsage {
    /// The models each project's lines name.
    pub fn models(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut models: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (project, model) in self.by_model.keys() {
            models.entry(project.clone()).or_default().insert(model.clone());
        }
        models
    }

    /// A project's tokens over every model.
    pub fn project(&self, name: &str) -> Counted {
        let mut total = Counted::default();
        for ((project, _), counted) in &self.by_model {
            if project == name {
                total.add(*counted);
            }
        }
        total
    }
}

/// The model name for a line without one.
pub const UNKNOWN_MODEL: &str = "(unknown)";

/// Sums `ledgers` (each with its rotated files) over `window`, projects named as `names` has them.
pub fn read(ledgers: &[PathBuf], window: &Window, names: &ProjectNames) -> anyhow::Result<GatewayUsage> {
    let mut usage = GatewayUsage { files: files(ledgers, window)?, ..GatewayUsage::default() };
    let files = usage.files.clone();
    for text in read::lines(&files) {
        let text = text?;
        if read::is_blank(&text) {
            continue;
        }
        let Some((line, time)) = Line::parse(&text).and_then(|line| line.time().map(|time| (line, time))) else {
            usage.skipped += 1;
            continue;
        };
        if !window.contains(time) {
            continue;
        }
        if line.refused_by.is_some() {
            usage.refused += 1;
            continue;
        }
        usage.lines += 1;
        let project = names.of_line(&line.project, line.project_id.as_deref());
        if let Some(id) = &line.project_id {
            usage.ids.entry(project.clone()).or_insert_with(|| id.to_string());
        }
        let model = line.model.as_deref().unwrap_or(UNKNOWN_MODEL).to_owned();
        usage.by_model.entry((project, model)).or_default().add(Counted {
            input: line.input_tokens,
            output: line.output_tokens,
            cached_input: line.cached_input_tokens,
        });
    }
    Ok(usage)
}

/// The files of `ledgers` that may hold lines of `window`: each ledger itself, and those of its rotated files
/// (`usage.2026-11-25.jsonl`, which holds that UTC day's lines) from the day before the window to its last day.
/// Each file once, however often it is named.
fn files(ledgers: &[PathBuf], window: &Window) -> anyhow::Result<Vec<PathBuf>> {
    let first_day = crate::metering::ledger::utc_day(window.start.checked_sub(DAY).unwrap_or(window.start));
    let last_day = crate::metering::ledger::utc_day(window.end);
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for ledger in ledgers {
        let found = read::files(ledger);
        if !found.iter().any(|f| f.is_file()) {
            anyhow::bail!("no usage ledger at {} (nor rotated files beside it)", ledger.display());
        }
        for file in found.into_iter().filter(|f| f.is_file()) {
            if let Some(day) = read::rotated_day(ledger, &file)
                && (day < first_day.as_str() || day > last_day.as_str())
            {
                continue;
            }
            let key = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            if seen.insert(key) {
                files.push(file);
            }
        }
    }
    Ok(files)
}

const DAY: Duration = Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Project;

    fn line(time: &str, project: &str, id: &str, model: &str, input: u64, output: u64) -> serde_json::Value {
        serde_json::json!({
            "time": time, "request_id": "r", "key": "k", "project": project, "project_id": id, "tags": {},
            "route": "chat.completions", "model": model, "stream": false, "status": 200, "input_tokens": input,
            "output_tokens": output, "cached_input_tokens": input / 2, "reasoning_tokens": 0, "cost_usd": null,
            "duration_ms": 1.0, "ttfb_ms": 1.0, "complete": true,
        })
    }

    fn write(path: &Path, lines: &[serde_json::Value]) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).expect("write ledger");
    }

    #[test]
    fn replicas_and_rotated_files_are_summed_over_the_window_only() {
        let dir = std::env::temp_dir().join(format!("mantlegate-reconcile-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).expect("dir");
        std::fs::create_dir_all(dir.join("b")).expect("dir");
        let at = |t: &str| humantime::parse_rfc3339(t).expect("time");
        let window = Window::aligned(at("2026-12-01T08:00:00Z"), at("2026-12-01T10:00:00Z")).expect("window");
        // Replica a: today's file and yesterday's rotated one (with a line from before the window), and an old
        // rotated file that is not even read (its line would count if it were).
        write(
            &dir.join("a/usage.jsonl"),
            &[
                line("2026-12-01T08:30:00.000Z", "Chat-Renamed", "proj_chat", "m1", 100, 10),
                line("2026-12-01T10:00:00.000Z", "Chat", "proj_chat", "m1", 1000, 1000),
            ],
        );
        write(
            &dir.join("a/usage.2026-11-30.jsonl"),
            &[line("2026-11-30T23:00:00.000Z", "Chat", "proj_chat", "m1", 5000, 5000)],
        );
        write(
            &dir.join("a/usage.2026-11-01.jsonl"),
            &[line("2026-12-01T09:00:00.000Z", "Chat", "proj_chat", "m1", 7000, 7000)],
        );
        let mut refused = line("2026-12-01T09:00:00.000Z", "Chat", "proj_chat", "m1", 0, 0);
        refused["refused_by"] = "project:Chat:requests_per_minute".into();
        let mut replica_b = vec![
            line("2026-12-01T09:59:59.999Z", "Chat", "proj_chat", "m2", 20, 2),
            line("2026-12-01T09:10:00.000Z", "Gone", "proj_gone", "m1", 7, 1),
            refused,
        ];
        replica_b[1]["model"] = serde_json::Value::Null;
        write(&dir.join("b/usage.jsonl"), &replica_b);

        let names = ProjectNames::new(&[Project {
            name: "Chat".into(),
            id: Some("proj_chat".into()),
            tags: BTreeMap::new(),
            models: vec![],
            archived: false,
        }]);
        // The same ledger named twice is read once.
        let ledgers = [dir.join("a/usage.jsonl"), dir.join("b/usage.jsonl"), dir.join("a/../a/usage.jsonl")];
        let usage = read(&ledgers, &window, &names).expect("read");
        assert_eq!(usage.files.len(), 3, "{:?}", usage.files);
        assert_eq!((usage.lines, usage.refused, usage.skipped), (3, 1, 0));
        let chat_m1 = usage.by_model[&("Chat".to_owned(), "m1".to_owned())];
        assert_eq!(chat_m1, Counted { input: 100, output: 10, cached_input: 50 });
        assert_eq!(usage.project("Chat"), Counted { input: 120, output: 12, cached_input: 60 });
        assert_eq!(usage.by_model[&("Gone".to_owned(), UNKNOWN_MODEL.to_owned())].input, 7);
        assert_eq!(usage.ids.get("Gone").map(String::as_str), Some("proj_gone"));
        assert_eq!(usage.models()["Chat"], BTreeSet::from(["m1".to_owned(), "m2".to_owned()]));

        let missing = read(&[dir.join("nowhere/usage.jsonl")], &window, &names).expect_err("no ledger");
        assert!(missing.to_string().contains("no usage ledger at"), "{missing}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
