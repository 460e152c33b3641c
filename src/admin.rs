//! The admin listener: liveness, readiness, metrics and reloads, never on the traffic port. It faces probes and
//! Prometheus, and in a pod whatever else reaches the pod, so it has bounds of its own: at most
//! [`MAX_CONNECTIONS`] connections (one more is accepted and closed at once, so the file descriptors it can take
//! are bounded and traffic never starves for them), one request per connection (closed after its response, so
//! none is held idle), a head timeout, and the traffic listener's send timeout. `POST /reload` is answered only to callers on the
//! same host. With `server.admin_token_env` or `_file` set, everything but the probes needs that token ([`token`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{StatusCode, header};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub mod error;
pub mod spend;
pub mod token;

use crate::live::{Live, Outcome, Reloader};
use crate::metering::metrics::Metrics;
use crate::proxy::upstream_auth::UpstreamAuth;
use crate::send_timeout::SendTimeout;
use crate::shutdown::Shutdown;

/// Admin connections open at once; one past it is closed as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// The longest an admin connection may take over a request head or sit idle between requests (shorter if
/// `server.header_read_timeout` is).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head the admin listener reads: probes and scrapes send small ones.
const MAX_HEAD: usize = 16 * 1024;

/// Serves `router` on `listener` within the admin listener's bounds, until the task is aborted.
pub async fn serve(listener: TcpListener, router: Router, live: Arc<Live>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an admin connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_CONNECTIONS, "admin connection refused: too many open");
            continue;
        };
        let server = live.load().config.server.clone();
        let mut http = hyper::server::conn::http1::Builder::new();
        // One request per connection: probes and scrapes open a connection each time anyway, and a connection
        // closed after its response cannot be held idle.
        http.timer(TokioTimer::new())
            .keep_alive(false)
            .header_read_timeout(server.header_read_timeout.min(HEAD_TIMEOUT))
            .max_buf_size(MAX_HEAD)
            .max_header_size(MAX_HEAD);
        let io = TokioIo::new(SendTimeout::new(tcp, server.send_timeout));
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            tower_service::Service::call(&mut router.clone(), req)
        });
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = http.serve_connection(io, service).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Whether `peer` is on this host: a reload is for the operator, not for whatever reaches a listener bound to
/// every interface for the probes.
fn is_local(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback()),
    }
}

/// `/healthz` (the process is up), `/readyz` (it takes traffic; 503 while draining, 200 through reloads),
/// `/metrics`, `/limits` (every limit with its use), `POST /reload` (re-reads the config file, as SIGHUP does, and says what happened),
/// and the spend page with its API ([`spend`]); all but the probes behind the admin token, when one is configured.
pub fn router(
    shutdown: Shutdown,
    upstream_auth: Arc<UpstreamAuth>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    spend: Arc<crate::metering::spend::Spend>,
) -> Router {
    let page = spend::routes(spend::Api { spend, live: reloader.live().clone() });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz).with_state((shutdown, upstream_auth)))
        .route("/metrics", get(metrics_text).with_state(metrics))
        .route("/limits", get(limits).with_state(reloader.clone()))
        .route("/reload", post(reload).with_state(reloader.clone()))
        .merge(page)
        // Around every route and the fallback, so an unknown path says no more than a known one.
        .layer(axum::middleware::from_fn_with_state(reloader.live().clone(), token::require))
}

/// Every configured limit with its use now, read from the limits' store (`mantlegate limits status`); 503 if the
/// store cannot be read.
async fn limits(State(reloader): State<Arc<Reloader>>) -> axum::response::Response {
    let snapshot = reloader.live().load();
    let backend = match snapshot.config.limits.backend {
        crate::config::limits::Backend::Memory => "memory",
        crate::config::limits::Backend::Redis(_) => "redis",
    };
    match snapshot.limiter.status(&snapshot).await {
        Ok(limits) => Json(serde_json::json!({ "backend": backend, "limits": limits })).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("the limits store cannot be read: {e}\n")).into_response(),
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
}

/// Ready unless draining. While upstream refuses the gateway's credential the answer stays 200 (every replica
/// has the same credential: taking them all out of service would only turn a clear 502 into refused
/// connections), and says so, for whoever looks.
async fn readyz(State((shutdown, upstream_auth)): State<(Shutdown, Arc<UpstreamAuth>)>) -> (StatusCode, String) {
    if shutdown.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    match upstream_auth.failing_since() {
        None => (StatusCode::OK, "ready\n".into()),
        Some((when, status)) => (
            StatusCode::OK,
            format!(
                "ready\nwarning: upstream refused the gateway's credential ({status}) at {}, and has accepted no \
                 request since\n",
                humantime::format_rfc3339_seconds(when)
            ),
        ),
    }
}

/// 200 with the outcome when the config in force is the file's (applied or unchanged), 422 when the file was
/// refused (the config in force stays), 409 when there is no file (the demo), 403 to a caller on another host.
async fn reload(
    State(reloader): State<Arc<Reloader>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
) -> axum::response::Response {
    if !peer.is_some_and(|axum::Extension(ConnectInfo(peer))| is_local(peer)) {
        let message = "reloads are taken only from this host: send SIGHUP, or run mantlegate reload in the pod\n";
        return (StatusCode::FORBIDDEN, message).into_response();
    }
    if !reloader.reloadable() {
        let message = "this gateway was started without a config file, so there is nothing to reload\n";
        return (StatusCode::CONFLICT, message).into_response();
    }
    let outcome = reloader.reload_blocking().await;
    let status = match outcome {
        Outcome::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::Applied { .. } | Outcome::Unchanged { .. } => StatusCode::OK,
    };
    (status, Json(outcome)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_callers_on_this_host_may_reload() {
        for local in ["127.0.0.1:1", "127.8.9.10:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            assert!(is_local(local.parse().expect("address")), "{local}");
        }
        for remote in ["10.0.0.7:1", "0.0.0.0:1", "[fe80::1]:1", "[::ffff:10.0.0.7]:1", "[::]:1"] {
            assert!(!is_local(remote.parse().expect("address")), "{remote}");
        }
    }
}
