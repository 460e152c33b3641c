//! `mantlegate usage report`: spend and tokens from the usage ledger, grouped the way Cost Explorer groups
//! by a cost allocation tag (or by project, model or key), in real time rather than a day late.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::metering::ledger::read::{self, Line};

/// How to group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// Project name.
    Project,
    /// Model id.
    Model,
    /// Key name.
    Key,
    /// A cost allocation tag.
    Tag(String),
}

impl GroupBy {
    /// `project`, `model`, `key`, or any other word as a tag name.
    pub fn parse(s: &str) -> Self {
        match s {
            "project" => Self::Project,
            "model" => Self::Model,
            "key" => Self::Key,
            tag => Self::Tag(tag.strip_prefix("tag:").unwrap_or(tag).to_owned()),
        }
    }

    fn header(&self) -> &str {
        match self {
            Self::Project => "project",
            Self::Model => "model",
            Self::Key => "key",
            Self::Tag(t) => t,
        }
    }
}

/// One group's totals.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The group's value.
    pub group: String,
    /// Requests.
    pub requests: u64,
    /// Input tokens (cached included).
    pub input_tokens: u64,
    /// Output tokens (reasoning included).
    pub output_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Spend in USD at configured prices.
    pub cost_usd: f64,
    /// Requests for models with no price (their tokens are counted, their cost is not).
    pub unpriced_requests: u64,
    /// Requests whose response did not end normally.
    pub incomplete_requests: u64,
    /// Successful requests whose usage the gateway could not (fully) read: what they cost is missing from the sums.
    pub unmetered_requests: u64,
}

/// Totals per group of the lines from `since` (inclusive) to `until` (exclusive), most expensive first;
/// `skipped` counts lines that could not be read.
pub fn aggregate(
    lines: impl Iterator<Item = impl AsRef<[u8]>>,
    group_by: &GroupBy,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
) -> (Vec<Row>, u64) {
    let mut groups: BTreeMap<String, Row> = BTreeMap::new();
    let mut skipped = 0;
    for text in lines {
        let text = text.as_ref();
        if read::is_blank(text) {
            continue;
        }
        let Some(line) = Line::parse(text) else {
            skipped += 1;
            continue;
        };
        if line.refused_by.is_some() {
            continue;
        }
        if since.is_some() || until.is_some() {
            match line.time() {
                Some(t) if since.is_none_or(|since| t >= since) && until.is_none_or(|until| t < until) => {}
                Some(_) => continue,
                None => {
                    skipped += 1;
                    continue;
                }
            }
        }
        let group: &str = match group_by {
            GroupBy::Project => &line.project,
            GroupBy::Model => line.model.as_deref().unwrap_or("(unknown)"),
            GroupBy::Key => line.key.as_deref().unwrap_or("(no key)"),
            GroupBy::Tag(tag) => line.tags.get(tag.as_str()).map_or("(untagged)", |v| v),
        };
        let row = groups.entry(group.to_owned()).or_insert_with(|| Row { group: group.to_owned(), ..Row::default() });
        // Counts are whatever the ledger says: sums saturate rather than overflow.
        row.requests += 1;
        row.input_tokens = row.input_tokens.saturating_add(line.input_tokens);
        row.output_tokens = row.output_tokens.saturating_add(line.output_tokens);
        row.cached_input_tokens = row.cached_input_tokens.saturating_add(line.cached_input_tokens);
        row.reasoning_tokens = row.reasoning_tokens.saturating_add(line.reasoning_tokens);
        match line.cost_usd {
            Some(cost) => row.cost_usd += cost,
            None if line.input_tokens > 0 || line.output_tokens > 0 => row.unpriced_requests += 1,
            None => {}
        }
        if !line.complete {
            row.incomplete_requests += 1;
        }
        if line.unmetered.is_some() {
            row.unmetered_requests += 1;
        }
    }
    let mut rows: Vec<Row> = groups.into_values().collect();
    rows.sort_by(|a, b| b.cost_usd.total_cmp(&a.cost_usd).then_with(|| a.group.cmp(&b.group)));
    (rows, skipped)
}

/// A sum of costs to the ledger's own precision (1e-12 USD), without the floating-point residue of adding them.
fn exact_usd(cost: f64) -> f64 {
    (cost * 1e12).round() / 1e12 + 0.0
}

/// A cost for people: four decimals, or two significant digits past the zeros of a smaller amount (0.0000132),
/// so that small spend never reads as zero.
fn usd(cost: f64) -> String {
    let cost = exact_usd(cost);
    if cost == 0.0 || cost.abs() >= 0.01 {
        return format!("{cost:.4}");
    }
    let decimals = (2 - cost.abs().log10().floor() as i32).clamp(4, 12) as usize;
    let text = format!("{cost:.decimals$}");
    text.trim_end_matches('0').to_owned()
}

/// Renders rows as `table`, `csv` or `json`.
pub fn render(rows: &[Row], group_by: &GroupBy, format: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    match format {
        "json" => out = serde_json::to_string_pretty(rows)? + "\n",
        "csv" => {
            let _ = writeln!(
                out,
                "{},requests,input_tokens,output_tokens,cached_input_tokens,reasoning_tokens,cost_usd,unpriced_requests,incomplete_requests,unmetered_requests",
                csv_field(group_by.header())
            );
            for r in rows {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&r.group),
                    r.requests,
                    r.input_tokens,
                    r.output_tokens,
                    r.cached_input_tokens,
                    r.reasoning_tokens,
                    exact_usd(r.cost_usd),
                    r.unpriced_requests,
                    r.incomplete_requests,
                    r.unmetered_requests
                );
            }
        }
        "table" => {
            let header =
                [group_by.header(), "REQUESTS", "INPUT", "OUTPUT", "CACHED", "REASONING", "COST USD", "UNPRICED"];
            let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_uppercase()).collect()];
            for r in rows {
                cells.push(vec![
                    r.group.clone(),
                    r.requests.to_string(),
                    r.input_tokens.to_string(),
                    r.output_tokens.to_string(),
                    r.cached_input_tokens.to_string(),
                    r.reasoning_tokens.to_string(),
                    usd(r.cost_usd),
                    r.unpriced_requests.to_string(),
                ]);
            }
            // `sum` of no values is -0.0, which would print as "-0.0000".
            let total: f64 = rows.iter().map(|r| r.cost_usd).sum::<f64>() + 0.0;
            let widths: Vec<usize> =
                (0..header.len()).map(|i| cells.iter().map(|row| row[i].chars().count()).max().unwrap_or(0)).collect();
            for row in &cells {
                let mut line = String::new();
                for (i, cell) in row.iter().enumerate() {
                    if i == 0 {
                        let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
                    } else {
                        let _ = write!(line, "{cell:>w$}  ", w = widths[i]);
                    }
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "\ntotal: {} USD over {} requests",
                usd(total),
                rows.iter().map(|r| r.requests).sum::<u64>()
            );
            let unmetered: u64 = rows.iter().map(|r| r.unmetered_requests).sum();
            if unmetered > 0 {
                let requests = if unmetered == 1 { "request was" } else { "requests were" };
                let _ = writeln!(
                    out,
                    "({unmetered} {requests} answered but not fully metered: the ledger's `unmetered` says why)"
                );
            }
        }
        other => anyhow::bail!("--format {other:?}: use table, csv or json"),
    }
    Ok(out)
}

/// A CSV field: quoted when it holds a separator, a quote or a line break. A value a spreadsheet would take for a
/// formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) gets a leading `'`, so that opening a
/// report never runs what a caller or an upstream named a model.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_owned() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

/// A moment as a report's bounds take it: a UTC date (`2026-12-01`, its midnight) or an RFC 3339 time
/// (`2026-12-01T15:00:00Z`).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let is_date = s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    let text = if is_date { format!("{s}T00:00:00Z") } else { s.to_owned() };
    humantime::parse_rfc3339_weak(&text)
        .map_err(|_| format!("{s:?} is not a UTC date (2026-12-01) or an RFC 3339 time (2026-12-01T15:00:00Z)"))
}

/// `--since`: a duration back from now (`7d`, `12h`), or a date or time ([`parse_time`]).
fn parse_since(s: &str) -> anyhow::Result<SystemTime> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    parse_time(s).map_err(|_| {
        anyhow::anyhow!("--since {s:?} is not a duration (7d, 12h), a UTC date (2026-12-01) or an RFC 3339 time")
    })
}

/// Runs the report over the lines from `since` (a duration back from now, or a date or time) to `until` (a date
/// or time, exclusive).
pub fn run(
    ledger: &Path,
    group_by: &str,
    since: Option<&str>,
    until: Option<&str>,
    format: &str,
) -> anyhow::Result<String> {
    let since = since.map(parse_since).transpose()?;
    let until = until.map(|s| parse_time(s).map_err(|e| anyhow::anyhow!("--until {e}"))).transpose()?;
    if let (Some(since), Some(until)) = (since, until)
        && until <= since
    {
        anyhow::bail!("--until must be later than --since");
    }
    let files = read::files(ledger);
    if !files.iter().any(|f| f.is_file()) {
        anyhow::bail!("no usage ledger at {} (set [metering] ledger_path and serve some traffic)", ledger.display());
    }
    let group_by = GroupBy::parse(group_by);
    let mut failed = None;
    let lines = read::lines(&files).map_while(|line| line.map_err(|e| failed = Some(e)).ok());
    let (rows, skipped) = aggregate(lines, &group_by, since, until);
    if let Some(e) = failed {
        return Err(e);
    }
    let mut out = render(&rows, &group_by, format)?;
    if skipped > 0 {
        let _ = writeln!(out, "({skipped} unreadable ledger lines skipped)");
    }
    // Most likely a misspelt tag (they are case-sensitive), not a ledger without it.
    if let GroupBy::Tag(tag) = &group_by
        && !rows.is_empty()
        && rows.iter().all(|r| r.group == "(untagged)")
    {
        let _ = writeln!(out, "(no ledger line carries the tag {tag:?}; tag names are case-sensitive)");
    }
    Ok(out)
}

/// Default `--since` window label for help text.
pub const SINCE_HELP: &str = "only requests this recent (7d, 12h) or from this UTC date or RFC 3339 time on \
                              (2026-12-01, 2026-12-01T15:00:00Z); default: the whole ledger";

/// `--until` help text.
pub const UNTIL_HELP: &str =
    "only requests before this UTC date or RFC 3339 time (exclusive: --until 2026-12-02 ends with December 1st)";

#[cfg(test)]
mod csv_tests {
    use super::csv_field;

    #[test]
    fn fields_are_quoted_and_never_formulas() {
        for (value, field) in [
            ("openai.gpt-oss-120b", "openai.gpt-oss-120b"),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("two\rlines", "\"two\rlines\""),
            ("=HYPERLINK(\"http://x\",\"y\")", "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""),
            ("+1", "'+1"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tcmd", "'\tcmd"),
        ] {
            assert_eq!(csv_field(value), field, "{value:?}");
        }
    }
}

#[cfg(test)]
mod cost_tests {
    use super::*;

    #[test]
    fn small_spend_never_reads_as_zero() {
        assert_eq!(usd(0.0), "0.0000");
        assert_eq!(usd(1.75), "1.7500");
        assert_eq!(usd(0.0123), "0.0123");
        assert_eq!(usd(0.0000132), "0.0000132");
        assert_eq!(usd(0.000_000_15), "0.00000015");
        assert_eq!(usd(0.004_567_89), "0.00457");
        assert_eq!(exact_usd(0.1 + 0.2), 0.3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(time: &str, project: &str, team: &str, model: &str, input: u64, output: u64, cost: Option<f64>) -> String {
        serde_json::json!({
            "time": time, "request_id": "r", "key": "k", "project": project, "project_id": "proj_x",
            "tags": {"Team": team}, "route": "chat.completions", "model": model, "stream": false, "status": 200,
            "input_tokens": input, "output_tokens": output, "cached_input_tokens": 0, "reasoning_tokens": 0,
            "cost_usd": cost, "duration_ms": 1.0, "ttfb_ms": 1.0, "complete": true,
        })
        .to_string()
    }

    #[test]
    fn groups_by_tag_and_sums() {
        let lines = vec![
            line("2026-11-20T10:00:00Z", "A", "chat", "m1", 10, 5, Some(1.5)),
            line("2026-11-25T10:00:00Z", "B", "chat", "m1", 1, 1, Some(0.25)),
            line("2026-11-25T11:00:00Z", "C", "search", "unknown.model", 7, 3, None),
            "not json".into(),
        ];
        let (rows, skipped) = aggregate(lines.clone().into_iter(), &GroupBy::parse("Team"), None, None);
        assert_eq!(skipped, 1);
        assert_eq!(rows[0].group, "chat");
        assert_eq!((rows[0].requests, rows[0].input_tokens, rows[0].output_tokens), (2, 11, 6));
        assert!((rows[0].cost_usd - 1.75).abs() < 1e-12);
        assert_eq!((rows[1].group.as_str(), rows[1].unpriced_requests), ("search", 1));

        let since = humantime::parse_rfc3339("2026-11-24T00:00:00Z").ok();
        let (rows, _) = aggregate(lines.clone().into_iter(), &GroupBy::Project, since, None);
        // Until is exclusive: the line at 11:00 on the 25th is past it.
        let until = parse_time("2026-11-25T11:00:00Z").ok();
        let (between, _) = aggregate(lines.clone().into_iter(), &GroupBy::Project, since, until);
        assert_eq!(between.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(), ["B"]);
        assert_eq!(rows.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(), ["B", "C"]);
        let csv = render(&rows, &GroupBy::Project, "csv").expect("csv");
        assert!(csv.starts_with("project,requests,"));
        assert!(csv.contains("\nB,1,1,1,0,0,0.25,0,0,0\n"), "{csv}");
        assert!(render(&rows, &GroupBy::Project, "xml").is_err());
    }

    #[test]
    fn unmetered_requests_are_counted_and_said() {
        let mut unread: serde_json::Value =
            serde_json::from_str(&line("2026-11-25T10:00:00Z", "A", "chat", "m1", 0, 0, None)).expect("line");
        unread["unmetered"] = "encoded".into();
        let lines = [line("2026-11-25T10:00:00Z", "A", "chat", "m1", 10, 5, Some(1.0)), unread.to_string()];
        let (rows, _) = aggregate(lines.into_iter(), &GroupBy::Project, None, None);
        assert_eq!((rows[0].requests, rows[0].unmetered_requests, rows[0].unpriced_requests), (2, 1, 0));
        let csv = render(&rows, &GroupBy::Project, "csv").expect("csv");
        assert!(csv.contains("\nA,2,10,5,0,0,1,0,0,1\n"), "{csv}");
        let table = render(&rows, &GroupBy::Project, "table").expect("table");
        assert!(table.contains("(1 request was answered but not fully metered"), "{table}");
        let (rows, _) = aggregate(
            std::iter::once(line("2026-11-25T10:00:00Z", "A", "c", "m1", 1, 1, None)),
            &GroupBy::Project,
            None,
            None,
        );
        assert!(!render(&rows, &GroupBy::Project, "table").expect("table").contains("metered"));
    }

    #[test]
    fn a_torn_or_odd_ledger_is_read_around() {
        let dir = std::env::temp_dir().join(format!("mantlegate-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ledger = dir.join("usage.jsonl");
        let good = line("2026-11-25T10:00:00Z", "A", "chat", "m1", 10, 5, Some(1.0));
        let huge = line("2026-11-25T10:00:00Z", "A", "chat", "m1", u64::MAX, 1, None);
        // A line torn inside a two-byte character, then lines that must still be counted.
        let mut text = good.as_bytes()[..40].to_vec();
        text.extend_from_slice(&[0xc3, b'\n']);
        for l in [&good, &huge, &good] {
            text.extend_from_slice(l.as_bytes());
            text.push(b'\n');
        }
        std::fs::write(&ledger, text).expect("write");
        let out = run(&ledger, "Team", None, None, "csv").expect("report");
        assert!(out.contains(&format!("\nchat,3,{},11,0,0,2,1,0,0\n", u64::MAX)), "{out}");
        assert!(out.contains("(1 unreadable ledger lines skipped)"), "{out}");
        let out = run(&ledger, "team", None, None, "csv").expect("report");
        assert!(out.contains("(no ledger line carries the tag \"team\"; tag names are case-sensitive)"), "{out}");
        // Nothing in the window: the total is zero, not minus zero.
        let out = run(&ledger, "Team", Some("1s"), None, "table").expect("report");
        assert!(!out.contains("-0.0000"), "{out}");
        // Bounds as dates and times: the lines are all on the 25th.
        let out = run(&ledger, "Team", Some("2026-11-25"), Some("2026-11-26"), "csv").expect("report");
        assert!(out.contains("\nchat,3,"), "{out}");
        let out = run(&ledger, "Team", Some("2026-11-25T10:00:01Z"), None, "csv").expect("report");
        assert!(!out.contains("\nchat,"), "{out}");
        for (since, until) in
            [(Some("yesterday"), None), (None, Some("2026-11")), (Some("2026-11-26"), Some("2026-11-25"))]
        {
            assert!(run(&ledger, "Team", since, until, "csv").is_err(), "{since:?} {until:?}");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
