//! `mantlegate usage reconcile`: the gateway's ledgers (one per replica) against the tokens AWS counted in
//! CloudWatch, per project and model, once; the exit status says whether anything is off, so that a cron job or
//! CI can alert on it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use crate::aws::cloudwatch::CloudWatch;
use crate::config::{self, Config};
use crate::reconcile::names::ProjectNames;
use crate::reconcile::window::{self, SETTLE, Window};
use crate::reconcile::{DEFAULT_TOLERANCE, Request};

/// Exit status when a row is not `ok`.
pub const EXIT_OFF: u8 = 2;
/// Exit status when CloudWatch could not be read.
pub const EXIT_CLOUDWATCH: u8 = 3;

/// The command's arguments.
#[derive(Debug)]
pub struct Args {
    /// Start of the window.
    pub since: String,
    /// End of the window.
    pub until: Option<String>,
    /// Ledger files.
    pub ledgers: Vec<PathBuf>,
    /// Config file.
    pub config: Option<PathBuf>,
    /// AWS region.
    pub region: Option<String>,
    /// Tolerance, in percent.
    pub tolerance: Option<f64>,
    /// `text`, `json` or `csv`.
    pub format: String,
}

/// Runs it: the report on stdout; exit 0 every row ok, [`EXIT_OFF`] otherwise, [`EXIT_CLOUDWATCH`] when
/// CloudWatch could not be read (errors otherwise, for exit 1).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !matches!(args.format.as_str(), "text" | "table" | "json" | "csv") {
        anyhow::bail!("--format {:?}: use text, json or csv", args.format);
    }
    // The config names the projects (and the lock file beside it their ids); without one, the ledgers do.
    let config = match args.config {
        Some(path) => Some(Config::load(&path)?),
        None => Some(config::resolve_path(None)).filter(|p| p.is_file()).map(|p| Config::load(&p)).transpose()?,
    };
    let ledgers = if args.ledgers.is_empty() {
        let path = config.as_ref().and_then(|c| c.metering.ledger_path.clone());
        vec![path.ok_or_else(|| anyhow::anyhow!("no --ledger given, and no config with a [metering] ledger_path"))?]
    } else {
        args.ledgers
    };
    let tolerance = args.tolerance.or(config.as_ref().map(|c| c.reconcile.tolerance)).unwrap_or(DEFAULT_TOLERANCE);
    if !tolerance.is_finite() || !(0.0..100.0).contains(&tolerance) {
        anyhow::bail!("--tolerance {tolerance}: a percentage from 0 to below 100");
    }
    let now = SystemTime::now();
    let since = window::parse_time(&args.since, now).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until = match &args.until {
        Some(until) => window::parse_time(until, now).map_err(|e| anyhow::anyhow!("--until: {e}"))?,
        None => now.checked_sub(SETTLE).unwrap_or(now),
    };
    let request = Request {
        names: config.as_ref().map(|c| ProjectNames::new(&c.projects)).unwrap_or_default(),
        configured: config.is_some(),
        ledgers,
        window: Window::aligned(since, until)?,
        tolerance,
    };
    let gateway = crate::reconcile::gateway_side(&request)?;
    let region = args.region.or_else(|| config.as_ref().and_then(|c| c.reconcile.region.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let cloudwatch = CloudWatch::new(region.as_deref()).await?;
        match crate::reconcile::reconcile(&cloudwatch, &request, &gateway, now).await {
            Ok(report) => {
                print!("{}", crate::reconcile::render::render(&report, &args.format)?);
                Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(EXIT_OFF) })
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(EXIT_CLOUDWATCH))
            }
        }
    })
}
