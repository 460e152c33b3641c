//! Reconciliation against AWS: the tokens the gateway's ledgers say it forwarded, per project and model, beside
//! the tokens AWS itself counted (CloudWatch, `AWS/BedrockMantle`), over the same whole hours. AWS counting more
//! than the gateway forwarded means traffic reaching a project without the gateway; tokens in the `default`
//! project mean traffic nothing attributed. `mantlegate usage reconcile` runs it once over any number of ledgers
//! (one per replica); `serve` can run it on a schedule over its own ledger ([`schedule`]).
//!
//! [`window`] aligns the hours, [`ledger`] sums the gateway's side, [`names`] says which project is which on
//! each side, `aws::cloudwatch` reads AWS's side, [`compare`] judges each row, and [`render`] prints the report.

pub mod compare;
pub mod ledger;
pub mod names;
pub mod render;
pub mod schedule;
pub mod window;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use self::compare::{CachedInput, Comparison};
use self::ledger::GatewayUsage;
use self::names::{Form, ProjectNames};
use self::window::{PERIOD, SETTLE, Window};
use crate::aws::cloudwatch::{CloudWatch, NAMESPACE, ReadError, Sums};

pub use crate::config::reconcile::DEFAULT_TOLERANCE;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Request {
    /// The configured projects (none without a config).
    pub names: ProjectNames,
    /// Whether they came from a config (else projects are known from the ledgers only).
    pub configured: bool,
    /// The ledgers, one per replica (each with its rotated files).
    pub ledgers: Vec<PathBuf>,
    /// The hours compared.
    pub window: Window,
    /// Counts within this percentage of the larger are `ok`.
    pub tolerance: f64,
}

/// The window, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowReport {
    /// Its first instant.
    pub start: String,
    /// The first instant after it.
    pub end: String,
    /// CloudWatch's period: an hour.
    pub period_seconds: u64,
    /// Whole periods in it.
    pub periods: u64,
}

/// A reconciliation's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `AWS/BedrockMantle`.
    pub namespace: &'static str,
    /// The region read.
    pub region: String,
    /// The hours compared.
    pub window: WindowReport,
    /// Counts within this percentage of the larger are `ok`.
    pub tolerance_percent: f64,
    /// The ledger files read.
    pub ledger_files: Vec<String>,
    /// Ledger lines counted (in the window).
    pub ledger_lines: u64,
    /// Ledger lines that could not be read.
    pub unreadable_lines: u64,
    /// Ledger lines in the window a limit refused: never forwarded, not counted.
    pub refused_lines: u64,
    /// The rows and what was decided on the way.
    #[serde(flatten)]
    pub comparison: Comparison,
    /// Whether every row is `ok`.
    pub ok: bool,
    /// What a reader should know about how it was compared.
    pub notes: Vec<String>,
}

/// The gateway's side of `request` (blocking: it reads the ledgers).
pub fn gateway_side(request: &Request) -> anyhow::Result<GatewayUsage> {
    ledger::read(&request.ledgers, &request.window, &request.names)
}

/// Reads AWS's side from `cloudwatch` and compares it with `gateway` (read for `request`). `now` is when the
/// window was chosen, for the note on a last hour that may still be filling in.
pub async fn reconcile(
    cloudwatch: &CloudWatch,
    request: &Request,
    gateway: &GatewayUsage,
    now: SystemTime,
) -> Result<Report, ReadError> {
    let subjects = request.names.subjects(&gateway.models(), &gateway.ids);
    let series = compare::series(&subjects);
    let aws: HashMap<_, Sums> = cloudwatch.sums(&request.window, &series).await?;
    let comparison = compare::compare(&subjects, gateway, &aws, request.tolerance);
    Ok(report(cloudwatch.region(), request, gateway, comparison, now))
}

fn report(region: &str, request: &Request, gateway: &GatewayUsage, comparison: Comparison, now: SystemTime) -> Report {
    let window = &request.window;
    let mut notes = vec![format!(
        "window: {} whole hour{} (CloudWatch sums by the hour: the ends asked for are rounded down to the hour, and \
         ledger lines are counted by the time their request ended)",
        window.periods(),
        if window.periods() == 1 { "" } else { "s" }
    )];
    if now.checked_sub(SETTLE).is_some_and(|settled| window.end > settled) {
        notes.push(
            "the window's last hour ended less than 15 minutes ago: its metrics may still be arriving in CloudWatch, \
             so a `missing` there may be lag"
                .into(),
        );
    }
    let by = |form| comparison.project_dimension.get(&form).copied().unwrap_or(0);
    notes.push(match (by(Form::Id), by(Form::Name)) {
        (0, 0) => "no configured or ledger project had data in CloudWatch in the window".into(),
        (ids, 0) => format!("CloudWatch's Project dimension named projects by id ({ids} found)"),
        (0, names) => format!("CloudWatch's Project dimension named projects by name ({names} found)"),
        (ids, names) => format!("CloudWatch's Project dimension named {ids} projects by id and {names} by name"),
    });
    notes.push(
        match comparison.cached_input {
            CachedInput::NoneSeen => "no cached input tokens in the ledgers' window",
            CachedInput::Counted => {
                "cached input tokens: counted as input, as the gateway counts them (AWS's totals are nearer that way)"
            }
            CachedInput::NotCounted => {
                "cached input tokens: AWS's input totals are nearer the gateway's without them, so the gateway's \
                 input is compared less its cached tokens"
            }
        }
        .to_owned(),
    );
    if comparison.account.is_none() {
        notes.push(
            "CloudWatch has no account-wide series for the window: tokens in projects neither the config nor the \
             ledgers name could not be checked"
                .into(),
        );
    }
    if !request.configured {
        notes.push("no config: projects are known from the ledgers only".into());
    }
    if gateway.skipped > 0 {
        notes.push(format!("{} unreadable ledger lines skipped", gateway.skipped));
    }
    let ok = comparison.all_ok();
    Report {
        namespace: NAMESPACE,
        region: region.to_owned(),
        window: WindowReport {
            start: humantime::format_rfc3339_seconds(window.start).to_string(),
            end: humantime::format_rfc3339_seconds(window.end).to_string(),
            period_seconds: PERIOD.as_secs(),
            periods: window.periods(),
        },
        tolerance_percent: request.tolerance,
        ledger_files: gateway.files.iter().map(|f| f.display().to_string()).collect(),
        ledger_lines: gateway.lines,
        unreadable_lines: gateway.skipped,
        refused_lines: gateway.refused,
        comparison,
        ok,
        notes,
    }
}
