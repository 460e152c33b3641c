//! Upstream connections: HTTP/1.1 keep-alive over TLS (or plain TCP for a local upstream), no Nagle delay,
//! the configured connect timeout, and a pool of idle connections per traffic thread.
//!
//! A request owns its connection, and drives it, from the moment it is sent until its response body ends:
//! hyper's connection future is polled by the request's own task (while waiting for the response head) and
//! then by the response body (while the caller reads it). hyper's pooled client instead runs each
//! connection as a task of its own, which hands every response chunk across a one-chunk channel to the
//! caller's task, one wake-up per chunk. Driven in place, the chunks that one read from upstream
//! brings are all decoded within one poll of the caller's connection, which then writes them together: a
//! burst of stream events is one write to the caller, not one write per event.
//!
//! A connection goes back to its thread's pool only when its response has ended and hyper is ready for the
//! next request on it. One whose response was cut short (the caller left, a stream ended at its end marker)
//! is kept only if the rest had already arrived, and closed otherwise, as HTTP/1.1 allows nothing else. Idle
//! connections are watched by their thread's tender, which closes each one upstream closes; one is checked
//! again as it is taken, and a request that a stale connection could not even send goes once more on a new
//! one (never one that may have reached upstream). An exchange whose upload is still going when the answer
//! comes gets a task of its own instead, so the upload never waits for the caller to read.

use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service as _;

use crate::config::Upstream;
use crate::proxy::body::Outgoing;

/// How upstream connections are made.
pub type Connector = HttpsConnector<HttpConnector>;

/// An error reaching upstream or exchanging a request with it.
pub type Error = Box<dyn StdError + Send + Sync>;

/// How often the tender looks for idle connections past `upstream.pool_idle_timeout` (it also wakes whenever
/// upstream closes one).
const SWEEP: Duration = Duration::from_secs(5);

/// Idle connections kept per traffic thread.
const MAX_IDLE: usize = 256;

/// hyper's bound on a connection's buffers (its default is ~400 KiB), for both sides of the gateway. A caller
/// connection copies response chunks into its write buffer (see `server`), and that buffer keeps its size
/// for the connection's life; chunks are cut from this side's read buffer, which this also bounds (only an
/// SSE event the usage filter held whole can be larger, up to `MAX_SSE_LINE`). It also caps a request's head
/// (hyper answers 431 beyond it; nginx's default is 32 KiB) and upstream's response head (502 beyond it;
/// nginx's default is 4-8 KiB). hyper checks the bound before each read, so a head can pass it by one read.
pub const CONNECTION_BUFFER: usize = 64 * 1024;

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// Builds the connector. TLS trusts the system's CA store (so a corporate CA works); a plain-HTTP upstream
/// needs none.
pub fn connector(upstream: &Upstream) -> anyhow::Result<Connector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // `upstream.connect_timeout` bounds the whole connection, TLS included, per request (so a reload changes it):
    // see `UpstreamClient::request`.
    http.set_keepalive(Some(Duration::from_secs(60)));

    let tls = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(builder) => builder,
        Err(e) if upstream.scheme == http::uri::Scheme::HTTPS => {
            anyhow::bail!("no CA certificates to verify {} with (install ca-certificates): {e}", upstream.authority)
        }
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    };
    Ok(tls.https_or_http().enable_http1().wrap_connector(http))
}

/// One traffic thread's way upstream: the shared connector and the thread's own idle connections.
#[derive(Clone)]
pub struct UpstreamClient {
    connector: Connector,
    /// Where connections are made to (`scheme://authority`).
    origin: http::Uri,
    /// The `Host` every request carries.
    host: HeaderValue,
    idle: Arc<Mutex<IdlePool<Conn>>>,
}

/// A thread's idle connections, oldest first: each is put back after its last use, so they are in the
/// order they fell idle. Those idle longer than `timeout` (`upstream.pool_idle_timeout`, as the last request
/// to take one saw it) are closed whenever one is taken or put back, and by the thread's tender
/// ([`UpstreamClient::tend_idle`]), which also closes each one upstream closes, as it happens.
#[derive(Debug)]
struct IdlePool<T> {
    entries: Vec<(T, Instant)>,
    /// Wakes the tender. An idle connection is left registered with it, so upstream closing the
    /// connection (or sending anything at all on it) wakes the tender.
    tender: Option<Waker>,
    timeout: Duration,
}

impl<T> IdlePool<T> {
    fn new(timeout: Duration) -> Self {
        Self { entries: Vec::new(), tender: None, timeout }
    }

    /// The most recently idle entry, with idle connections now kept for `timeout`.
    fn take(&mut self, now: Instant, timeout: Duration) -> Option<T> {
        self.timeout = timeout;
        self.evict(now);
        self.entries.pop().map(|(conn, _)| conn)
    }

    /// Keeps `conn`, unless the pool is full.
    fn put(&mut self, conn: T, now: Instant) {
        self.evict(now);
        if self.entries.len() < MAX_IDLE {
            self.entries.push((conn, now));
        }
    }

    fn evict(&mut self, now: Instant) {
        // One subtraction, then plain comparisons (the entries are in the order they went idle).
        let Some(cutoff) = now.checked_sub(self.timeout) else { return };
        let expired = self.entries.partition_point(|(_, since)| *since <= cutoff);
        self.entries.drain(..expired);
    }
}

impl IdlePool<Conn> {
    /// Drives every idle connection once, so hyper sees what upstream did while nobody was looking, and
    /// closes those that ended or expired.
    fn sweep(&mut self, cx: &mut Context<'_>, now: Instant) {
        self.evict(now);
        self.entries.retain_mut(|(conn, _)| {
            conn.drive(cx);
            conn.reusable()
        });
    }
}

/// One upstream connection: hyper's handle to send on it, and the future that does its I/O.
struct Conn {
    sender: http1::SendRequest<Uploading>,
    /// `None` once it has finished: the connection is closed. Boxed: it holds the connection's buffers and
    /// TLS state, and would otherwise be copied into (and enlarge) every future and body that holds it.
    driver: Option<Box<http1::Connection<Io, Uploading>>>,
}

impl UpstreamClient {
    /// A client with no connections yet, to the upstream the connector was built for.
    pub fn new(connector: Connector, upstream: &Upstream) -> anyhow::Result<Self> {
        let origin = http::Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()?;
        let idle = Arc::new(Mutex::new(IdlePool::new(upstream.pool_idle_timeout)));
        Ok(Self { connector, origin, host: upstream.host_header()?, idle })
    }

    /// Sends `req` (its URI in origin form, `/path?query`) with upstream's `Host`, and returns the response head,
    /// with a body that drives the connection until it ends and then returns the connection to the pool. A new
    /// connection (TCP and TLS) may take up to `upstream.connect_timeout`, and idle ones are kept for
    /// `upstream.pool_idle_timeout`.
    pub async fn request(&self, req: Request<Outgoing>, upstream: &Upstream) -> Result<Response<UpstreamBody>, Error> {
        let connect_timeout = upstream.connect_timeout;
        let (mut parts, body) = req.into_parts();
        // Replaces the caller's, which named the gateway.
        parts.headers.insert(http::header::HOST, self.host.clone());
        let uploaded = Arc::new(AtomicBool::new(body.is_end_stream()));
        let req = Request::from_parts(parts, Uploading { inner: Box::pin(body), uploaded: uploaded.clone() });
        let (mut conn, pooled) = match self.take_idle(upstream.pool_idle_timeout).await {
            Some(conn) => (conn, true),
            None => (self.connect(connect_timeout).await?, false),
        };
        let response = match conn.send(req).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                // A kept-alive connection that closed before the request could go: once more, on a new one.
                Some(req) if pooled => {
                    conn = self.connect(connect_timeout).await?;
                    conn.send(req).await.map_err(|e| e.into_error())?
                }
                _ => return Err(e.into_error().into()),
            },
        };
        let (parts, incoming) = response.into_parts();
        let (conn, upload) = if uploaded.load(Ordering::Acquire) {
            (Some(conn), None)
        } else {
            // Upstream answered before it had the whole request body. The rest must not wait for the caller
            // to read the response (a caller that sends everything before reading would wait forever): the
            // connection gets a task of its own for the rest of this exchange, and is closed after it. Once
            // the answer has ended, upstream needs no more of the request: the task is ended then (the caller's
            // body, dropped unread, is read and thrown away, so the caller can finish sending and read).
            let Conn { sender, driver } = conn;
            drop(sender);
            let upload = driver.map(|driver| {
                tokio::spawn(async move {
                    if let Err(e) = driver.await {
                        tracing::debug!(error = %e, "upstream connection ended with an error");
                    }
                })
                .abort_handle()
            });
            (None, upload)
        };
        let body = UpstreamBody { incoming: Some(incoming), conn, upload, idle: self.idle.clone() };
        Ok(Response::from_parts(parts, body))
    }

    /// The most recently used idle connection that is still open.
    async fn take_idle(&self, timeout: Duration) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(PoisonError::into_inner).take(Instant::now(), timeout)?;
            // Lets hyper see what happened while it sat idle: a close from upstream ends the driver.
            poll_fn(|cx| {
                conn.drive(cx);
                Poll::Ready(())
            })
            .await;
            if conn.reusable() {
                return Some(conn);
            }
        }
    }

    /// Looks after this thread's idle connections for as long as it runs (it never ends by itself): closes
    /// each one as upstream closes it, and each one idle past `upstream.pool_idle_timeout`. Without it, a connection
    /// upstream closed would wait in the pool, half closed, until a request next looked at it.
    pub async fn tend_idle(&self) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll_fn(|cx| {
            // Every poll sweeps, whoever woke it: a tick, or an idle connection's socket.
            while tick.poll_tick(cx).is_ready() {}
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if !idle.tender.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                idle.tender = Some(cx.waker().clone());
            }
            idle.sweep(cx, Instant::now());
            Poll::<()>::Pending
        })
        .await;
    }

    /// A new connection, within `timeout`. Boxed: it is rare on a pooled client, and its future (TCP and TLS
    /// handshake) held inline would add ~1 KiB to every request's future.
    async fn connect(&self, timeout: Duration) -> Result<Conn, Error> {
        let connecting = Box::pin(async {
            let mut connector = self.connector.clone();
            poll_fn(|cx| connector.poll_ready(cx)).await?;
            let io = connector.call(self.origin.clone()).await?;
            // An answer whose head is over 64 KiB is refused exactly (a 502), where the buffer bound alone let one
            // read more through, depending on how the bytes arrived.
            let (sender, driver) = http1::Builder::new()
                .max_buf_size(CONNECTION_BUFFER)
                .max_header_size(CONNECTION_BUFFER)
                .handshake(io)
                .await?;
            Ok::<_, Error>(Conn { sender, driver: Some(Box::new(driver)) })
        });
        match tokio::time::timeout(timeout, connecting).await {
            Ok(conn) => conn,
            Err(_) => Err(ConnectTimeout(timeout).into()),
        }
    }
}

/// No connection to upstream within `upstream.connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no connection to upstream within {0:?}")]
pub struct ConnectTimeout(Duration);

impl Conn {
    /// Sends the request and drives the connection until the response head arrives.
    async fn send(
        &mut self,
        req: Request<Uploading>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Uploading>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        poll_fn(|cx| {
            if let Poll::Ready(result) = response.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            // Driving reads what upstream sent, which may complete the response head (or, if the connection
            // ended, answer it with an error): looked at again at once, not on the wake-up that follows.
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }

    /// Whether it is open and hyper is ready for a request on it.
    fn reusable(&self) -> bool {
        self.driver.is_some() && self.sender.is_ready()
    }

    /// Polls the connection's I/O; once it has finished, the connection is closed and `driver` is `None`.
    fn drive(&mut self, cx: &mut Context<'_>) {
        let Some(driver) = self.driver.as_mut() else { return };
        if let Poll::Ready(result) = Pin::new(&mut **driver).poll(cx) {
            if let Err(e) = result {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            self.driver = None;
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body on its way upstream, which records when hyper has had all of it.
    ///
    /// The body is boxed: hyper's client keeps a channel of requests per connection whose first block, with room
    /// for 32 of them, lives as long as the connection, and what a request holds inline stays there. Boxed, with
    /// the caller body's drain switch cut to one token, an idle stream holds 0.17 KiB less (bench/README.md,
    /// eleventh round).
    pub struct Uploading {
        inner: Pin<Box<Outgoing>>,
        uploaded: Arc<AtomicBool>,
    }
}

impl http_body::Body for Uploading {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        // The end: seen, or known from the length (hyper then stops polling).
        if frame.is_none() || this.inner.is_end_stream() {
            this.uploaded.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body from upstream that drives its connection as it is read, and gives the connection back to
/// its thread's pool when the response has ended.
pub struct UpstreamBody {
    /// `None` only while being dropped.
    incoming: Option<Incoming>,
    conn: Option<Conn>,
    /// The task still sending the request body, when upstream answered before it had all of it.
    upload: Option<tokio::task::AbortHandle>,
    idle: Arc<Mutex<IdlePool<Conn>>>,
}

impl UpstreamBody {
    /// Keeps the connection for the next request if hyper is ready for one on it; otherwise closes it.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(upload) = self.upload.take() {
            upload.abort();
        }
        let Some(mut conn) = self.conn.take() else { return };
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Lets hyper finish the exchange: it is then ready for the next request, or closing. Driven with the
        // tender's waker, so that what happens to the connection while it is idle wakes the tender.
        match &idle.tender {
            Some(tender) => conn.drive(&mut Context::from_waker(tender)),
            None => conn.drive(cx),
        }
        if conn.reusable() {
            idle.put(conn, Instant::now());
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(incoming) = this.incoming.as_mut() else { return Poll::Ready(None) };
        let mut frame = Pin::new(&mut *incoming).poll_frame(cx);
        if frame.is_pending()
            && let Some(conn) = this.conn.as_mut()
        {
            // Reads and decodes what upstream has sent, which wakes `incoming` with the next chunk, or with the
            // end or an error if the connection ended: worth a second look.
            conn.drive(cx);
            frame = Pin::new(&mut *incoming).poll_frame(cx);
        }
        // The end: seen, or known from the length (hyper's server then stops polling).
        let ended = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => incoming.is_end_stream(),
            _ => false,
        };
        if ended {
            this.release(cx);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.as_ref().map(Incoming::size_hint).unwrap_or_default()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            upload.abort();
        }
        if self.conn.is_none() {
            return;
        }
        // Dropped before its end was read: the gateway ended a stream at its end marker, or the caller left.
        // With its reader gone, hyper reads the rest of the response if it has already arrived (an end marker
        // is followed at once by the end of the body) and keeps the connection; otherwise it closes it.
        drop(self.incoming.take());
        self.release(&mut Context::from_waker(std::task::Waker::noop()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_pool_gives_the_newest_and_closes_the_expired() {
        const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
        let start = Instant::now();
        let mut pool = IdlePool::new(IDLE_TIMEOUT);
        pool.put(1, start);
        pool.put(2, start + Duration::from_secs(30));
        pool.put(3, start + Duration::from_secs(60));
        assert_eq!(pool.take(start + Duration::from_secs(61), IDLE_TIMEOUT), Some(3));
        // 1 has been idle for IDLE_TIMEOUT: putting 4 back closes it; 2 stays.
        pool.put(4, start + IDLE_TIMEOUT);
        assert_eq!(pool.entries.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(pool.take(start + IDLE_TIMEOUT + Duration::from_secs(30), IDLE_TIMEOUT), Some(4));
        assert_eq!(pool.take(start + IDLE_TIMEOUT + Duration::from_secs(30), IDLE_TIMEOUT), None, "2 expired");
        // A shorter timeout (a reload) applies from the next take.
        pool.put(5, start);
        pool.put(6, start + Duration::from_secs(100));
        assert_eq!(pool.take(start + Duration::from_secs(101), Duration::from_secs(50)), Some(6));
        assert!(pool.entries.is_empty(), "5, idle 101 s, is past 50 s");
        for i in 0..MAX_IDLE + 5 {
            pool.put(i, start);
        }
        assert_eq!(pool.entries.len(), MAX_IDLE);
    }

    #[test]
    fn host_leaves_out_the_default_port() {
        let host = |url: &str| {
            let config = crate::Config::from_toml(&format!(
                "[upstream]\nbase_url = \"{url}\"\n[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\ntags = {{}}"
            ))
            .expect("valid");
            config.upstream.host_header().expect("host")
        };
        assert_eq!(host("https://bedrock-mantle.us-east-1.api.aws"), "bedrock-mantle.us-east-1.api.aws");
        assert_eq!(host("https://mantle.example:443"), "mantle.example");
        assert_eq!(host("https://mantle.example:8443"), "mantle.example:8443");
        assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host("http://127.0.0.1:9000"), "127.0.0.1:9000");
    }
}
