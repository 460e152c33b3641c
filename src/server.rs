//! Binding the listeners and running the gateway until shutdown: the traffic server, the admin server, the
//! live config's reloads, and the drain that gives in-flight responses `shutdown_grace` to finish.
//!
//! Traffic is served by `server.workers` threads, each running a single-threaded tokio runtime with an
//! upstream connection pool of its own, all accepting from the one listening socket (nginx's worker model).
//! A request, its upstream connection and both of its bodies stay on the thread that accepted it: no
//! hand-off between threads, no work stealing, and wake-ups that never cross a thread (measured large: see
//! bench/README.md). The admin server, signals, reloads, the projects check, the scheduled reconciliation and the
//! ledger's flush run on the caller's runtime.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::limits::LimitsSink;
use crate::live::{Outcome, Reloader};
use crate::metering::ledger::LedgerSink;
use crate::metering::metrics::Metrics;
use crate::metering::spend::Spend;
use crate::proxy::access_log::AccessLines;
use crate::proxy::upstream_auth::UpstreamAuth;
use crate::proxy::{Credential, UpstreamClient, Worker};
use crate::record::Sinks;
use crate::send_timeout::SendTimeout;
use crate::shutdown::{ConnectionDrain, Graceful, Shutdown};

/// The pause after a failed accept, so that a full file table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long the usage ledger may take to write out what is queued at shutdown.
const LEDGER_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// How long the follow-up work of records (see `record`) may take at shutdown.
const FOLLOWUP_LIMIT: Duration = Duration::from_secs(5);

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// Where the traffic listener is bound.
    pub addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    /// Trigger it to drain and stop.
    pub shutdown: Shutdown,
    reloader: Arc<Reloader>,
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

    /// Reloads the config file, as `SIGHUP` does.
    pub async fn reload(&self) -> Outcome {
        self.reloader.reload_blocking().await
    }
}

/// The gateway's upstream credential as configured, ready to use (its key read, or AWS credentials fetched), its
/// refreshes counted on `metrics`.
pub async fn credential(config: &Config, metrics: &Metrics) -> anyhow::Result<Credential> {
    Credential::connect(&config.upstream, metrics).await
}

/// Binds both listeners and starts serving `config`, which never changes (there is no file to reload), with
/// `credential` upstream and `metrics` exported.
pub async fn start(config: Config, credential: Credential, metrics: Arc<Metrics>) -> anyhow::Result<Running> {
    start_with(None, config, credential, metrics).await
}

/// Binds both listeners and starts serving `config`, loaded from the file at `path`, which is reloaded when it
/// changes (and on [`Running::reload`]).
pub async fn start_from(
    path: PathBuf,
    config: Config,
    credential: Credential,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Running> {
    start_with(Some(path), config, credential, metrics).await
}

async fn start_with(
    path: Option<PathBuf>,
    config: Config,
    credential: Credential,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("server.listen: cannot bind {}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| format!("server.admin_listen: cannot bind {}", config.server.admin_listen))?;
    let addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let server = config.server.clone();
    let connector = crate::proxy::client::connector(&config.upstream)?;
    let upstream = config.upstream.clone();

    let shutdown = Shutdown::default();
    let reloader = Reloader::start(path, config, credential, metrics.clone())?;
    // Before traffic starts: what the ledger holds now is read back, what comes after is added as it ends.
    let spend = Spend::start(reloader.live().load().config.metering.ledger_path.as_deref(), SystemTime::now());
    let upstream_auth = Arc::new(UpstreamAuth::new(metrics.upstream_auth_failures()));
    let clients =
        (0..server.workers).map(|_| UpstreamClient::new(connector.clone(), &upstream)).collect::<Result<_, _>>()?;
    let traffic =
        start_workers(listener.into_std()?, clients, &server, &reloader, (&metrics, &spend), &upstream_auth, &shutdown)
            .await?;
    // Calls the Projects API directly, never through the traffic listener.
    let projects_check = tokio::spawn(crate::projects::drift::run(reloader.live().clone(), metrics.clone()));
    // Reads CloudWatch and this replica's ledger; off unless `reconcile.interval` is set.
    let reconcile = tokio::spawn(crate::reconcile::schedule::run(reloader.live().clone(), metrics.clone()));
    let admin = crate::admin::serve(
        admin,
        crate::admin::router(shutdown.clone(), upstream_auth, metrics, reloader.clone(), spend),
        reloader.live().clone(),
    );

    let task = tokio::spawn({
        let (shutdown, reloader) = (shutdown.clone(), reloader.clone());
        async move {
            let admin = tokio::spawn(admin);
            let mut traffic = tokio::spawn(traffic);
            tokio::select! {
                result = &mut traffic => log_exit(result),
                () = shutdown.wait() => {
                    let grace = reloader.live().load().config.server.shutdown_grace;
                    tracing::info!(grace = ?grace, "draining: no new connections, in-flight requests may finish");
                    // The traffic task bounds the drain by the grace itself, and returns once every connection
                    // is gone, so every request's ledger line is queued before the ledger closes.
                    log_exit(traffic.await);
                }
            }
            admin.abort();
            projects_check.abort();
            reconcile.abort();
            reloader.finish(LEDGER_FLUSH_LIMIT).await;
            tracing::info!("stopped");
        }
    });
    tracing::info!(%addr, %admin_addr, workers = server.workers, "mantlegate listening");
    Ok(Running { addr, admin_addr, shutdown, reloader, task })
}

fn log_exit(result: Result<(), tokio::task::JoinError>) {
    match result {
        Ok(()) => tracing::info!("traffic listener drained"),
        Err(e) => tracing::error!(error = %e, "traffic listener task failed"),
    }
}

/// Starts the traffic threads, having made every runtime and listener first (so a failure there starts none; if
/// a thread cannot be started, those already running are stopped), and returns once each is running. The
/// returned future resolves once every thread has drained and stopped.
async fn start_workers(
    listener: std::net::TcpListener,
    clients: Vec<UpstreamClient>,
    server: &crate::config::Server,
    reloader: &Arc<Reloader>,
    (metrics, spend): (&Arc<Metrics>, &Arc<Spend>),
    upstream_auth: &Arc<UpstreamAuth>,
    shutdown: &Shutdown,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let connections = server.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let mut prepared = Vec::with_capacity(clients.len());
    for client in clients {
        let access = Arc::new(AccessLines::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // A traffic thread's access lines wait for it to go idle (or for a batch to fill).
            .on_thread_park({
                let access = access.clone();
                move || access.flush()
            })
            .build()?;
        // Registered with this thread's own event loop; every clone shares the one socket and its backlog.
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener.try_clone()?)?
        };
        let worker = Arc::new(Worker {
            live: reloader.live().clone(),
            client,
            sinks: Sinks::new(vec![
                metrics.clone(),
                Arc::new(LedgerSink),
                spend.clone(),
                access.clone(),
                Arc::new(LimitsSink),
            ]),
            shutdown: shutdown.child(),
            upstream_auth: upstream_auth.clone(),
            closing: AtomicBool::new(false),
        });
        prepared.push((runtime, listener, worker, access));
    }
    let mut stopped = Vec::with_capacity(prepared.len());
    let mut started = Vec::with_capacity(prepared.len());
    for (i, (runtime, listener, worker, access)) in prepared.into_iter().enumerate() {
        let (running, running_rx) = tokio::sync::oneshot::channel::<()>();
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = serve_traffic(listener, worker, connections.clone());
        let spawned = std::thread::Builder::new().name(format!("traffic-{i}")).spawn(move || {
            let _ = running.send(());
            runtime.block_on(serving);
            // Whatever the runtime still held is dropped with it (and writes its lines) before they go out.
            drop(runtime);
            access.flush();
            // Dropped with the sender if the thread panics: either way the thread is done.
            let _ = done.send(());
        });
        if let Err(e) = spawned {
            // The threads already running stop too.
            shutdown.trigger();
            return Err(e).context("starting a traffic thread");
        }
        started.push(running_rx);
        stopped.push(done_rx);
    }
    for running in started {
        running.await.context("a traffic thread ended as it started")?;
    }
    Ok(async move {
        for done in stopped {
            if done.await.is_err() {
                tracing::error!("a traffic thread panicked");
            }
        }
    })
}

/// One traffic thread: accepts connections until shutdown, then lets every open connection finish the
/// request it is serving (hyper's graceful shutdown closes each one after its current response) for at most
/// the shutdown grace, closes whatever is left, and returns when every connection is gone. `cap` holds one
/// permit per caller connection, shared by every thread; none means no cap.
async fn serve_traffic(listener: TcpListener, worker: Arc<Worker>, cap: Option<Arc<Semaphore>>) {
    let tender = tokio::spawn({
        let client = worker.client.clone();
        async move { client.tend_idle().await }
    });
    let service = crate::app::service(worker.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    // Responses are copied into one write buffer rather than written as a list of buffers: the events of a
    // stream that arrived together leave in one `write` (two system calls per 20-event response instead of
    // three) and hyper keeps no buffer list, ~5% fewer instructions per SSE response. The copy is bounded by
    // `CONNECTION_BUFFER`.
    http.writev(false).max_buf_size(crate::proxy::CONNECTION_BUFFER).timer(TokioTimer::new());
    // A head of more than 64 KiB, request line to blank line, gets 431: exactly, where the buffer bound alone
    // let one read more through. (More than 100 header fields get 431 too: hyper's default, kept.)
    http.max_header_size(crate::proxy::CONNECTION_BUFFER);
    let mut header_read_timeout = std::time::Duration::ZERO;
    let drain = Arc::new(ConnectionDrain::default());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // At the cap, connections wait in the listen backlog until one closes (and past the backlog, the
        // kernel stops answering new ones) rather than being taken and then starved of file descriptors.
        let permit = match &cap {
            None => None,
            Some(cap) => tokio::select! {
                permit = cap.clone().acquire_owned() => permit.ok(),
                () = worker.shutdown.wait() => break,
            },
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // The peer gave up before we took the connection: nothing to wait for.
                Err(e) if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted | ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    // Out of file descriptors, typically: the connections already open carry on.
                    tracing::error!(error = %e, "accepting a traffic connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = worker.shutdown.wait() => break,
        };
        // Each SSE event is its own small write: send it now, not after Nagle's delay.
        let _ = tcp.set_nodelay(true);
        let server = worker.live.load().config.server.clone();
        // A caller that stops reading cannot hold its response, and the upstream stream behind it, for ever: a
        // write that waits longer than `send_timeout` for the caller to read fails the connection.
        let tcp = SendTimeout::new(tcp, server.send_timeout);
        // A client that sends half a request head, or opens connections and sends nothing, cannot hold them
        // open for ever. Set only when a reload changed it: the builder's settings are copied into each
        // connection, its timer shared.
        if header_read_timeout != server.header_read_timeout {
            header_read_timeout = server.header_read_timeout;
            http.header_read_timeout(header_read_timeout);
        }
        let connection = drain.watch(http.serve_connection(TokioIo::new(tcp), service.clone()));
        connections.spawn(async move {
            let _permit = permit;
            match connection.await {
                Err(e) if crate::send_timeout::is_send_timeout(&e) => {
                    tracing::warn!(error = %e, "caller connection closed: the caller stopped reading");
                }
                Err(e) => tracing::debug!(error = %e, "traffic connection ended with an error"),
                Ok(()) => {}
            }
        });
        // Connections arriving together wake every traffic thread; taking them one at a time, with the
        // thread's other work in between, lets the others take their share instead of this one taking all.
        tokio::task::yield_now().await;
    }
    drop(listener);
    let grace = worker.live.load().config.server.shutdown_grace;
    drain.start();
    let drained = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "shutdown grace elapsed; closing remaining connections");
        }
        () = worker.shutdown.hurried() => tracing::warn!("closing remaining connections now"),
    }
    // Aborts what is left and waits for it, so each cut request's record is written before this returns.
    worker.closing.store(true, Ordering::Release);
    connections.shutdown().await;
    if tokio::time::timeout(FOLLOWUP_LIMIT, worker.sinks.followups_done()).await.is_err() {
        tracing::warn!("records' follow-up work did not finish in time");
    }
    tender.abort();
}

impl<I, S, B> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn close_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// `mantlegate serve`: starts, reloads the config on SIGHUP (and when its file changes), and stops gracefully
/// on SIGTERM or Ctrl-C.
pub async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let credential = credential(&config, &metrics).await.context("upstream credential")?;
    tracing::info!(credential = %credential.describe(&config.upstream), "upstream credential ready");
    let signal = crate::shutdown::signal();
    // Listened for from before the gateway starts: SIGHUP's default action would end the process.
    let mut hangup = crate::shutdown::hangup()?;
    let running = start_from(path, config, credential, metrics).await?;
    let shutdown = running.shutdown.clone();
    let reloads = tokio::spawn({
        let reloader = running.reloader.clone();
        async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                reloader.reload_blocking().await;
            }
        }
    });
    tokio::select! {
        () = signal => {
            // A second signal ends the grace: what is still open is closed now (and its lines still written).
            // Listened for before the first is logged, so that one sent on seeing the log line is not missed.
            let again = crate::shutdown::signal();
            tracing::info!("shutdown signal received");
            let stopping = running.stop();
            tokio::pin!(stopping);
            tokio::select! {
                () = &mut stopping => {}
                () = again => {
                    tracing::warn!("second shutdown signal: not waiting out the grace");
                    shutdown.hurry();
                    stopping.await;
                }
            }
        }
        () = shutdown.wait() => running.stopped().await,
    }
    reloads.abort();
    Ok(())
}
