//! Binding the listeners and running the gateway until shutdown: the traffic server, the admin server, and
//! the drain that gives in-flight responses `shutdown_grace` to finish.
//!
//! Traffic is served by `server.workers` threads, each running a single-threaded tokio runtime with an
//! upstream connection pool of its own, all accepting from the one listening socket (nginx's worker model).
//! A request, its upstream connection and both of its bodies stay on the thread that accepted it: no
//! hand-off between threads, no work stealing, and wake-ups that never cross a thread. The admin server,
//! signals and the ledger's flush run on the caller's runtime.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::{Config, KeySource, UpstreamAuth};
use crate::deadline::{Deadlines, HyperTimer};
use crate::metering::Meter;
use crate::proxy::{Credential, Gateway, KeyFileWatch, UpstreamClient, Worker, access_log};
use crate::send_timeout::SendTimeout;
use crate::shutdown::{ConnectionDrain, Graceful, Shutdown};

/// The pause after a failed accept, so that a full file table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long the usage ledger may take to write out what is queued at shutdown.
const LEDGER_FLUSH_LIMIT: Duration = Duration::from_secs(5);

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
    let server = config.server.clone();
    let (grace, workers) = (server.shutdown_grace, server.workers);

    let shutdown = Shutdown::default();
    let (meter, ledger) = Meter::new(&config)?;
    let meter = Arc::new(meter);
    let key_watch = watch_key_file(&config, &credential, &meter);
    let gateway = Arc::new(Gateway::new(config, credential, meter.clone(), shutdown.clone())?);
    let traffic = start_workers(listener.into_std()?, &server, &gateway, &shutdown).await?;
    let admin = axum::serve(admin, crate::admin::router(shutdown.clone(), meter));

    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            // Kept until the gateway stops.
            let _key_watch = key_watch;
            let admin = tokio::spawn(admin.into_future());
            let mut traffic = tokio::spawn(traffic);
            tokio::select! {
                result = &mut traffic => log_exit(result),
                () = shutdown.wait() => {
                    tracing::info!(grace = ?grace, "draining: no new connections, in-flight requests may finish");
                    // The traffic task bounds the drain by `grace` itself, and returns once every connection
                    // is gone, so every request's ledger line is queued before the ledger closes.
                    log_exit(traffic.await);
                }
            }
            admin.abort();
            if let Some(ledger) = ledger {
                ledger.finish(LEDGER_FLUSH_LIMIT).await;
            }
            tracing::info!("stopped");
        }
    });
    tracing::info!(%addr, %admin_addr, workers, "mantlegate listening");
    Ok(Running { addr, admin_addr, shutdown, task })
}

/// Starts re-reading `upstream.api_key_file` on change, when the key comes from a file. A watch that cannot be
/// set up (no inotify instances left, say) is logged and the gateway runs on with the key it read.
fn watch_key_file(config: &Config, credential: &Credential, meter: &Arc<Meter>) -> Option<KeyFileWatch> {
    let (UpstreamAuth::ApiKey(source @ KeySource::File(_)), Credential::ApiKey(key)) =
        (&config.upstream.auth, credential)
    else {
        return None;
    };
    match KeyFileWatch::start(source.clone(), key.clone(), meter.clone()) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(error = %e, "upstream.api_key_file will not be re-read when it changes");
            None
        }
    }
}

fn log_exit(result: Result<(), tokio::task::JoinError>) {
    match result {
        Ok(()) => tracing::info!("traffic listener drained"),
        Err(e) => tracing::error!(error = %e, "traffic listener task failed"),
    }
}

/// Starts the traffic threads, having made every runtime, listener and client first (so a failure there
/// starts none; if a thread cannot be started, those already running are stopped), and returns once each is
/// running. The returned future resolves once every thread has drained and stopped.
async fn start_workers(
    listener: std::net::TcpListener,
    server: &crate::config::Server,
    gateway: &Arc<Gateway>,
    shutdown: &Shutdown,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let workers = server.workers;
    let limits = Limits {
        grace: server.shutdown_grace,
        header_read_timeout: server.header_read_timeout,
        send_timeout: server.send_timeout,
        connections: server.max_connections.map(|n| Arc::new(Semaphore::new(n))),
    };
    let mut prepared = Vec::with_capacity(workers);
    for _ in 0..workers {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // A traffic thread's access lines wait for it to go idle (or for a batch to fill).
            .on_thread_park(access_log::flush)
            .build()?;
        // Registered with this thread's own event loop; every clone shares the one socket and its backlog.
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener.try_clone()?)?
        };
        prepared.push((runtime, listener, gateway.client()?));
    }
    let mut stopped = Vec::with_capacity(workers);
    let mut started = Vec::with_capacity(workers);
    for (i, (runtime, listener, client)) in prepared.into_iter().enumerate() {
        let (running, running_rx) = tokio::sync::oneshot::channel::<()>();
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        let worker = serve_traffic(listener, gateway.clone(), client, shutdown.clone(), limits.clone());
        let spawned = std::thread::Builder::new().name(format!("traffic-{i}")).spawn(move || {
            let _ = running.send(());
            access_log::batch_lines();
            runtime.block_on(worker);
            // Whatever the runtime still held is dropped with it (and writes its lines) before they go out.
            drop(runtime);
            access_log::flush();
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

/// What bounds the traffic threads' connections.
#[derive(Clone)]
struct Limits {
    /// How long open connections may finish their requests after shutdown begins.
    grace: Duration,
    /// How long a caller may take over a request head, or idle between requests.
    header_read_timeout: Duration,
    /// How long a write to a caller may wait for it to read.
    send_timeout: Duration,
    /// One permit per caller connection, shared by every thread; none means no cap.
    connections: Option<Arc<Semaphore>>,
}

/// One traffic thread: accepts connections until shutdown, then lets every open connection finish the
/// request it is serving (hyper's graceful shutdown closes each one after its current response) for at most
/// `grace`, closes whatever is left, and returns when every connection is gone.
async fn serve_traffic(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    client: UpstreamClient,
    shutdown: Shutdown,
    limits: Limits,
) {
    let Limits { grace, header_read_timeout, send_timeout, connections: cap } = limits;
    crate::proxy::body::discard_until(shutdown.clone());
    let drain = Arc::new(ConnectionDrain::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    // Responses are copied into one write buffer rather than written as a list of buffers: the events of a
    // stream that arrived together leave in one `write` (two system calls per 20-event response instead of
    // three) and hyper keeps no buffer list, ~5% fewer instructions per SSE response. The copy is bounded
    // by `CONNECTION_BUFFER`.
    http.writev(false).max_buf_size(crate::proxy::CONNECTION_BUFFER);
    // A client that sends half a request head, or opens connections and sends nothing, cannot hold them
    // open for ever.
    // (hyper makes a timer per request head for this, on the thread's deadlines: see `deadline`.)
    let deadlines = Deadlines::start(header_read_timeout.min(send_timeout).min(gateway.response_timeout()));
    http.timer(HyperTimer(deadlines.clone())).header_read_timeout(header_read_timeout);
    let tender = tokio::spawn({
        let client = client.clone();
        async move { client.tend_idle().await }
    });
    let service = crate::app::service(Arc::new(Worker { gateway, client, deadlines: deadlines.clone() }));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // At the cap, connections wait in the listen backlog until one closes (and past the backlog, the
        // kernel stops answering new ones) rather than being taken and then starved of file descriptors.
        let permit = match &cap {
            None => None,
            Some(cap) => tokio::select! {
                permit = cap.clone().acquire_owned() => permit.ok(),
                () = shutdown.wait() => break,
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
            () = shutdown.wait() => break,
        };
        // Each SSE event is its own small write: send it now, not after Nagle's delay.
        let _ = tcp.set_nodelay(true);
        // A caller that stops reading cannot hold its response, and the upstream stream behind it, for ever.
        let tcp = SendTimeout::new(tcp, deadlines.clone(), send_timeout);
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
    drain.start();
    let drained = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "shutdown grace elapsed; closing remaining connections");
        }
        () = shutdown.hurried() => tracing::warn!("closing remaining connections now"),
    }
    // Aborts what is left and waits for it, so each cut request's record is written before this returns.
    // The tasks run on this thread, so their records see the mark.
    crate::proxy::access_log::closing_connections();
    connections.shutdown().await;
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

/// `mantlegate serve`: starts, then stops gracefully on SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let credential = credential(&config)?;
    let signal = crate::shutdown::signal();
    let running = start(config, credential).await?;
    let shutdown = running.shutdown.clone();
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
    Ok(())
}
