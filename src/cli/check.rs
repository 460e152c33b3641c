//! `mantlegate check`: validates a config and prints who ends up where (key -> projects, route -> project),
//! so a reviewer can read a config change as an attribution change.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::{CallerAuth, Config, Unattributed, UpstreamAuth};

/// Runs the check, printing the report to stdout and problems to stderr; with `probe`, also asks upstream whether
/// it accepts the gateway's credential.
pub fn run(path: &Path, probe: bool) -> anyhow::Result<ExitCode> {
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
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The credential as `serve` would get it: the key read, or AWS credentials fetched from the chain. Only a
    // warning when missing, as configs are checked where their secrets are not (CI, a laptop).
    let credential = runtime.block_on(crate::server::credential(&config, &crate::metering::metrics::Metrics::new()));
    match &credential {
        Ok(credential) => println!("\ncredential: {}", credential.describe(&config.upstream)),
        Err(e) => println!("\nwarning: {e:#} (needed by `serve`)"),
    }
    if probe {
        let probed = match credential {
            Ok(credential) => runtime.block_on(probe_upstream(&config, &credential)),
            Err(e) => Err(e),
        };
        match probed {
            Ok(said) => println!("\nupstream: {said}"),
            Err(e) => {
                eprintln!("upstream: {e:#}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One `GET /v1/models` upstream with the gateway's credential (and the first project's id): what upstream
/// said, or why it is a problem.
async fn probe_upstream(config: &Config, credential: &crate::proxy::Credential) -> anyhow::Result<String> {
    use crate::proxy::{Credential, UpstreamClient, body, headers};
    if let Credential::Passthrough = credential {
        return Ok("passthrough: the gateway has no credential of its own to probe".into());
    }
    let u = &config.upstream;
    let client = UpstreamClient::new(crate::proxy::client::connector(u)?, u)?;
    let project = config.projects.iter().find_map(|p| p.id.as_deref()).unwrap_or("default");
    let mut request = http::Request::get("/v1/models").body(body::whole(bytes::Bytes::new()))?;
    let project_header = http::HeaderValue::from_str(project)?;
    let request_id = http::HeaderValue::from_static("mantlegate-check");
    headers::to_upstream(request.headers_mut(), crate::endpoint::Api::OpenAi, &project_header, credential, &request_id);
    if let Credential::SigV4(signer) = credential {
        signer.sign(&http::Method::GET, "/v1/models", request.headers_mut(), b"")?;
    }
    let response = tokio::time::timeout(u.response_timeout, client.request(request, u))
        .await
        .map_err(|_| anyhow::anyhow!("{} did not answer within {:?}", u.authority, u.response_timeout))?
        .map_err(|e| {
            anyhow::anyhow!("{} could not be reached: {}", u.authority, crate::proxy::access_log::error_chain(&*e))
        })?;
    let status = response.status();
    // A 403 refuses the credential only when its code says so (as the proxy judges it): else it is about what the
    // credential may do.
    let forbidden_code = if status == http::StatusCode::FORBIDDEN {
        let (parts, body) = response.into_parts();
        let body = body::read(body, 16 * 1024).await.unwrap_or_default();
        let codes = crate::proxy::error_codes(&parts.headers, &body);
        Some(crate::proxy::credential_code(&codes).ok_or_else(|| codes.first().cloned().unwrap_or_default()))
    } else {
        None
    };
    match status.as_u16() {
        200..=299 => Ok(format!("{} accepts the gateway's credential (GET /v1/models: {status})", u.authority)),
        403 if matches!(forbidden_code, Some(Err(_))) => anyhow::bail!(
            "{} answered GET /v1/models with {status} (code {:?}), which is not a refusal of the credential: it \
             may lack a permission (project {project})",
            u.authority,
            forbidden_code.and_then(Result::err).unwrap_or_default()
        ),
        401 | 403 => anyhow::bail!(
            "{} refused the gateway's credential (GET /v1/models: {status}): {}",
            u.authority,
            credential.refusal_hint()
        ),
        _ => anyhow::bail!("{} answered GET /v1/models with {status} (project {project})", u.authority),
    }
}

/// The check report.
pub fn report(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    let u = &config.upstream;
    let _ = writeln!(out, "{}: valid (sha256 {})", path.display(), config.sha256);
    let region = u.region.as_deref().unwrap_or("");
    let auth = match &u.auth {
        UpstreamAuth::ApiKey(source) => format!("api_key from {source}"),
        UpstreamAuth::SigV4 => format!("sigv4 for {region}, AWS credentials from the standard chain"),
        UpstreamAuth::AwsToken => format!("aws_token for {region}, AWS credentials from the standard chain"),
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
            match (&p.id, config.lock.ids.contains(&p.name)) {
                (Some(id), true) => format!("{id} (from {})", crate::config::lock::FILE_NAME),
                (Some(id), false) => id.clone(),
                (None, _) => "(none: not provisioned)".into(),
            } + if p.archived { " (archived)" } else { "" },
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

    if !config.limits.rules.is_empty() {
        let mut rows = vec![["LIMITS".to_string(), "KIND".into(), "VALUE".into(), String::new()]];
        for rule in &config.limits.rules {
            for (kind, value) in &rule.limits {
                let value = match kind.is_budget() {
                    true => format!("${:.2}", *value as f64 / crate::config::limits::NANOS_PER_USD),
                    false => value.to_string(),
                };
                rows.push([rule.subject.to_string(), kind.name().into(), value, String::new()]);
            }
        }
        table(&mut out, &rows);
        if let crate::config::limits::Backend::Redis(url) = &config.limits.backend
            && let Err(e) = url.resolve()
        {
            let _ = writeln!(out, "\nwarning: {e:#} (needed by `serve`)");
        }
        if config.metering.ledger_path.is_none() {
            let _ = writeln!(
                out,
                "\nwarning: limits without [metering] ledger_path: spend cannot be rebuilt, so a restart (memory backend) \
                 or a Redis that loses its data starts the month's budgets from zero"
            );
        }
    }
    let reconcile = &config.reconcile;
    if let (Some(interval), Some(region)) = (reconcile.interval, &reconcile.region) {
        let _ = writeln!(
            out,
            "\nreconcile: every {}, the last {} of this replica's ledger against CloudWatch in {region} (tolerance {}%); \
             needs AWS credentials allowed cloudwatch:GetMetricData",
            humantime::format_duration(interval),
            humantime::format_duration(reconcile.lookback),
            reconcile.tolerance
        );
    }
    if let Some(why) = &config.lock.ignored {
        let _ = writeln!(out, "\nwarning: {why}");
    }
    match &config.server.admin_token {
        None if !config.server.admin_listen.ip().is_loopback() => {
            let _ = writeln!(
                out,
                "\nwarning: server.admin_listen {} is not loopback and no admin token is set: whatever reaches it \
                 reads /metrics and the spend page (set server.admin_token_env or server.admin_token_file, or keep \
                 the port to the kubelet and Prometheus with a NetworkPolicy)",
                config.server.admin_listen
            );
        }
        None => {}
        // Read as `serve` would, and only warned about: configs are checked where their secrets are not.
        Some(token) => match token.read() {
            Ok(_) => {
                let _ = writeln!(
                    out,
                    "\nadmin listener: a bearer token from {token} is required (but for /healthz, /readyz)"
                );
            }
            Err(e) => {
                let _ = writeln!(out, "\nwarning: {e:#} (needed by `serve`)");
            }
        },
    }
    let unprovisioned: Vec<&str> =
        config.projects.iter().filter(|p| p.id.is_none() && !p.archived).map(|p| p.name.as_str()).collect();
    if !unprovisioned.is_empty() {
        let _ = writeln!(
            out,
            "\nwarning: {} ha{} no id yet; `serve` refuses to start until every project has one (run `mantlegate \
             projects apply`)",
            unprovisioned.join(", "),
            if unprovisioned.len() == 1 { "s" } else { "ve" }
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    const PROJECT: &str = "[[projects]]\nname = \"A\"\nid = \"proj_a\"\n[callers]\nauth = \"none\"\n";

    fn report_of(server: &str) -> String {
        let config = Config::from_toml(&format!("[server]\n{server}\n{PROJECT}")).expect("config");
        report(Path::new("gateway.toml"), &config)
    }

    #[test]
    fn an_admin_listener_off_loopback_without_a_token_is_warned_about() {
        let exposed = report_of("admin_listen = \"0.0.0.0:9091\"");
        assert!(exposed.contains("warning: server.admin_listen 0.0.0.0:9091 is not loopback and no admin token"));
        assert!(!report_of("admin_listen = \"127.0.0.1:9091\"").contains("admin_listen"));
        let unset = report_of("admin_listen = \"0.0.0.0:9091\"\nadmin_token_env = \"MANTLEGATE_TEST_UNSET_TOKEN\"");
        assert!(!unset.contains("is not loopback"), "{unset}");
        assert!(
            unset.contains(
                "warning: server.admin_token_env: environment variable MANTLEGATE_TEST_UNSET_TOKEN is not set"
            ),
            "{unset}"
        );
    }
}
