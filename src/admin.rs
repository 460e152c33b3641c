//! The admin listener: liveness and readiness, never on the traffic port.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use http::StatusCode;

use crate::shutdown::Shutdown;

/// `/healthz` (the process is up) and `/readyz` (it takes traffic; 503 while draining).
pub fn router(shutdown: Shutdown) -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(readyz)).with_state(shutdown)
}

async fn readyz(State(shutdown): State<Shutdown>) -> (StatusCode, &'static str) {
    if shutdown.is_draining() { (StatusCode::SERVICE_UNAVAILABLE, "draining\n") } else { (StatusCode::OK, "ready\n") }
}
