//! The admin listener: liveness, readiness and metrics, never on the traffic port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{StatusCode, header};

use crate::metering::Meter;
use crate::shutdown::Shutdown;

/// `/healthz` (the process is up), `/readyz` (it takes traffic; 503 while draining), `/metrics`.
pub fn router(shutdown: Shutdown, meter: Arc<Meter>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz).with_state(shutdown))
        .route("/metrics", get(metrics).with_state(meter))
}

async fn metrics(State(meter): State<Arc<Meter>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], meter.render())
}

async fn readyz(State(shutdown): State<Shutdown>) -> (StatusCode, &'static str) {
    if shutdown.is_draining() { (StatusCode::SERVICE_UNAVAILABLE, "draining\n") } else { (StatusCode::OK, "ready\n") }
}
