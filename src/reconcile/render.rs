//! The report as a person reads it (`text`), and as scripts do (`json`, `csv`).

use std::fmt::Write as _;

use super::Report;
use super::compare::{Row, Verdict};
use super::names::DEFAULT;

/// Renders `report` as `text`, `json` or `csv`.
pub fn render(report: &Report, format: &str) -> anyhow::Result<String> {
    match format {
        "text" | "table" => Ok(text(report)),
        "json" => Ok(serde_json::to_string_pretty(report)? + "\n"),
        "csv" => Ok(csv(report)),
        other => anyhow::bail!("--format {other:?}: use text, json or csv"),
    }
}

fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} in {}, {} .. {}, against {} ledger file{} ({} lines in the window{})",
        report.namespace,
        report.region,
        report.window.start,
        report.window.end,
        report.ledger_files.len(),
        if report.ledger_files.len() == 1 { "" } else { "s" },
        report.ledger_lines,
        match report.refused_lines {
            0 => String::new(),
            n => format!("; {n} refused by a limit, not counted"),
        }
    );
    let _ = writeln!(
        out,
        "ok: the two counts within {}% of the larger; DIFF is AWS's count less the gateway's; MODEL * is every model\n",
        report.tolerance_percent
    );
    let header =
        ["PROJECT", "MODEL", "GATEWAY IN", "AWS IN", "DIFF IN", "GATEWAY OUT", "AWS OUT", "DIFF OUT", "VERDICT"];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for r in &report.comparison.rows {
        cells.push(vec![
            r.project.clone(),
            r.model.clone(),
            r.gateway.input.to_string(),
            r.aws.input.to_string(),
            signed(r.difference.input),
            r.gateway.output.to_string(),
            r.aws.output.to_string(),
            signed(r.difference.output),
            r.verdict.name().to_owned(),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|i| cells.iter().map(|row| row[i].chars().count()).max().unwrap_or(0)).collect();
    for row in &cells {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i < 2 || i == header.len() - 1 {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            } else {
                let _ = write!(line, "{cell:>w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let unattributed = report.comparison.unattributed_upstream;
    let _ = writeln!(
        out,
        "\nunattributed upstream: {} input and {} output tokens in the `{DEFAULT}` project",
        unattributed.input, unattributed.output
    );
    let counts: Vec<String> = report.comparison.counts().iter().map(|(v, n)| format!("{n} {}", v.name())).collect();
    let _ = writeln!(out, "{}", counts.join(", "));
    for line in explain(&report.comparison.rows) {
        let _ = writeln!(out, "{line}");
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// What each verdict found means, once for each that was found.
fn explain(rows: &[Row]) -> Vec<&'static str> {
    let found = |v: Verdict| rows.iter().any(|r| r.verdict == v);
    let mut lines = Vec::new();
    if found(Verdict::Bypass) {
        lines.push(
            "bypass: AWS counted more than the gateway forwarded: traffic reached the project without the gateway",
        );
    }
    if found(Verdict::Missing) {
        lines.push(
            "missing: the gateway forwarded more than AWS counted: another region or account than the one read, or \
             metrics not yet in CloudWatch",
        );
    }
    if found(Verdict::Unattributed) {
        lines.push("unattributed: tokens in the account's `default` project, which the gateway never sends to");
    }
    lines
}

fn signed(n: i128) -> String {
    if n > 0 { format!("+{n}") } else { n.to_string() }
}

fn csv(report: &Report) -> String {
    let mut out = String::from(
        "project,project_id,model,gateway_input_tokens,aws_input_tokens,difference_input_tokens,\
         gateway_output_tokens,aws_output_tokens,difference_output_tokens,gateway_cached_input_tokens,verdict\n",
    );
    for r in &report.comparison.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{}",
            field(&r.project),
            field(r.project_id.as_deref().unwrap_or("")),
            field(&r.model),
            r.gateway.input,
            r.aws.input,
            r.difference.input,
            r.gateway.output,
            r.aws.output,
            r.difference.output,
            r.gateway_cached_input,
            r.verdict.name()
        );
    }
    out
}

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::reconcile::WindowReport;
    use crate::reconcile::compare::{CachedInput, Comparison, Difference, Tokens};

    fn row(project: &str, model: &str, gateway: u64, aws: u64, verdict: Verdict) -> Row {
        Row {
            project: project.into(),
            project_id: None,
            model: model.into(),
            gateway: Tokens { input: gateway, output: 1 },
            gateway_cached_input: 0,
            aws: Tokens { input: aws, output: 1 },
            difference: Difference { input: i128::from(aws) - i128::from(gateway), output: 0 },
            verdict,
        }
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            namespace: "AWS/BedrockMantle",
            region: "us-west-2".into(),
            window: WindowReport {
                start: "2026-12-01T08:00:00Z".into(),
                end: "2026-12-01T10:00:00Z".into(),
                period_seconds: 3600,
                periods: 2,
            },
            tolerance_percent: 2.0,
            ledger_files: vec!["usage.jsonl".into()],
            ledger_lines: 3,
            unreadable_lines: 0,
            refused_lines: 1,
            ok: rows.iter().all(|r| r.verdict == Verdict::Ok),
            comparison: Comparison {
                rows,
                cached_input: CachedInput::NoneSeen,
                project_dimension: BTreeMap::new(),
                account: None,
                unattributed_upstream: Tokens { input: 5, output: 1 },
            },
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn the_table_has_a_row_per_project_and_model_and_says_what_verdicts_mean() {
        let r = report(vec![
            row("Chat, Inc", "*", 100, 100, Verdict::Ok),
            row("Search", "*", 10, 900, Verdict::Bypass),
            row("default", "*", 0, 5, Verdict::Unattributed),
        ]);
        let text = render(&r, "text").expect("text");
        assert!(text.starts_with("AWS/BedrockMantle in us-west-2, 2026-12-01T08:00:00Z .. 2026-12-01T10:00:00Z"));
        assert!(text.contains("(3 lines in the window; 1 refused by a limit, not counted)"), "{text}");
        assert!(text.contains("within 2% of the larger"), "{text}");
        let search = text.lines().find(|l| l.starts_with("Search")).expect("a Search row");
        assert_eq!(
            search.split_whitespace().collect::<Vec<_>>(),
            ["Search", "*", "10", "900", "+890", "1", "1", "0", "bypass"]
        );
        assert!(text.contains("unattributed upstream: 5 input and 1 output tokens in the `default` project"), "{text}");
        assert!(text.contains("1 ok, 1 bypass, 0 missing, 1 unattributed"), "{text}");
        assert!(text.contains("\nbypass: AWS counted more") && !text.contains("\nmissing:"), "{text}");
        assert!(text.contains("note: a note"), "{text}");

        let csv = render(&r, "csv").expect("csv");
        assert!(csv.contains("\n\"Chat, Inc\",,*,100,100,0,1,1,0,0,ok\n"), "{csv}");
        assert!(csv.contains("\nSearch,,*,10,900,890,1,1,0,0,bypass\n"), "{csv}");

        let json: serde_json::Value = serde_json::from_str(&render(&r, "json").expect("json")).expect("parses");
        assert_eq!(json["rows"][1]["verdict"], "bypass");
        assert_eq!(json["rows"][1]["difference"]["input"], 890);
        assert_eq!(json["unattributed_upstream"]["input"], 5);
        assert_eq!((json["ok"].as_bool(), json["cached_input"].as_str()), (Some(false), Some("none_seen")));
        assert!(render(&r, "xml").is_err());
    }
}
