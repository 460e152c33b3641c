//! Test harness: a scriptable mock upstream on 127.0.0.1:0 that records exactly what it received, and the
//! gateway started in-process in front of it on 127.0.0.1:0.
#![allow(dead_code, clippy::unwrap_used)]

pub mod binary;
pub mod raw_upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt;
use mantlegate::Config;
use mantlegate::config::{KeySource, Secret, UpstreamAuth};
use mantlegate::proxy::Credential;
use mantlegate::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};

/// The upstream key the gateway is configured with.
pub const UPSTREAM_KEY: &str = "upstream-secret-key";
/// Gateway keys in the standard config.
pub const CHAT_KEY: &str = "caller-chat-key";
pub const SEARCH_KEY: &str = "caller-search-key";
pub const FLOATING_KEY: &str = "caller-floating-key";

/// Bound on every wait, so a broken feature fails a test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(10);

/// Waits until `check` finds what it looks for, looking every few milliseconds (for a condition nothing
/// announces: a file, a log line, a count in /proc); fails with `what` after [`WAIT`].
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the mock upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers.get_all(name).iter().count()
    }
}

type Handler = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// A mock upstream.
pub struct Mock {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    seen: Mutex<mpsc::UnboundedReceiver<Seen>>,
    seen_tx: mpsc::UnboundedSender<Seen>,
}

impl Mock {
    /// A mock whose handler sees the request with its body already read (and recorded).
    pub async fn start<F, Fut>(handler: F) -> Arc<Self>
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let handler = Arc::new(handler);
        Self::start_raw_inner(move |req: Request, tx: mpsc::UnboundedSender<Seen>| {
            let handler = handler.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let seen = Seen { method: parts.method, uri: parts.uri, headers: parts.headers, body };
                let _ = tx.send(seen.clone());
                handler(seen).await
            }
        })
        .await
    }

    /// A mock that answers every request with `200` and a small JSON body.
    pub async fn ok_json() -> Arc<Self> {
        Self::start(|_| async { json_response(StatusCode::OK, r#"{"ok":true}"#) }).await
    }

    /// A mock whose handler gets the raw request (body unread); only the head is recorded.
    pub async fn start_raw<F, Fut>(handler: F) -> Arc<Self>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let handler = Arc::new(handler);
        Self::start_raw_inner(move |req: Request, tx: mpsc::UnboundedSender<Seen>| {
            let _ = tx.send(Seen {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
                body: Bytes::new(),
            });
            handler(req)
        })
        .await
    }

    async fn start_raw_inner<F, Fut>(handler: F) -> Arc<Self>
    where
        F: Fn(Request, mpsc::UnboundedSender<Seen>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        let handler: Handler = {
            let hits = hits.clone();
            let tx = seen_tx.clone();
            let handler = Arc::new(handler);
            Arc::new(move |req| {
                hits.fetch_add(1, Ordering::SeqCst);
                let fut = handler(req, tx.clone());
                Box::pin(fut)
            })
        };
        let app = axum::Router::new().fallback(move |req: Request| {
            let handler = handler.clone();
            async move { handler(req).await }
        });
        let connections = Arc::new(AtomicUsize::new(0));
        let listener = {
            use axum::serve::ListenerExt;
            let connections = connections.clone();
            listener.tap_io(move |_| {
                connections.fetch_add(1, Ordering::SeqCst);
            })
        };
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Arc::new(Self { addr, hits, connections, seen: Mutex::new(seen_rx), seen_tx })
    }

    /// A mock that answers every request with a [`scripted_sse`] stream, handing each script to the test.
    pub async fn scripted() -> (Arc<Self>, mpsc::UnboundedReceiver<ScriptedBody>) {
        let (script_tx, script_rx) = mpsc::unbounded_channel();
        let mock = Self::start(move |_| {
            let (script, res) = scripted_sse();
            let _ = script_tx.send(script);
            async move { res }
        })
        .await;
        (mock, script_rx)
    }

    /// How many requests reached the mock.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// How many connections the mock has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The next request the mock recorded.
    pub async fn next(&self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.lock().await.recv())
            .await
            .expect("the mock upstream received no request")
            .unwrap()
    }
}

pub fn json_response(status: StatusCode, body: &'static str) -> Response {
    (status, [(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A streamed response body fed by the test, one chunk at a time. `dropped` fires when the mock's side of
/// the stream is dropped, which is how the test sees the gateway hang up on upstream.
pub struct ScriptedBody {
    pub tx: mpsc::Sender<Bytes>,
    pub dropped: tokio::sync::oneshot::Receiver<()>,
}

pub fn scripted_sse() -> (ScriptedBody, Response) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let (drop_tx, dropped) = tokio::sync::oneshot::channel();
    struct Guard(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    let guard = Guard(Some(drop_tx));
    let stream = futures_util::stream::poll_fn(move |cx| {
        let _keep = &guard;
        rx.poll_recv(cx).map(|o| o.map(Ok::<_, std::convert::Infallible>))
    });
    let res = ([(http::header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream)).into_response();
    (ScriptedBody { tx, dropped }, res)
}

/// Knobs for the gateway config under test.
#[derive(Clone)]
pub struct Opts {
    /// Extra lines for `[server]`.
    pub server: &'static str,
    /// `[server] shutdown_grace`.
    pub grace: &'static str,
    /// `[server] max_body_bytes`.
    pub max_body_bytes: u64,
    /// Extra lines for `[upstream]`.
    pub upstream: &'static str,
    /// `[callers] auth`.
    pub callers: &'static str,
    /// Lines for `[attribution]`.
    pub attribution: &'static str,
    /// Whether to configure the standard `[[keys]]`.
    pub keys: bool,
    /// The credential to present upstream.
    pub credential: Option<Credential>,
    /// Override the upstream address (e.g. a closed port).
    pub upstream_addr: Option<SocketAddr>,
    /// Appended to the config (top-level tables such as `[metering]`, `[[prices]]`).
    pub extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            server: "",
            grace: "5s",
            max_body_bytes: 4096,
            upstream: "",
            callers: "keys",
            attribution: "",
            keys: true,
            credential: None,
            upstream_addr: None,
            extra: String::new(),
        }
    }
}

pub fn sha(key: &str) -> String {
    hex::encode(mantlegate::auth::hash_key(key.as_bytes()))
}

/// The standard test config.
pub fn config_text(upstream: SocketAddr, opts: &Opts) -> String {
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = {max_body_bytes}
shutdown_grace = "{grace}"
{server}

[upstream]
base_url = "http://{upstream}"
connect_timeout = "2s"
{upstream_extra}

[callers]
auth = "{callers}"

[attribution]
{attribution}

[taxonomy]
required_tags = ["Team"]

[[projects]]
name = "Chat-Prod"
id = "proj_chat"
tags = {{ Team = "chat" }}

[[projects]]
name = "Chat-Dev"
id = "proj_dev"
tags = {{ Team = "chat" }}

[[projects]]
name = "Search"
id = "proj_search"
tags = {{ Team = "search" }}
models = ["openai.gpt-oss-20b"]

[[projects]]
name = "Unattributed"
id = "proj_unattr"
tags = {{ Team = "platform" }}

[[routes]]
prefix = "/chatbot"
project = "Chat-Prod"

[[routes]]
prefix = "/search"
project = "Search"
"#,
        server = opts.server,
        grace = opts.grace,
        max_body_bytes = opts.max_body_bytes,
        upstream_extra = opts.upstream,
        callers = opts.callers,
        attribution = opts.attribution,
    );
    if opts.keys {
        text.push_str(&format!(
            r#"
[[keys]]
name = "chat-service"
sha256 = "{}"
project = "Chat-Prod"
may_select = ["Chat-Dev"]

[[keys]]
name = "search-service"
sha256 = "{}"
project = "Search"

[[keys]]
name = "floating-service"
sha256 = "{}"
"#,
            sha(CHAT_KEY),
            sha(SEARCH_KEY),
            sha(FLOATING_KEY)
        ));
    }
    text.push_str(&opts.extra);
    text
}

/// A gateway running in-process in front of a mock.
pub struct Gw {
    pub mock: Arc<Mock>,
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub client: reqwest::Client,
}

impl Gw {
    pub async fn start(mock: Arc<Mock>, opts: Opts) -> Self {
        let upstream = opts.upstream_addr.unwrap_or(mock.addr);
        let config = Config::from_toml(&config_text(upstream, &opts)).unwrap();
        let metrics = Arc::new(mantlegate::metering::metrics::Metrics::new());
        let credential = match &opts.credential {
            Some(credential) => credential.clone(),
            None if matches!(config.upstream.auth, UpstreamAuth::ApiKey(KeySource::File(_))) => {
                mantlegate::server::credential(&config, &metrics).await.unwrap()
            }
            None => Credential::api_key(&Secret::new(UPSTREAM_KEY.into())).unwrap(),
        };
        let running = mantlegate::server::start(config, credential, metrics).await.unwrap();
        Self {
            mock,
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    /// A gateway serving `opts`' config from a file at `path` (written here), which it reloads when asked.
    pub async fn start_from_file(mock: Arc<Mock>, opts: Opts, path: &std::path::Path) -> Self {
        let upstream = opts.upstream_addr.unwrap_or(mock.addr);
        std::fs::write(path, config_text(upstream, &opts)).unwrap();
        let config = Config::load(path).unwrap();
        let credential =
            opts.credential.clone().unwrap_or_else(|| Credential::api_key(&Secret::new(UPSTREAM_KEY.into())).unwrap());
        let running =
            mantlegate::server::start_from(path.to_owned(), config, credential, Default::default()).await.unwrap();
        Self {
            mock,
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    /// Reloads the gateway's config file.
    pub async fn reload(&self) -> mantlegate::live::Outcome {
        self.running.as_ref().unwrap().reload().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(key).header("content-type", "application/json")
    }

    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(key)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client.get(format!("http://{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    /// Polls `/metrics` until `line` appears (metrics are recorded as a response body ends, just after the
    /// client has read it), failing after [`WAIT`].
    pub async fn metric_line(&self, line: &str) -> String {
        self.metrics_until(line, |l| l == line).await
    }

    /// Polls `/metrics` until a line starts with `prefix`, failing after [`WAIT`].
    pub async fn metric_prefix(&self, prefix: &str) -> String {
        self.metrics_until(prefix, |l| l.starts_with(prefix)).await
    }

    async fn metrics_until(&self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            if text.lines().any(&found) {
                return text;
            }
            assert!(tokio::time::Instant::now() < deadline, "metric line {what:?} never appeared in:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends raw bytes as one HTTP/1.1 request and returns the status code and the whole response text.
    pub async fn raw(&self, request: &str) -> (u16, String) {
        raw_request(self.addr, request.as_bytes()).await
    }
}

pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await.expect("raw response").unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// The error code of an OpenAI-shaped error body.
pub async fn error_code(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body: serde_json::Value = res.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

pub const CHAT_BODY: &str = r#"{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"hi"}]}"#;

/// A whole HTTP/1.1 chat completions request carrying [`CHAT_BODY`], as raw text for a socket.
pub fn raw_chat_request(key: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{CHAT_BODY}",
        CHAT_BODY.len()
    )
}

/// What a caller got on a connection of its own: everything read until the gateway closed it.
#[derive(Debug)]
pub struct Answer {
    /// 0 if nothing that looks like a status line came.
    pub status: u16,
    /// The response head, status line included, without the blank line.
    pub head: String,
    /// The body as it came (still chunked, if it was).
    pub body: Vec<u8>,
    /// The connection ended in an error (a reset) rather than a clean close.
    pub reset: bool,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        raw_upstream::header(&self.head, name)
    }

    /// The body, its chunked framing taken off.
    pub fn decoded(&self) -> Vec<u8> {
        if !self.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            return self.body.clone();
        }
        let (mut out, mut rest) = (Vec::new(), &self.body[..]);
        while let Some(line) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap().trim(), 16).unwrap();
            rest = &rest[line + 2..];
            let take = size.min(rest.len());
            out.extend_from_slice(&rest[..take]);
            rest = rest.get(take + 2..).unwrap_or_default();
            if size == 0 {
                break;
            }
        }
        out
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.decoded()).into_owned()
    }

    /// Whether the body came whole, as its framing says: its `content-length`, or chunks up to the last.
    pub fn whole(&self) -> bool {
        match self.header("content-length") {
            Some(len) => self.body.len() == len.parse::<usize>().unwrap(),
            None => self.body.ends_with(b"0\r\n\r\n"),
        }
    }

    /// `error.code` of an OpenAI-shaped error body.
    pub fn error_code(&self) -> String {
        let body: serde_json::Value = serde_json::from_slice(&self.decoded()).unwrap_or_default();
        body["error"]["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// Sends `request` on a new connection and reads until the gateway closes it (so the request should say
/// `connection: close`, or be one the gateway closes the connection after).
pub async fn exchange(addr: &str, request: &[u8]) -> Answer {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The gateway may answer, and close, before it has read everything (a refusal).
    let _ = tcp.write_all(request).await;
    read_answer(&mut tcp, Vec::new()).await
}

/// Reads from `tcp` until what has come (starting with `got`) contains `needle`; returns it all.
pub async fn read_until(tcp: &mut tokio::net::TcpStream, mut got: Vec<u8>, needle: &[u8]) -> Vec<u8> {
    let read = async {
        while !got.windows(needle.len()).any(|w| w == needle) {
            let mut chunk = [0u8; 16 * 1024];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before {:?} came: {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("never came");
    got
}

/// Reads the rest of an answer (of which `got` has come) from `tcp`, until the gateway closes it.
pub async fn read_answer(tcp: &mut tokio::net::TcpStream, mut got: Vec<u8>) -> Answer {
    let mut reset = false;
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    reset = true;
                    break;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("the gateway never closed the connection");
    let split = got.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(at) => (String::from_utf8_lossy(&got[..at]).into_owned(), got[at + 4..].to_vec()),
        None => (String::from_utf8_lossy(&got).into_owned(), Vec::new()),
    };
    // hyper answers an HTTP/1.0 request in HTTP/1.0.
    let status = match head.strip_prefix("HTTP/1.1 ").or_else(|| head.strip_prefix("HTTP/1.0 ")) {
        Some(rest) => rest.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0),
        None => 0,
    };
    Answer { status, head, body, reset }
}
