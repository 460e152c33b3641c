//! Binding the listeners and running the gateway until shutdown: the traffic server, the admin server, and
//! the drain that gives in-flight responses `shutdown_grace` to finish.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Config, UpstreamAuth};
use crate::metering::Meter;
use crate::proxy::{Credential, Gateway};
use crate::shutdown::Shutdown;

/// How long the usage ledger may take to write out what is queued at shutdown.
const LEDGER_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// Where the traffic listener is bound.
    pub addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    /// Trigger it to drain and stop.
    pub shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl Running {
    /// Resolves when the gateway has stopped (after a shutdown trigger and the drain).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }

    /// Triggers shutdown and waits for the drain.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.stopped().await;
    }
}

/// Reads the gateway's upstream credential as configured.
pub fn credential(config: &Config) -> anyhow::Result<Credential> {
    match &config.upstream.auth {
        UpstreamAuth::ApiKey(source) => Credential::api_key(&source.read()?),
        UpstreamAuth::Passthrough => Ok(Credential::Passthrough),
    }
}

/// Binds both listeners and starts serving.
pub async fn start(config: Config, credential: Credential) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("server.listen: cannot bind {}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| format!("server.admin_listen: cannot bind {}", config.server.admin_listen))?;
    let addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let grace = config.server.shutdown_grace;

    let shutdown = Shutdown::default();
    let (meter, ledger) = Meter::new(&config)?;
    let meter = Arc::new(meter);
    let gateway = Arc::new(Gateway::new(config, credential, meter.clone(), shutdown.clone())?);
    let traffic = axum::serve(
        listener.tap_io(|tcp| {
            // Each SSE event is its own small write: send it now, not after Nagle's delay.
            let _ = tcp.set_nodelay(true);
        }),
        crate::app::router(gateway),
    )
    .with_graceful_shutdown({
        let shutdown = shutdown.clone();
        async move { shutdown.wait().await }
    });
    let admin = axum::serve(admin, crate::admin::router(shutdown.clone(), meter));

    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let admin = tokio::spawn(admin.into_future());
            let mut traffic = tokio::spawn(traffic.into_future());
            tokio::select! {
                result = &mut traffic => log_exit(result),
                () = shutdown.wait() => {
                    tracing::info!(grace = ?grace, "draining: no new connections, in-flight requests may finish");
                    match tokio::time::timeout(grace, &mut traffic).await {
                        Ok(result) => log_exit(result),
                        Err(_) => {
                            tracing::warn!(grace = ?grace, "shutdown grace elapsed; closing remaining connections");
                            traffic.abort();
                        }
                    }
                }
            }
            admin.abort();
            if let Some(ledger) = ledger {
                ledger.finish(LEDGER_FLUSH_LIMIT).await;
            }
            tracing::info!("stopped");
        }
    });
    tracing::info!(%addr, %admin_addr, "mantlegate listening");
    Ok(Running { addr, admin_addr, shutdown, task })
}

fn log_exit(result: Result<std::io::Result<()>, tokio::task::JoinError>) {
    match result {
        Ok(Ok(())) => tracing::info!("traffic listener drained"),
        Ok(Err(e)) => tracing::error!(error = %e, "traffic listener failed"),
        Err(e) => tracing::error!(error = %e, "traffic listener task failed"),
    }
}

/// `mantlegate serve`: starts, then stops gracefully on SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let credential = credential(&config)?;
    let running = start(config, credential).await?;
    let shutdown = running.shutdown.clone();
    tokio::select! {
        () = crate::shutdown::signal() => {
            tracing::info!("shutdown signal received");
            running.stop().await;
        }
        () = shutdown.wait() => running.stopped().await,
    }
    Ok(())
}
