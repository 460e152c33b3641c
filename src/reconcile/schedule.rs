//! Reconciliation while serving: with `reconcile.interval` set, `serve` compares its own ledger with CloudWatch
//! on start and then at that interval, over the `reconcile.lookback` hours ending at the last whole hour before 15
//! minutes ago, exports each row as `mantlegate_reconcile_tokens` and `mantlegate_reconcile_verdict`, and logs a
//! warning for each `bypass` (and `unattributed`) row.
//!
//! It reads this replica's ledger only, so it sees this replica's share of the traffic: it fits one replica, a
//! sidecar (one workload, one project), or replicas writing one shared ledger. Behind several replicas with a
//! ledger each, every project would read as `bypass` here; `mantlegate usage reconcile --ledger ...` with every
//! replica's ledger is the tool for those.
//!
//! As the projects check does, it reads the snapshot in force at least every [`CONFIG_RECHECK`], so a reload turns
//! it on, off or changes it without a restart.

use std::sync::Arc;
use std::time::SystemTime;

use super::compare::Verdict;
use super::names::ProjectNames;
use super::window::Window;
use super::{Report, Request};
use crate::aws::cloudwatch::CloudWatch;
use crate::live::Live;
use crate::metering::metrics::Metrics;
use crate::projects::drift::CONFIG_RECHECK;
use crate::snapshot::Snapshot;

/// Reconciles, then waits the interval in force, for ever (the server aborts it at shutdown).
pub async fn run(live: Arc<Live>, metrics: Arc<Metrics>) {
    // The client for the region last read: made again when a reload changes the region.
    let mut client: Option<CloudWatch> = None;
    let mut exported = false;
    loop {
        let snapshot = live.load();
        if snapshot.config.reconcile.interval.is_none() {
            // Turned off by a reload: rows no longer checked are no longer exported.
            if exported {
                metrics.reconcile_rows(&[]);
                exported = false;
            }
            tokio::time::sleep(CONFIG_RECHECK).await;
            continue;
        }
        let started = tokio::time::Instant::now();
        match once(&snapshot, &mut client).await {
            Ok(report) => {
                log(&report);
                metrics.reconcile_rows(&report.comparison.rows);
                metrics.reconciled(if report.ok { "ok" } else { "discrepancies" });
                exported = true;
            }
            Err(e) => {
                metrics.reconciled("failed");
                tracing::warn!(error = %format!("{e:#}"), "reconciliation with CloudWatch failed; the last rows stay");
            }
        }
        wait(&live, started).await;
    }
}

/// One reconciliation of the snapshot's ledger over its lookback.
async fn once(snapshot: &Snapshot, client: &mut Option<CloudWatch>) -> anyhow::Result<Report> {
    let config = &snapshot.config;
    let settings = &config.reconcile;
    // Validation requires both while an interval is set.
    let ledger = config.metering.ledger_path.clone().ok_or_else(|| anyhow::anyhow!("no metering.ledger_path"))?;
    let region = settings.region.clone().ok_or_else(|| anyhow::anyhow!("no region (upstream.region)"))?;
    let now = SystemTime::now();
    let request = Request {
        names: ProjectNames::new(&config.projects),
        configured: true,
        ledgers: vec![ledger],
        window: Window::lookback(now, settings.lookback),
        tolerance: settings.tolerance,
    };
    let gateway = {
        let request = request.clone();
        tokio::task::spawn_blocking(move || super::gateway_side(&request)).await??
    };
    let cloudwatch = match client.take() {
        Some(made) if made.region() == region => made,
        _ => CloudWatch::new(Some(&region)).await?,
    };
    let report = super::reconcile(&cloudwatch, &request, &gateway, now).await;
    *client = Some(cloudwatch);
    Ok(report?)
}

/// A warning for each row that shows traffic around the gateway; a summary either way.
fn log(report: &Report) {
    for r in &report.comparison.rows {
        let (project, model) = (r.project.as_str(), r.model.as_str());
        let (gateway_input, aws_input) = (r.gateway.input, r.aws.input);
        let (gateway_output, aws_output) = (r.gateway.output, r.aws.output);
        match r.verdict {
            Verdict::Bypass => tracing::warn!(
                project,
                model,
                gateway_input,
                aws_input,
                gateway_output,
                aws_output,
                "reconcile: AWS counted more tokens than the gateway forwarded: traffic reaches this project without \
                 the gateway"
            ),
            Verdict::Unattributed => tracing::warn!(
                project,
                model,
                aws_input,
                aws_output,
                "reconcile: tokens in the account's default project: traffic nothing attributed"
            ),
            Verdict::Missing => tracing::info!(
                project,
                model,
                gateway_input,
                aws_input,
                gateway_output,
                aws_output,
                "reconcile: the gateway forwarded more tokens than AWS counted (another region or account, or late \
                 metrics)"
            ),
            Verdict::Ok => {}
        }
    }
    let counts: Vec<String> = report.comparison.counts().iter().map(|(v, n)| format!("{n} {}", v.name())).collect();
    tracing::info!(
        window = %format!("{} .. {}", report.window.start, report.window.end),
        region = %report.region,
        rows = %counts.join(", "),
        "reconciled the ledger with CloudWatch"
    );
}

/// Until the interval in force has passed since `started`, looking every [`CONFIG_RECHECK`] for a reload that
/// shortened it or turned reconciliation off.
async fn wait(live: &Live, started: tokio::time::Instant) {
    while let Some(interval) = live.load().config.reconcile.interval {
        let now = tokio::time::Instant::now();
        let due = started + interval;
        if now >= due {
            return;
        }
        tokio::time::sleep((due - now).min(CONFIG_RECHECK)).await;
    }
}
