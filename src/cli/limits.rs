//! `mantlegate limits status`: every configured limit with what its window has used, as the running gateway
//! reads it from its store (`GET /limits` on the admin listener). With the Redis backend and no gateway to ask,
//! the counters are read from Redis directly.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::config::limits::Backend;
use crate::limits::Status;

/// How long the gateway (or Redis) may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /limits` answers.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Answer {
    backend: String,
    limits: Vec<Row>,
}

/// One limit, as `GET /limits` writes it.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Row {
    subject: String,
    limit: String,
    max: f64,
    used: f64,
    remaining: f64,
    resets_at: String,
}

impl From<Status> for Row {
    fn from(s: Status) -> Self {
        Self {
            subject: s.subject,
            limit: s.limit.into(),
            max: s.max,
            used: s.used,
            remaining: s.remaining,
            resets_at: s.resets_at,
        }
    }
}

/// Prints the limits of the config at `path` with their use, as `format` (`text` or `json`).
pub async fn status(path: &Path, admin: Option<String>, format: &str) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    if config.limits.rules.is_empty() {
        println!("no limits are configured ([[limits.rules]] in {})", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let admin = admin.unwrap_or_else(|| config.server.admin_listen.to_string());
    let token = config.server.admin_token.as_ref().map(|t| t.read()).transpose()?;
    let asked =
        tokio::time::timeout(TIMEOUT, super::reload::call(&admin, http::Method::GET, "/limits", token.as_ref())).await;
    let answer = match asked {
        Ok(Ok((status, body, _))) if status.is_success() => serde_json::from_slice::<Answer>(&body)
            .map_err(|e| anyhow::anyhow!("{admin} answered /limits with something else: {e}"))?,
        Ok(Ok((status, body, _))) => {
            anyhow::bail!("{admin} answered {status}: {}", String::from_utf8_lossy(&body).trim())
        }
        Ok(Err(e)) if matches!(config.limits.backend, Backend::Redis(_)) => {
            eprintln!("note: {e:#}; reading Redis directly");
            direct(config).await?
        }
        Ok(Err(e)) => return Err(e.context("the memory backend's counters live in the running gateway")),
        Err(_) => anyhow::bail!("{admin} did not answer within {TIMEOUT:?}"),
    };
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(&answer)?),
        "text" => print!("{}", render(&answer)),
        other => anyhow::bail!("--format {other:?}: use text or json"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The limits of `config` read from its Redis.
async fn direct(config: Config) -> anyhow::Result<Answer> {
    let metrics = crate::metering::metrics::Metrics::new();
    let limiter = crate::limits::Limiter::start(&config.limits, None, metrics.limits())?;
    let mut snapshot = crate::snapshot::Snapshot::build(config, crate::proxy::Credential::Passthrough, None, &metrics)
        .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?;
    snapshot.limiter = limiter.clone();
    let limits = tokio::time::timeout(TIMEOUT, limiter.status(&snapshot))
        .await
        .map_err(|_| anyhow::anyhow!("Redis did not answer within {TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("Redis could not be read: {e}"))?;
    Ok(Answer { backend: "redis".into(), limits: limits.into_iter().map(Row::from).collect() })
}

fn render(answer: &Answer) -> String {
    let mut out = format!("limits ({} backend):\n", answer.backend);
    let width = answer.limits.iter().map(|r| r.subject.len()).max().unwrap_or(7).max(7);
    let _ = writeln!(
        out,
        "{:width$}  {:24}  {:>14}  {:>14}  {:>14}  RESETS",
        "SUBJECT", "LIMIT", "MAX", "USED", "REMAINING"
    );
    for r in &answer.limits {
        let amount = |n: f64| match r.limit.starts_with("usd_") {
            true => format!("${n:.4}"),
            false => format!("{n:.0}"),
        };
        let _ = writeln!(
            out,
            "{:width$}  {:24}  {:>14}  {:>14}  {:>14}  {}",
            r.subject,
            r.limit,
            amount(r.max),
            amount(r.used),
            amount(r.remaining),
            r.resets_at
        );
    }
    out
}
