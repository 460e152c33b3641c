//! The admin listener: liveness, readiness, metrics and reloads, never on the traffic port.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{StatusCode, header};

use crate::live::{Outcome, Reloader};
use crate::metering::metrics::Metrics;
use crate::shutdown::Shutdown;

/// `/healthz` (the process is up), `/readyz` (it takes traffic; 503 while draining, 200 through reloads),
/// `/metrics`, and `POST /reload` (re-reads the config file, as SIGHUP does, and says what happened).
pub fn router(shutdown: Shutdown, metrics: Arc<Metrics>, reloader: Arc<Reloader>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz).with_state(shutdown))
        .route("/metrics", get(metrics_text).with_state(metrics))
        .route("/reload", post(reload).with_state(reloader))
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
}

async fn readyz(State(shutdown): State<Shutdown>) -> (StatusCode, &'static str) {
    if shutdown.is_draining() { (StatusCode::SERVICE_UNAVAILABLE, "draining\n") } else { (StatusCode::OK, "ready\n") }
}

/// 200 with the outcome when the config in force is the file's (applied or unchanged), 422 when the file was
/// refused (the config in force stays).
async fn reload(State(reloader): State<Arc<Reloader>>) -> (StatusCode, Json<Outcome>) {
    let outcome = reloader.reload_blocking().await;
    let status = match outcome {
        Outcome::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::Applied { .. } | Outcome::Unchanged { .. } => StatusCode::OK,
    };
    (status, Json(outcome))
}
