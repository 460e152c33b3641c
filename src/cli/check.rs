//! `mantlegate check`: validates a config and prints who ends up where (key -> projects, route -> project),
//! so a reviewer can read a config change as an attribution change.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::{CallerAuth, Config, Unattributed, UpstreamAuth};

/// Runs the check, printing the report to stdout and problems to stderr.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e:#}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(Err(problem)) = config.metering.ledger_path.as_deref().map(crate::metering::ledger::check_writable) {
        eprintln!("{}: invalid configuration (1 problem):\n  metering.ledger_path: {problem}", path.display());
        return Ok(ExitCode::FAILURE);
    }
    print!("{}", report(path, &config));
    Ok(ExitCode::SUCCESS)
}

/// The check report.
pub fn report(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    let u = &config.upstream;
    let _ = writeln!(out, "{}: valid (sha256 {})", path.display(), config.sha256);
    let auth = match &u.auth {
        UpstreamAuth::ApiKey(source) => format!("api_key from {source}"),
        UpstreamAuth::Passthrough => "passthrough (the caller's own credential)".into(),
    };
    let _ = writeln!(out, "upstream: {}://{} ({auth})", u.scheme, u.authority);
    let _ = writeln!(
        out,
        "callers: {}",
        match config.callers {
            CallerAuth::Keys => "keys (every caller presents a gateway key)",
            CallerAuth::None => "none (trusted callers; any configured project may be asked for)",
        }
    );
    let fallback = match (&config.attribution.default_project, &config.attribution.unattributed) {
        (Some(p), _) => format!("default project {p}"),
        (None, Unattributed::Reject) => "reject with 403 project_required".into(),
        (None, Unattributed::Reroute(p)) => format!("reroute to {p}"),
    };
    let _ = writeln!(out, "unattributed requests: {fallback}");

    let mut rows = vec![["PROJECT".to_string(), "ID".into(), "MODELS".into(), "TAGS".into()]];
    for p in &config.projects {
        rows.push([
            p.name.clone(),
            p.id.clone().unwrap_or_else(|| "(none: not provisioned)".into()),
            if p.models.is_empty() { "any".into() } else { p.models.join(",") },
            p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
        ]);
    }
    table(&mut out, &rows);

    if !config.keys.is_empty() {
        let mut rows = vec![["KEY".to_string(), "PROJECT".into(), "MAY SELECT".into(), String::new()]];
        for k in &config.keys {
            rows.push([
                k.name.clone(),
                k.project.clone().unwrap_or_else(|| format!("- ({fallback})")),
                if k.may_select.is_empty() { "-".into() } else { k.may_select.join(", ") },
                String::new(),
            ]);
        }
        table(&mut out, &rows);
    }
    if !config.routes.is_empty() {
        let mut rows = vec![["ROUTE".to_string(), "PROJECT".into(), "BASE URL".into(), String::new()]];
        for r in &config.routes {
            rows.push([r.prefix.clone(), r.project.clone(), format!("http://<gateway>{}/v1", r.prefix), String::new()]);
        }
        table(&mut out, &rows);
    }

    let unprovisioned: Vec<&str> = config.projects.iter().filter(|p| p.id.is_none()).map(|p| p.name.as_str()).collect();
    if !unprovisioned.is_empty() {
        let _ = writeln!(
            out,
            "\nwarning: {} ha{} no id yet; `serve` refuses to start until every project has one",
            unprovisioned.join(", "),
            if unprovisioned.len() == 1 { "s" } else { "ve" }
        );
    }
    if let UpstreamAuth::ApiKey(source) = &u.auth {
        if let Err(e) = source.read() {
            let _ = writeln!(out, "\nwarning: {e:#} (needed by `serve`)");
        }
    }
    out
}

fn table(out: &mut String, rows: &[[String; 4]]) {
    let mut widths = [0usize; 4];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    out.push('\n');
    for row in rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}
