//! Limits and budgets on the Redis backend, end to end: the real binary (several processes sharing one real
//! `redis-server` on loopback, started here) in front of a mock upstream with known token counts. Proves what
//! issue 22 asks: a budget and a tokens-per-minute limit shared by three gateways hold under concurrent mixed
//! traffic, the counters equal the ledgers' sums once settled, no failure path (disconnect, upstream error,
//! timeout, SIGKILL) leaves a reservation behind, a Redis restart does not reset spend, `on_backend_error` both
//! ways, `limits status`, and a reload that adds a budget. (The memory backend, in process: tests/limits.rs.)
//!
//! Needs `redis-server` on the PATH (Debian package `redis-server`; `.ci/run` installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use common::binary::{BIN, Watched, serve, temp_dir};
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use mantlegate::limits::nanos;
use mantlegate::metering::prices::PriceTable;
use mantlegate::metering::usage::Usage;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

// ---------------------------------------------------------------------------------------------------------------
// Redis

/// A `redis-server` of the test's own on loopback, without persistence: killed, it forgets everything.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

/// A port nothing listens on now (bound and released), below the kernel's ephemeral range: the ports `bind(0)`
/// hands out (to the mocks, gateways and Redis servers of tests running alongside, and to outgoing connections)
/// come from that range, so none of them takes this one while the test's Redis is down before its restart.
fn free_port() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(32768);
    if low > 11_000 {
        for _ in 0..100 {
            let random = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
            let port = 10_000 + (random % u64::from(low - 10_000)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    async fn start() -> Self {
        // Another process may take the port between its release and redis-server's bind: try another.
        for _ in 0..5 {
            if let Some(server) = Self::start_on(free_port()).await {
                return server;
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Starts `redis-server` on `port` and waits until it answers PING; `None` if it exited first.
    async fn start_on(port: u16) -> Option<Self> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (Debian package redis-server)");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            // Its own answer, not another process's on the same port.
            if ping(port).await == child.id() {
                return Some(Self { port, child: Some(child) });
            }
            assert!(tokio::time::Instant::now() < deadline, "redis-server on {port} never answered PING");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().unwrap().to_string()
    }

    /// SIGKILL: everything it held is gone.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    /// A new, empty `redis-server` on the same port.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let again = Self::start_on(self.port).await.expect("redis-server restarted on its port");
        self.child = again.child;
    }

    /// SIGSTOP: it keeps its connections and data, and answers nothing (a hung Redis).
    async fn pause(&self) {
        signal(&self.pid(), "-STOP").await;
    }

    async fn resume(&self) {
        signal(&self.pid(), "-CONT").await;
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        tokio::time::timeout(WAIT, client.get_multiplexed_async_connection()).await.unwrap().unwrap()
    }

    /// Reservations held (the sorted set every admission adds to and settles and sweeps remove from).
    async fn reservations(&self) -> u64 {
        redis::cmd("ZCARD").arg("{mantlegate}:reservations").query_async(&mut self.conn().await).await.unwrap()
    }

    /// The sum of every counter whose key matches `pattern` (each window's counter is a key of its own).
    async fn sum(&self, pattern: &str) -> u64 {
        let mut conn = self.conn().await;
        let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.unwrap();
        let mut total = 0i64;
        for key in keys {
            let value: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            total += value.unwrap_or(0);
        }
        u64::try_from(total).unwrap_or_else(|_| panic!("{pattern} sums to {total}"))
    }

    /// Every counter of `subject` (`project:Chat-Prod`), summed over its windows.
    async fn counters(&self, subject: &str) -> Counters {
        let key =
            |window: &str, what: &str| format!("{{mantlegate}}:c:{}:{window}*:{what}", subject.replace(':', "%3A"));
        Counters {
            requests: self.sum(&key("m", "req")).await,
            input: self.sum(&key("m", "in")).await,
            output: self.sum(&key("m", "out")).await,
            day_nanos: self.sum(&key("d", "usd")).await,
            month_nanos: self.sum(&key("M", "usd")).await,
        }
    }

    /// Each of `subject`'s counters of `what` (`usd` for spend) in windows named `window*`, by key.
    async fn each(&self, subject: &str, window: &str, what: &str) -> BTreeMap<String, u64> {
        let mut conn = self.conn().await;
        let pattern = format!("{{mantlegate}}:c:{}:{window}*:{what}", subject.replace(':', "%3A"));
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap();
        let mut out = BTreeMap::new();
        for key in keys {
            let value: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            out.insert(key, u64::try_from(value.unwrap_or(0)).unwrap());
        }
        out
    }
}

/// The process id of the Redis answering on `port`, if one does.
async fn ping(port: u16) -> Option<u32> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
    let info = tokio::time::timeout(Duration::from_secs(1), async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO").arg("server").query_async::<String>(&mut conn).await
    })
    .await
    .ok()?
    .ok()?;
    info.lines().find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
}

async fn signal(pid: &str, signal: &str) {
    assert!(Command::new("kill").args([signal, pid]).status().await.unwrap().success());
}

/// What Redis counts for one subject, summed over windows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    requests: u64,
    input: u64,
    output: u64,
    day_nanos: u64,
    month_nanos: u64,
}

// ---------------------------------------------------------------------------------------------------------------
// The mock upstream

/// Input tokens the mock reports for every request (less than any request body's bytes, which is what the
/// gateway reserves for input at one byte per token).
const PROMPT_TOKENS: u64 = 20;

/// A mock bedrock-mantle answering chat completions, JSON or SSE with usage: `PROMPT_TOKENS` in, the request's
/// `max_tokens` out (so no request uses more than it reserved). The request's `user` field scripts a fault:
/// `fail` (500), `hang` (never answers), `slow` (a stream that stops after its first chunk), `gate` (a stream
/// that sends its usage once the test opens the gate).
struct Upstream {
    mock: Arc<Mock>,
    /// Requests that are hanging, slow or waiting at the gate (counted as they arrive).
    parked: Arc<AtomicUsize>,
    /// Slow streams whose body the gateway dropped (it hung up on upstream).
    dropped: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::watch::Sender<bool>>,
}

struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Upstream {
    async fn start() -> Self {
        let parked = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::watch::Sender::new(false));
        let mock = Mock::start({
            let (parked, dropped, gate) = (parked.clone(), dropped.clone(), gate.clone());
            move |seen| answer(seen, parked.clone(), dropped.clone(), gate.clone())
        })
        .await;
        Self { mock, parked, dropped, gate }
    }

    fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    fn open_gate(&self) {
        self.gate.send_replace(true);
    }
}

async fn answer(
    seen: Seen,
    parked: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::watch::Sender<bool>>,
) -> Response {
    let req: Value = serde_json::from_slice(&seen.body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("openai.gpt-oss-120b").to_owned();
    let output = req["max_tokens"].as_u64().unwrap_or(10);
    let usage = format!(
        r#"{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":{output},"total_tokens":{}}}"#,
        PROMPT_TOKENS + output
    );
    let user = req["user"].as_str().unwrap_or("").to_owned();
    match user.as_str() {
        "fail" => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":{"message":"upstream broke","type":"server_error"}}"#,
            );
        }
        "hang" => {
            parked.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    if req["stream"] != true {
        let body = format!(
            r#"{{"id":"c","object":"chat.completion","model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        );
        return (StatusCode::OK, [(http::header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let first = format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\n"
    );
    let last = format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"
    );
    let first = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from(first))]);
    let body = match user.as_str() {
        "slow" => {
            parked.fetch_add(1, Ordering::SeqCst);
            let guard = DropCount(dropped);
            Body::from_stream(first.chain(futures_util::stream::once(async move {
                let _guard = guard;
                std::future::pending::<Result<Bytes, Infallible>>().await
            })))
        }
        "gate" => {
            parked.fetch_add(1, Ordering::SeqCst);
            let mut open = gate.subscribe();
            Body::from_stream(first.chain(futures_util::stream::once(async move {
                let _ = open.wait_for(|open| *open).await;
                Ok(Bytes::from(last))
            })))
        }
        _ => Body::from_stream(first.chain(futures_util::stream::iter([Ok(Bytes::from(last))]))),
    };
    ([(http::header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

// ---------------------------------------------------------------------------------------------------------------
// Gateways

/// A `mantlegate serve` process with the Redis backend and a ledger of its own.
struct Gateway {
    running: Option<Watched>,
    addr: String,
    admin: String,
    config: PathBuf,
    ledger: PathBuf,
    client: reqwest::Client,
}

/// Lines for `[limits]`, with the Redis URL and instance name added.
struct Setup<'a> {
    /// Test and instance name (each its own directory and ledger).
    name: &'a str,
    instance: &'a str,
    redis: &'a RedisServer,
    upstream: &'a Upstream,
    /// More lines for `[limits]` (`reservation_ttl`, `on_backend_error`, ...).
    limits: &'a str,
    /// `[[limits.rules]]` stanzas.
    rules: &'a str,
    /// More lines for `[upstream]`.
    upstream_extra: &'static str,
}

/// The config file's text for `s`, and its ledger's path.
fn gateway_config(s: &Setup<'_>) -> (String, PathBuf) {
    let dir = temp_dir(&format!("limits-redis-{}-{}", s.name, s.instance));
    let ledger = dir.join("usage.jsonl");
    let extra = format!(
        "\n[metering]\nledger_path = \"{}\"\n\n[limits]\nbackend = \"redis\"\nredis_url = \"{}\"\ninstance = \"{}\"\n{}\n\n{}\n",
        ledger.display(),
        s.redis.url(),
        s.instance,
        s.limits,
        s.rules
    );
    (config_text(s.upstream.mock.addr, &Opts { upstream: s.upstream_extra, extra, ..Opts::default() }), ledger)
}

impl Gateway {
    /// Starts `serve` on a fresh directory (config file and ledger) of its own.
    async fn start(s: Setup<'_>) -> Self {
        let (text, ledger) = gateway_config(&s);
        let dir = ledger.parent().unwrap();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            std::fs::remove_file(entry.path()).unwrap();
        }
        let config = dir.join("gateway.toml");
        std::fs::write(&config, text).unwrap();
        let served = serve(&config, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
        let (addr, admin) = (served.addr.clone(), served.admin.clone());
        Self {
            running: Some(served.watched()),
            addr,
            admin,
            config,
            ledger,
            client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    fn request(&self, call: &Call) -> reqwest::RequestBuilder {
        let url = format!("http://{}/v1/chat/completions", self.addr);
        let mut req = self.client.post(url).bearer_auth(call.key).json(&call.body());
        if let Some(project) = call.project {
            req = req.header("openai-project", project);
        }
        req
    }

    /// Sends `call` and reads its whole answer.
    async fn send(&self, call: &Call) -> Reply {
        let started = Instant::now();
        let res = self.request(call).send().await.unwrap();
        let status = res.status().as_u16();
        let should_retry = res.headers().get("x-should-retry").map(|v| v.to_str().unwrap().to_owned());
        let body = res.text().await.unwrap();
        let error: Value = if status == 200 { Value::Null } else { serde_json::from_str(&body).unwrap_or_default() };
        Reply {
            status,
            code: error["error"]["code"].as_str().unwrap_or_default().to_owned(),
            message: error["error"]["message"].as_str().unwrap_or_default().to_owned(),
            should_retry,
            elapsed: started.elapsed(),
        }
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        self.client.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// The value of the series `series` (`name{labels}`) in `/metrics`, if exported.
    async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until `/metrics` has `series` at `value`.
    async fn metric_reaches(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(series).await;
            if now == Some(value) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{series} is {now:?}, never {value}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /limits`.
    async fn limits(&self) -> Value {
        let url = format!("http://{}/limits", self.admin);
        self.client.get(url).send().await.unwrap().json().await.unwrap()
    }

    fn log(&self) -> Vec<Value> {
        self.running.as_ref().expect("running").log()
    }

    fn ledger(&self) -> Vec<Value> {
        binary::read_ledger(&self.ledger)
    }

    /// Waits until the ledger holds `n` lines (it is written every 20 ms or so).
    async fn ledger_has(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{} never had {n} lines", self.ledger.display()), || {
            let lines = self.ledger();
            (lines.len() >= n).then_some(lines)
        })
        .await
    }

    /// Starts `serve` again on its config and ledger, as they are (a restart).
    async fn restart(&mut self) {
        assert!(self.running.is_none(), "stop it first");
        let served = serve(&self.config, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
        (self.addr, self.admin) = (served.addr.clone(), served.admin.clone());
        self.running = Some(served.watched());
    }

    /// SIGTERM, and the whole log once it has exited (every settle done, the ledger written out).
    async fn stop(&mut self) -> Vec<Value> {
        self.running.take().expect("running").stop().await
    }

    /// Sends the process `signal` (`-STOP`, `-CONT`).
    async fn signal(&self, signal: &str) {
        let pid = self.running.as_ref().expect("running").pid.to_string();
        self::signal(&pid, signal).await;
    }

    /// SIGKILL: nothing is settled or written any more.
    async fn kill(&mut self) {
        let mut running = self.running.take().expect("running");
        running.child.start_kill().unwrap();
        running.child.wait().await.unwrap();
    }
}

/// One chat completion to send.
#[derive(Debug, Clone, Copy)]
struct Call {
    key: &'static str,
    /// `openai-project`, for a key that may select another project.
    project: Option<&'static str>,
    model: &'static str,
    stream: bool,
    max_tokens: u64,
    /// The mock's script (see [`Upstream`]).
    user: &'static str,
}

impl Call {
    fn body(&self) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        });
        if !self.user.is_empty() {
            body["user"] = json!(self.user);
        }
        body
    }

    /// What the gateway reserves for it: its body's bytes as input tokens (one byte per token, the default), its
    /// max_tokens as output, and their price.
    fn reserved(&self) -> Used {
        let input = serde_json::to_vec(&self.body()).unwrap().len() as u64;
        let usage = Usage { input, output: self.max_tokens, cached_input: 0, reasoning: 0 };
        let cost = PriceTable::new(&[]).get(self.model).unwrap().cost(&usage);
        Used { requests: 1, input, output: self.max_tokens, nanos: nanos(cost) }
    }
}

/// A Chat-Prod request (tag Team=chat), key chat-service.
fn chat(stream: bool, max_tokens: u64) -> Call {
    Call { key: CHAT_KEY, project: None, model: "openai.gpt-oss-120b", stream, max_tokens, user: "" }
}

/// A Chat-Dev request (tag Team=chat too), key chat-service.
fn chat_dev(stream: bool, max_tokens: u64) -> Call {
    Call { project: Some("Chat-Dev"), ..chat(stream, max_tokens) }
}

/// A Search request (tag Team=search), key search-service.
fn search(stream: bool, max_tokens: u64) -> Call {
    Call { key: SEARCH_KEY, project: None, model: "openai.gpt-oss-20b", stream, max_tokens, user: "" }
}

fn scripted(call: Call, user: &'static str) -> Call {
    Call { user, ..call }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    code: String,
    message: String,
    should_retry: Option<String>,
    elapsed: Duration,
}

// ---------------------------------------------------------------------------------------------------------------
// Ledgers

/// What the ledgers say one subject used (lines of requests a limit refused left out).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Used {
    requests: u64,
    input: u64,
    output: u64,
    /// Each line's `cost_usd` as the counters take it: whole nano-USD, rounded as `limits::nanos` rounds.
    nanos: u64,
}

/// Every subject a ledger line counts against: its project, its key, each of its tag values.
fn subjects_of(line: &Value) -> Vec<String> {
    let mut subjects = vec![format!("project:{}", line["project"].as_str().unwrap())];
    if let Some(key) = line["key"].as_str() {
        subjects.push(format!("key:{key}"));
    }
    for (tag, value) in line["tags"].as_object().into_iter().flatten() {
        subjects.push(format!("tag:{tag}={}", value.as_str().unwrap()));
    }
    subjects
}

fn used_by_subject(ledgers: &[Vec<Value>]) -> BTreeMap<String, Used> {
    let mut used: BTreeMap<String, Used> = BTreeMap::new();
    for line in ledgers.iter().flatten().filter(|l| l["refused_by"].is_null()) {
        for subject in subjects_of(line) {
            let u = used.entry(subject).or_default();
            u.requests += 1;
            u.input += line["input_tokens"].as_u64().unwrap();
            u.output += line["output_tokens"].as_u64().unwrap();
            u.nanos += line["cost_usd"].as_f64().map_or(0, nanos);
        }
    }
    used
}

/// Spend by UTC day (`2026-12-02`) of the lines counting against `subject`.
fn spend_by_day(ledgers: &[Vec<Value>], subject: &str) -> BTreeMap<String, u64> {
    let mut days = BTreeMap::new();
    for line in ledgers.iter().flatten().filter(|l| l["refused_by"].is_null()) {
        if subjects_of(line).iter().any(|s| s == subject) {
            let day = line["time"].as_str().unwrap()[..10].to_owned();
            *days.entry(day).or_default() += line["cost_usd"].as_f64().map_or(0, nanos);
        }
    }
    days
}

/// Which of a subject's counters exist (tokens and requests are counted only where a rule limits them; spend
/// for every subject).
#[derive(Clone, Copy)]
enum Counted {
    Spend,
    Tokens,
}

/// Asserts that Redis counts for each of `subjects` exactly what the ledgers say it used: spend to the nano-dollar
/// in its day and month windows, tokens to the token where a rule counts them.
async fn assert_counters_equal_ledgers(redis: &RedisServer, ledgers: &[Vec<Value>], subjects: &[(&str, Counted)]) {
    assert_counters_equal_ledgers_and(redis, ledgers, &[], subjects).await;
}

/// [`assert_counters_equal_ledgers`], with `unread`: requests (each with the subjects it counts against) whose
/// response was cut before its usage came, which the ledger shows with no usage and the counters at their
/// reservation (their worst case: the gateway cannot say what upstream billed).
async fn assert_counters_equal_ledgers_and(
    redis: &RedisServer,
    ledgers: &[Vec<Value>],
    unread: &[(Call, &[&str])],
    subjects: &[(&str, Counted)],
) {
    let mut used = used_by_subject(ledgers);
    for (call, counted_against) in unread {
        let reserved = call.reserved();
        for subject in *counted_against {
            let u = used.entry((*subject).to_owned()).or_default();
            u.input += reserved.input;
            u.output += reserved.output;
            u.nanos += reserved.nanos;
        }
    }
    for (subject, counted) in subjects {
        let want = used.get(*subject).copied().unwrap_or_default();
        let got = redis.counters(subject).await;
        assert_eq!(
            (got.day_nanos, got.month_nanos),
            (want.nanos, want.nanos),
            "{subject}: Redis spend (day, month) against the ledgers' sum; used {want:?}, counters {got:?}"
        );
        if let Counted::Tokens = counted {
            assert_eq!(
                (got.input, got.output),
                (want.input, want.output),
                "{subject}: Redis tokens (in, out) against the ledgers' sums"
            );
        }
    }
}

/// Waits until Redis holds no reservation.
async fn reservations_drain(redis: &RedisServer, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let held = redis.reservations().await;
        if held == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{held} reservations still held: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The log lines of `log` whose message contains `text`.
fn logged<'a>(log: &'a [Value], text: &str) -> Vec<&'a Value> {
    log.iter().filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text))).collect()
}

const REBUILT: &str = "rebuilt them from its ledger";

// ---------------------------------------------------------------------------------------------------------------
// 1. Three gateways, one Redis

/// The chat team's day budget: about 19 requests at the mock's usage (20 in, 100 out of gpt-oss-120b:
/// $0.000063 each), against 72 chat requests sent.
const TEAM_BUDGET_USD: f64 = 0.0012;
/// Search's output tokens per minute: 4 requests of 100, against 36 sent.
const SEARCH_OUTPUT_PER_MINUTE: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_budget_and_one_rate_limit_and_count_what_their_ledgers_say() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let rules = format!(
        r#"
[[limits.rules]]
tag = {{ Team = "chat" }}
usd_per_day = {TEAM_BUDGET_USD}

[[limits.rules]]
project = "Chat-Prod"
requests_per_minute = 100000
input_tokens_per_minute = 10000000
output_tokens_per_minute = 10000000

[[limits.rules]]
project = "Search"
input_tokens_per_minute = 10000000
output_tokens_per_minute = {SEARCH_OUTPUT_PER_MINUTE}
"#
    );
    let mut gateways = Vec::new();
    for instance in ["gw-a", "gw-b", "gw-c"] {
        gateways.push(
            Gateway::start(Setup {
                name: "shared",
                instance,
                redis: &redis,
                upstream: &upstream,
                // Deny: a limits store that failed to answer shows as a 503, which this test allows none of.
                limits: "on_backend_error = \"deny\"\nbackend_timeout = \"2s\"",
                rules: &rules,
                upstream_extra: "",
            })
            .await,
        );
    }
    let gateways = Arc::new(gateways);

    // Watches the team's day counter (spend settled plus reservations held) while the traffic runs: what the
    // gateways have admitted between them never exceeds the budget, at any moment.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (watching, mut conn) = (watching.clone(), redis.conn().await);
        async move {
            let (mut highest, mut reads) = (0u64, 0u64);
            while watching.load(Ordering::SeqCst) {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg("{mantlegate}:c:tag%3ATeam=chat:d*:usd")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                for key in keys {
                    let value: Option<u64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
                    highest = highest.max(value.unwrap_or(0));
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (highest, reads)
        }
    });

    // 108 requests, a third to each gateway, 8 at a time on each: chat (Chat-Prod and Chat-Dev, sharing the team
    // budget) and Search (its output rate), JSON and streams, max_tokens 50 or 100.
    let calls: Vec<(usize, Call)> = (0..108)
        .map(|i| {
            let (stream, max_tokens) = (i % 2 == 0, if i % 4 < 2 { 100 } else { 50 });
            let call = match i % 3 {
                0 => chat(stream, max_tokens),
                1 => chat_dev(stream, max_tokens),
                _ => search(stream, 100),
            };
            (i % 3, call)
        })
        .collect();
    let replies: Vec<(Call, Reply)> = futures_util::stream::iter(calls)
        .map(|(g, call)| {
            let gateways = gateways.clone();
            async move { (call, gateways[g].send(&call).await) }
        })
        .buffer_unordered(24)
        .collect()
        .await;
    watching.store(false, Ordering::SeqCst);
    let (highest, reads) = watcher.await.unwrap();

    let mut by_code: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for (call, reply) in &replies {
        *by_code.entry((reply.status, reply.code.clone())).or_default() += 1;
        match (reply.status, reply.code.as_str()) {
            (200, _) => {}
            (429, "insufficient_quota") => {
                assert_eq!(call.key, CHAT_KEY, "{reply:?}");
                assert_eq!(reply.should_retry.as_deref(), Some("false"), "SDKs must not retry a spent budget");
                assert!(reply.message.contains("tag:Team=chat") && reply.message.contains("usd_per_day"), "{reply:?}");
            }
            (429, "rate_limit_exceeded") => {
                assert_eq!(call.key, SEARCH_KEY, "{reply:?}");
                assert!(reply.message.contains("project:Search"), "{reply:?}");
                assert!(reply.message.contains("output_tokens_per_minute"), "{reply:?}");
            }
            _ => panic!("unexpected answer {reply:?} to {call:?}"),
        }
    }
    let count = |status: u16, code: &str| by_code.get(&(status, code.to_owned())).copied().unwrap_or(0);
    assert!(count(429, "insufficient_quota") > 0, "the budget refused nothing: {by_code:?}");
    assert!(count(429, "rate_limit_exceeded") > 0, "the rate limit refused nothing: {by_code:?}");
    assert!(count(200, "") >= 10, "{by_code:?}");
    assert!(reads > 10, "the watcher read the counter {reads} times");
    assert!(
        highest <= nanos(TEAM_BUDGET_USD),
        "spend admitted at one moment ({highest} nano-USD) exceeded the budget ({} nano-USD)",
        nanos(TEAM_BUDGET_USD)
    );

    // Settled: every gateway stopped (SIGTERM waits for its settles and writes its ledger out).
    let mut gateways = Arc::into_inner(gateways).unwrap();
    let mut ledgers = Vec::new();
    for gw in &mut gateways {
        gw.stop().await;
        ledgers.push(gw.ledger());
    }
    let forwarded = ledgers.iter().flatten().filter(|l| l["refused_by"].is_null()).count();
    assert_eq!(forwarded, count(200, ""), "one ledger line per forwarded request");
    assert!(ledgers.iter().all(|l| l.iter().any(|l| l["refused_by"].is_null())), "every gateway forwarded some");

    // The budget held, with no overshoot (every request's max_tokens covers what it used), on each UTC day.
    for (day, spent) in spend_by_day(&ledgers, "tag:Team=chat") {
        assert!(spent <= nanos(TEAM_BUDGET_USD), "{day}: the chat team spent {spent} nano-USD");
        // More than half of it: the refusals were the budget's, not a counter run away.
        assert!(spent > nanos(TEAM_BUDGET_USD) / 2, "{day}: the chat team spent only {spent} nano-USD");
    }
    // Search's output per minute never exceeded its limit, in any minute.
    let minutes = redis.each("project:Search", "m", "out").await;
    assert!(!minutes.is_empty());
    for (minute, out) in &minutes {
        assert!(*out <= SEARCH_OUTPUT_PER_MINUTE, "{minute}: {out} output tokens");
    }
    // Once settled, Redis counts exactly what the three ledgers say, for every subject.
    assert_eq!(redis.reservations().await, 0, "reservations left behind");
    let subjects = [
        ("tag:Team=chat", Counted::Spend),
        ("tag:Team=search", Counted::Spend),
        ("project:Chat-Prod", Counted::Tokens),
        ("project:Chat-Dev", Counted::Spend),
        ("project:Search", Counted::Tokens),
        ("key:chat-service", Counted::Spend),
        ("key:search-service", Counted::Spend),
    ];
    assert_counters_equal_ledgers(&redis, &ledgers, &subjects).await;
    // Chat-Prod's requests are counted as they are admitted: one per line of its in the ledgers.
    let used = used_by_subject(&ledgers);
    assert_eq!(redis.counters("project:Chat-Prod").await.requests, used["project:Chat-Prod"].requests);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. No reservation left behind

/// The chat team's budget (large: this test is about reservations, not refusals) and Chat-Prod's tokens counted.
const COUNTING_RULES: &str = r#"
[[limits.rules]]
tag = { Team = "chat" }
usd_per_day = 100

[[limits.rules]]
project = "Chat-Prod"
input_tokens_per_minute = 10000000
output_tokens_per_minute = 10000000
"#;

const COUNTED_SUBJECTS: [(&str, Counted); 4] = [
    ("tag:Team=chat", Counted::Spend),
    ("project:Chat-Prod", Counted::Tokens),
    ("project:Chat-Dev", Counted::Spend),
    ("key:chat-service", Counted::Spend),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failure_leaves_a_reservation_behind_and_a_killed_gateways_expire() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // Its reservations live an hour: only its settles can release them.
    let mut survivor = Gateway::start(Setup {
        name: "leaks",
        instance: "gw-b",
        redis: &redis,
        upstream: &upstream,
        limits: "reservation_ttl = \"1h\"",
        rules: COUNTING_RULES,
        upstream_extra: "response_timeout = \"500ms\"",
    })
    .await;
    // SIGKILLed with requests in flight: its reservations expire after 2 s.
    let mut doomed = Gateway::start(Setup {
        name: "leaks",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "reservation_ttl = \"2s\"",
        rules: COUNTING_RULES,
        upstream_extra: "",
    })
    .await;

    // Requests that end well, and each way one can end badly, on the survivor.
    for call in [chat(false, 100), chat(true, 60), chat_dev(false, 80), chat_dev(true, 40)] {
        assert_eq!(survivor.send(&call).await.status, 200);
    }
    for call in [chat(false, 100), chat(true, 100)] {
        let reply = survivor.send(&scripted(call, "fail")).await;
        assert_eq!(reply.status, 500, "upstream's 5xx passes through: {reply:?}");
    }
    let reply = survivor.send(&scripted(chat(false, 100), "hang")).await;
    assert_eq!((reply.status, reply.code.as_str()), (504, "upstream_timeout"));
    // The caller gives up before the response head.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(150)).build().unwrap();
    let call = scripted(chat(true, 100), "hang");
    let req = survivor.request(&call).build().unwrap();
    assert!(impatient.execute(req).await.is_err(), "the caller timed out");
    // The caller hangs up mid-stream.
    let cut = scripted(chat(true, 100), "slow");
    for _ in 0..2 {
        let mut res = survivor.request(&cut).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.chunk().await.unwrap().is_some(), "the first chunk came");
        drop(res);
    }
    eventually("the gateway never hung up on the slow streams", || {
        (upstream.dropped.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    reservations_drain(&redis, "after disconnects, upstream errors and timeouts (settles alone release them here)")
        .await;
    survivor.metric_reaches("mantlegate_limit_reservations_in_flight", 0.0).await;

    // The doomed gateway settles four requests, then holds four more when it is killed.
    for call in [chat(false, 100), chat(true, 50), chat_dev(false, 70), chat_dev(true, 30)] {
        assert_eq!(doomed.send(&call).await.status, 200);
    }
    let parked = upstream.parked();
    let mut clients = Vec::new();
    for call in [chat(false, 100), chat_dev(false, 100)].map(|c| scripted(c, "hang")) {
        let req = doomed.request(&call);
        clients.push(tokio::spawn(async move { req.send().await.map(|_| ()) }));
    }
    for call in [chat(true, 100), chat_dev(true, 100)].map(|c| scripted(c, "slow")) {
        let req = doomed.request(&call);
        clients.push(tokio::spawn(async move {
            let res = req.send().await?;
            res.bytes().await.map(|_| ())
        }));
    }
    eventually("the four requests never reached upstream", || (upstream.parked() == parked + 4).then_some(())).await;
    doomed.ledger_has(4).await;
    assert_eq!(redis.reservations().await, 4, "the doomed gateway's in-flight requests are reserved");
    let before_kill = redis.counters("tag:Team=chat").await;
    doomed.kill().await;
    for client in clients {
        assert!(client.await.unwrap().is_err(), "the killed gateway answered a parked request");
    }
    assert_eq!(redis.reservations().await, 4, "nothing released them yet");
    // The survivor's sweeper releases them once they expire.
    reservations_drain(&redis, "the killed gateway's, past their 2 s expiry").await;
    let after = redis.counters("tag:Team=chat").await;
    assert!(after.day_nanos < before_kill.day_nanos, "releasing took nothing back: {before_kill:?} -> {after:?}");

    survivor.stop().await;
    let ledgers = [survivor.ledger(), doomed.ledger()];
    assert_eq!(ledgers[1].len(), 4, "the killed gateway's ledger: its four settled requests");
    let failed = ledgers[0].iter().filter(|l| l["status"] == 500).count();
    assert_eq!(failed, 2, "the upstream errors are in the ledger");
    // What the killed gateway's unsettled requests reserved was released, not counted. The two streams cut before
    // their usage count what they reserved.
    let cut_lines = ledgers[0].iter().filter(|l| l["status"] == 200 && l["unmetered"].is_string()).count();
    assert_eq!(cut_lines, 2, "the cut streams are in the ledger, unmetered");
    let counted_against: &[&str] = &["tag:Team=chat", "project:Chat-Prod", "key:chat-service"];
    let unread = [(cut, counted_against), (cut, counted_against)];
    assert_counters_equal_ledgers_and(&redis, &ledgers, &unread, &COUNTED_SUBJECTS).await;
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Redis restarted empty

/// About 47 requests at the mock's usage (20 in, 100 out of gpt-oss-120b: $0.000063 each).
const RESTART_BUDGET_USD: f64 = 0.003;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_mid_run_does_not_reset_the_budget() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let rules = format!("[[limits.rules]]\ntag = {{ Team = \"chat\" }}\nusd_per_day = {RESTART_BUDGET_USD}\n");
    let mut gateways = Vec::new();
    for instance in ["gw-a", "gw-b", "gw-c"] {
        gateways.push(
            Gateway::start(Setup {
                name: "restart",
                instance,
                redis: &redis,
                upstream: &upstream,
                limits: "on_backend_error = \"deny\"\nbackend_timeout = \"1s\"",
                rules: &rules,
                upstream_extra: "",
            })
            .await,
        );
    }
    let mixed = [chat(false, 100), chat(true, 100), chat_dev(false, 100), chat_dev(true, 100)];

    // Before: four requests on each gateway, then two streams on each held open at upstream.
    for gw in &gateways {
        for call in &mixed {
            assert_eq!(gw.send(call).await.status, 200);
        }
    }
    let mut held = Vec::new();
    for gw in &gateways {
        for call in [chat(true, 100), chat_dev(true, 100)].map(|c| scripted(c, "gate")) {
            let req = gw.request(&call);
            held.push(tokio::spawn(async move {
                let res = req.send().await.unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            }));
        }
    }
    eventually("the held streams never reached upstream", || (upstream.parked() == 6).then_some(())).await;
    assert_eq!(redis.reservations().await, 6);

    // Redis dies, with all it held. Requests follow on_backend_error (deny) at once; the held streams end and
    // their settles wait for Redis.
    redis.kill().await;
    for gw in &gateways {
        let reply = gw.send(&chat(false, 100)).await;
        assert_eq!((reply.status, reply.code.as_str()), (503, "limits_unavailable"), "{reply:?}");
        assert!(reply.elapsed < Duration::from_secs(1), "denied after {:?}", reply.elapsed);
    }
    upstream.open_gate();
    for stream in held {
        let (status, body) = stream.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("[DONE]"), "{body}");
    }
    let mut log_before = Vec::new();
    for gw in &gateways {
        gw.ledger_has(6).await;
        let reply = gw.send(&chat_dev(true, 100)).await;
        assert_eq!((reply.status, reply.code.as_str()), (503, "limits_unavailable"), "{reply:?}");
        log_before.push(gw.log().len());
    }

    // Redis comes back empty. Each gateway gives it its own ledger's share again once it notices (its next
    // admission, or its sweeper's next round); one request each (denied until it has seen Redis back), which the
    // budget has room for whatever the others have rebuilt. (Until the last of them has, the others admit against
    // a counter without its share: see `known_gap_...` below.)
    redis.restart().await;
    let spent_before: u64 =
        gateways.iter().flat_map(Gateway::ledger).filter_map(|l| l["cost_usd"].as_f64()).map(nanos).sum();
    assert!(spent_before < nanos(RESTART_BUDGET_USD) / 2, "room left for the test: {spent_before}");
    for (g, gw) in gateways.iter().enumerate() {
        admitted_once_back(gw).await;
        eventually(&format!("gateway {g} never rebuilt its counts"), || {
            (!logged(&gw.log()[log_before[g]..], REBUILT).is_empty()).then_some(())
        })
        .await;
    }
    // All three have: each sends until the budget refuses it.
    let gateways = Arc::new(gateways);
    let mut senders = Vec::new();
    for g in 0..3 {
        let gateways = gateways.clone();
        senders.push(tokio::spawn(async move { until_the_budget_refuses(&gateways[g], &mixed).await }));
    }
    let mut admitted = 0;
    for sender in senders {
        admitted += sender.await.unwrap();
    }
    assert!(admitted > 0, "nothing was admitted after the restart");

    let mut gateways = Arc::into_inner(gateways).unwrap();
    let mut ledgers = Vec::new();
    for (g, gw) in gateways.iter_mut().enumerate() {
        let log = gw.stop().await;
        let rebuilt = logged(&log[log_before[g]..], REBUILT);
        assert_eq!(rebuilt.len(), 1, "gateway {g} rebuilt its counts {} times after the restart", rebuilt.len());
        assert_eq!(rebuilt[0]["ledger_lines"], 6, "gateway {g} rebuilt from its six lines: {}", rebuilt[0]);
        ledgers.push(gw.ledger());
    }
    for (day, spent) in spend_by_day(&ledgers, "tag:Team=chat") {
        assert!(spent <= nanos(RESTART_BUDGET_USD), "{day}: the chat team spent {spent} nano-USD across the restart");
    }
    assert_eq!(redis.reservations().await, 0);
    let subjects = ["tag:Team=chat", "project:Chat-Prod", "project:Chat-Dev", "key:chat-service"];
    assert_counters_equal_ledgers(&redis, &ledgers, &subjects.map(|s| (s, Counted::Spend))).await;
}

/// Sends until `gw` admits a request (denied while it has not seen Redis back).
async fn admitted_once_back(gw: &Gateway) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = gw.send(&chat(false, 100)).await;
        match (reply.status, reply.code.as_str()) {
            (200, _) => return,
            (503, "limits_unavailable") => {}
            _ => panic!("{reply:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis is never seen back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `calls` in turn until the budget refuses one: how many were admitted.
async fn until_the_budget_refuses(gw: &Gateway, calls: &[Call]) -> usize {
    for (admitted, call) in calls.iter().cycle().take(200).enumerate() {
        let reply = gw.send(call).await;
        match (reply.status, reply.code.as_str()) {
            (200, _) => {}
            (429, "insufficient_quota") => return admitted,
            _ => panic!("{reply:?}"),
        }
    }
    panic!("the budget never refused 200 requests")
}

/// Pins a gap between the implementation and issue 22 ("a Redis restart ... must not silently reset spend"): after
/// Redis restarts empty, each replica adds its ledger's share back when it notices (at its next admission, or its
/// sweeper's next round), and until the last one has, the others admit against a counter without its share. A
/// replica that cannot reach Redis for a while just then (stalled here with SIGSTOP: a long pause, a partition)
/// leaves the budget open to overshoot by all it had spent. When this fails, the gap is closed: assert
/// `spent <= budget` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_gap_after_redis_restarts_empty_the_budget_lacks_a_stalled_gateways_share_until_it_rebuilds() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let rules = format!("[[limits.rules]]\ntag = {{ Team = \"chat\" }}\nusd_per_day = {RESTART_BUDGET_USD}\n");
    let setup = |instance| Setup {
        name: "stalled",
        instance,
        redis: &redis,
        upstream: &upstream,
        limits: "on_backend_error = \"deny\"\nbackend_timeout = \"1s\"",
        rules: &rules,
        upstream_extra: "",
    };
    let (mut busy, mut stalled) = (Gateway::start(setup("gw-a")).await, Gateway::start(setup("gw-b")).await);
    // The stalled one spent a third of the budget before Redis restarted.
    for _ in 0..15 {
        assert_eq!(stalled.send(&chat(false, 100)).await.status, 200);
    }
    assert_eq!(busy.send(&chat(false, 100)).await.status, 200);
    stalled.ledger_has(15).await;
    busy.ledger_has(1).await;
    stalled.signal("-STOP").await;
    redis.kill().await;
    redis.restart().await;
    admitted_once_back(&busy).await;
    until_the_budget_refuses(&busy, &[chat(false, 100), chat_dev(true, 100)]).await;
    let over: u64 = [&busy, &stalled].iter().map(|gw| spend_of(&gw.ledger())).sum();
    assert!(
        over > nanos(RESTART_BUDGET_USD),
        "the gap is closed ({over} nano-USD spent of {}): turn this test into the assertion that the budget holds",
        nanos(RESTART_BUDGET_USD)
    );
    // Running again, the stalled gateway gives its share back with no request of its own (its sweeper notices).
    stalled.signal("-CONT").await;
    let want = || used_by_subject(&[busy.ledger(), stalled.ledger()])["tag:Team=chat"].nanos;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = redis.counters("tag:Team=chat").await.day_nanos;
        if got == want() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis counts {got} nano-USD, the ledgers {}", want());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stalled.send(&chat(false, 100)).await.code, "insufficient_quota");
    busy.stop().await;
    stalled.stop().await;
    let ledgers = [busy.ledger(), stalled.ledger()];
    assert_counters_equal_ledgers(&redis, &ledgers, &[("tag:Team=chat", Counted::Spend)]).await;
}

// ---------------------------------------------------------------------------------------------------------------
// 4. on_backend_error

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_deny_refuses_at_once_with_limits_unavailable() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(Setup {
        name: "deny",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "on_backend_error = \"deny\"\nbackend_timeout = \"250ms\"",
        rules: COUNTING_RULES,
        upstream_extra: "",
    })
    .await;
    assert_eq!(gw.send(&chat(false, 100)).await.status, 200);
    let hits = upstream.mock.hits();

    // Hung (SIGSTOP): the first request waits out backend_timeout, the next not even that.
    redis.pause().await;
    for _ in 0..2 {
        let reply = gw.send(&chat(true, 100)).await;
        assert_eq!((reply.status, reply.code.as_str()), (503, "limits_unavailable"), "{reply:?}");
        assert!(reply.elapsed < Duration::from_secs(1), "denied after {:?}", reply.elapsed);
    }
    assert_eq!(upstream.mock.hits(), hits, "a denied request never reaches upstream");
    gw.metric_reaches("mantlegate_limit_backend_up", 0.0).await;
    assert_eq!(gw.metric("mantlegate_limit_backend_error_decisions_total{decision=\"denied\"}").await, Some(2.0));

    // Back: admitted again; and nothing the hung Redis ran late is left reserved.
    redis.resume().await;
    gw.metric_reaches("mantlegate_limit_backend_up", 1.0).await;
    assert_eq!(gw.send(&chat(false, 100)).await.status, 200);
    reservations_drain(&redis, "after Redis hung and came back").await;

    // Gone (SIGKILL, connections refused): denied at once.
    redis.kill().await;
    for _ in 0..2 {
        let reply = gw.send(&chat_dev(false, 100)).await;
        assert_eq!((reply.status, reply.code.as_str()), (503, "limits_unavailable"), "{reply:?}");
        assert!(reply.elapsed < Duration::from_secs(1), "denied after {:?}", reply.elapsed);
    }
    assert_eq!(gw.metric("mantlegate_limit_backend_error_decisions_total{decision=\"denied\"}").await, Some(4.0));
    assert_eq!(upstream.mock.hits(), hits + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_whose_caller_left_while_redis_was_slow_holds_nothing_once_redis_answers() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // Reservations that live an hour: only a release can take this one back in the test's time.
    let mut gw = Gateway::start(Setup {
        name: "abandoned",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "backend_timeout = \"2s\"\nreservation_ttl = \"1h\"",
        rules: COUNTING_RULES,
        upstream_extra: "",
    })
    .await;
    assert_eq!(gw.send(&chat(false, 100)).await.status, 200);
    // Redis stalls while a request's admission waits on it; its caller gives up; then Redis runs the admission.
    redis.pause().await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let req = gw.request(&chat(false, 100)).header("x-request-id", "rid-abandoned").build().unwrap();
    assert!(impatient.execute(req).await.is_err(), "the caller timed out");
    let line = gw.running.as_ref().unwrap().access_line("rid-abandoned").await;
    assert_eq!(line["status"], 499, "{line}");
    redis.resume().await;
    reservations_drain(&redis, "an admission no request waits for").await;
    assert_eq!(upstream.mock.hits(), 1, "the abandoned request never reached upstream");
    assert_eq!(gw.send(&chat_dev(true, 100)).await.status, 200);
    gw.stop().await;
    assert_counters_equal_ledgers(&redis, &[gw.ledger()], &COUNTED_SUBJECTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_allow_forwards_and_counts_the_usage_once_redis_is_back() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(Setup {
        name: "allow",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "on_backend_error = \"allow\"\nbackend_timeout = \"250ms\"",
        rules: COUNTING_RULES,
        upstream_extra: "",
    })
    .await;
    for call in [chat(false, 100), chat_dev(true, 100)] {
        assert_eq!(gw.send(&call).await.status, 200);
    }

    // Hung (SIGSTOP): requests are forwarded, unreserved, without waiting more than backend_timeout.
    redis.pause().await;
    let hits = upstream.mock.hits();
    for call in [chat(false, 90), chat(true, 80), chat_dev(false, 70)] {
        let reply = gw.send(&call).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(reply.elapsed < Duration::from_secs(1), "answered after {:?}", reply.elapsed);
    }
    assert_eq!(upstream.mock.hits(), hits + 3);
    assert_eq!(gw.metric("mantlegate_limit_backend_error_decisions_total{decision=\"allowed\"}").await, Some(3.0));
    gw.metric_reaches("mantlegate_limit_backend_up", 0.0).await;
    let ledger = gw.ledger_has(5).await;
    let uncounted = spend_of(&ledger[2..]);
    assert!(uncounted > 0);

    // Back (SIGCONT, its data kept): the settles kept meanwhile are replayed, so Redis counts those requests too.
    redis.resume().await;
    gw.metric_reaches("mantlegate_limit_backend_up", 1.0).await;
    let ledgers = [ledger];
    let want = used_by_subject(&ledgers)["tag:Team=chat"].nanos;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = redis.counters("tag:Team=chat").await.day_nanos;
        if got == want {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis counts {got} nano-USD, the ledger {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reservations_drain(&redis, "after Redis hung and came back").await;
    gw.stop().await;
    assert_counters_equal_ledgers(&redis, &ledgers, &COUNTED_SUBJECTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_redis_has_not_taken_when_the_gateway_stops_are_made_by_the_next_process() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(Setup {
        name: "kept",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "on_backend_error = \"allow\"\nbackend_timeout = \"250ms\"",
        rules: COUNTING_RULES,
        upstream_extra: "",
    })
    .await;
    assert_eq!(gw.send(&chat(false, 100)).await.status, 200);
    // Hung: requests are forwarded unreserved, and their settles kept for when Redis answers again.
    redis.pause().await;
    for call in [chat(false, 90), chat(true, 80), chat_dev(false, 70)] {
        assert_eq!(gw.send(&call).await.status, 200);
    }
    gw.metric_reaches("mantlegate_limit_backend_up", 0.0).await;
    let ledger = gw.ledger_has(4).await;

    // Stopped before it does: they are written beside the ledger.
    let log = gw.stop().await;
    assert_eq!(logged(&log, "kept for the next start").len(), 1, "{log:?}");
    // `<ledger>.unsettled.<process>`: one file, of this process.
    let dir = gw.ledger.parent().unwrap().to_owned();
    let kept_files = || -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        files.retain(|f| f.file_name().unwrap().to_str().unwrap().starts_with("usage.jsonl.unsettled."));
        files
    };
    let files = kept_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let kept = std::fs::read_to_string(&files[0]).unwrap();
    assert!(kept.lines().count() >= 3, "{kept}");
    assert!(!kept.contains(UPSTREAM_KEY) && !kept.contains(CHAT_KEY), "{kept}");

    // Redis back, and a new process on the same ledger: it makes them, once, and forgets the file.
    redis.resume().await;
    gw.restart().await;
    let want = used_by_subject(std::slice::from_ref(&ledger))["tag:Team=chat"].nanos;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, files) = (redis.counters("tag:Team=chat").await.day_nanos, kept_files());
        if got == want && files.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis counts {got} nano-USD, the ledger {want}; files {files:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
    assert_counters_equal_ledgers(&redis, &[gw.ledger()], &COUNTED_SUBJECTS).await;
}

/// The spend of `lines`, in nano-USD.
fn spend_of(lines: &[Value]) -> u64 {
    lines.iter().filter_map(|l| l["cost_usd"].as_f64()).map(nanos).sum()
}

// ---------------------------------------------------------------------------------------------------------------
// 5. limits status

/// One limit as `limits status` prints it: subject, limit, max, used, remaining, resets at.
fn status_rows(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("limits (redis backend):"), "{text}");
    assert!(lines.next().is_some_and(|h| h.starts_with("SUBJECT")), "{text}");
    lines
        .map(|l| {
            let cells: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
            assert_eq!(cells.len(), 6, "{l}");
            ((cells[0].clone(), cells[1].clone()), cells[2..].to_vec())
        })
        .collect()
}

async fn limits_status(config: &std::path::Path, admin: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["limits", "status", "--config"]).arg(config);
    if let Some(admin) = admin {
        cmd.args(["--admin", admin]);
    }
    let out = tokio::time::timeout(WAIT, cmd.env("MANTLE_API_KEY", UPSTREAM_KEY).output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "limits status failed: {stdout}{stderr}");
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_status_prints_every_limit_with_its_use_from_the_gateway_or_from_redis() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let rules = r#"
[[limits.rules]]
tag = { Team = "chat" }
usd_per_day = 5

[[limits.rules]]
project = "Chat-Prod"
input_tokens_per_minute = 100000
output_tokens_per_minute = 100000

[[limits.rules]]
key = "chat-service"
requests_per_minute = 1000
usd_per_month = 50
"#;
    let mut gw = Gateway::start(Setup {
        name: "status",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "",
        rules,
        upstream_extra: "",
    })
    .await;
    for call in [chat(false, 1000), chat(true, 900), chat_dev(false, 800)] {
        assert_eq!(gw.send(&call).await.status, 200);
    }
    let ledger = gw.ledger_has(3).await;
    let spent = spend_of(&ledger);
    let usd = |n: u64| format!("${:.4}", n as f64 / 1e9);

    // What each row must say: its max, and its use now (a per-minute row: its minute's counter in Redis).
    let check = |text: &str, minute_counters: &BTreeMap<String, u64>| {
        let rows = status_rows(text);
        let keys: Vec<(&str, &str)> = rows.keys().map(|(s, l)| (s.as_str(), l.as_str())).collect();
        assert_eq!(
            keys,
            [
                ("key:chat-service", "requests_per_minute"),
                ("key:chat-service", "usd_per_month"),
                ("project:Chat-Prod", "input_tokens_per_minute"),
                ("project:Chat-Prod", "output_tokens_per_minute"),
                ("tag:Team=chat", "usd_per_day"),
            ],
            "{text}"
        );
        let row = |s: &str, l: &str| rows[&(s.to_owned(), l.to_owned())].clone();
        assert_eq!(row("tag:Team=chat", "usd_per_day")[..2], [usd(5_000_000_000), usd(spent)], "{text}");
        assert_eq!(row("key:chat-service", "usd_per_month")[..2], [usd(50_000_000_000), usd(spent)], "{text}");
        for (subject, limit, max, what) in [
            ("key:chat-service", "requests_per_minute", "1000", "req"),
            ("project:Chat-Prod", "input_tokens_per_minute", "100000", "in"),
            ("project:Chat-Prod", "output_tokens_per_minute", "100000", "out"),
        ] {
            let cells = row(subject, limit);
            let resets = humantime::parse_rfc3339(&cells[3]).unwrap();
            let minute = resets.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 60 - 1;
            let key = format!("{{mantlegate}}:c:{}:m{minute}:{what}", subject.replace(':', "%3A"));
            let used = minute_counters.get(&key).copied().unwrap_or(0);
            assert_eq!(cells[..2], [max.to_owned(), used.to_string()], "{subject} {limit} against {key}: {text}");
        }
    };
    let minute_counters = async || {
        let mut all = BTreeMap::new();
        for (subject, what) in [("key:chat-service", "req"), ("project:Chat-Prod", "in"), ("project:Chat-Prod", "out")]
        {
            all.extend(redis.each(subject, "m", what).await);
        }
        all
    };
    // The minute counters hold this traffic (unless the minute has ended since: the rows are checked against
    // the counters of the minute they show).
    let counted = minute_counters().await;
    assert_eq!(counted.iter().filter(|(k, _)| k.ends_with(":out")).map(|(_, v)| v).sum::<u64>(), 1000 + 900);
    assert_eq!(counted.iter().filter(|(k, _)| k.ends_with(":req")).map(|(_, v)| v).sum::<u64>(), 3);

    // Asked of the running gateway.
    let (text, stderr) = limits_status(&gw.config, Some(&gw.admin)).await;
    assert!(!stderr.contains("reading Redis directly"), "{stderr}");
    check(&text, &minute_counters().await);

    // No gateway running (the config's admin address, port 0, answers nothing): read from Redis.
    gw.stop().await;
    let (text, stderr) = limits_status(&gw.config, None).await;
    assert!(stderr.contains("reading Redis directly"), "{stderr}");
    check(&text, &minute_counters().await);
}

// ---------------------------------------------------------------------------------------------------------------
// 6. A reload that adds a budget

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_budget_sees_the_spend_so_far_today() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // A rule on another team only: the chat team's spend is counted all the same.
    let before = "[[limits.rules]]\nkey = \"search-service\"\nrequests_per_minute = 1000\n";
    let setup = |rules| Setup {
        name: "reload",
        instance: "gw-a",
        redis: &redis,
        upstream: &upstream,
        limits: "",
        rules,
        upstream_extra: "",
    };
    let mut gw = Gateway::start(setup(before)).await;
    for call in [chat(false, 100), chat(true, 100), chat_dev(false, 100), chat_dev(true, 100)] {
        assert_eq!(gw.send(&call).await.status, 200);
    }
    let spent = spend_of(&gw.ledger_has(4).await);
    // Room for half a request more.
    let budget = (spent + nanos(0.000063) / 2) as f64 / 1e9;
    let after = format!("{before}\n[[limits.rules]]\ntag = {{ Team = \"chat\" }}\nusd_per_day = {budget}\n");
    let (text, _) = gateway_config(&setup(&after));
    std::fs::write(&gw.config, text).unwrap();
    let reload = gw.client.post(format!("http://{}/reload", gw.admin)).send().await.unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap());

    let limits = gw.limits().await;
    let row = limits["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["subject"] == "tag:Team=chat" && l["limit"] == "usd_per_day")
        .unwrap_or_else(|| panic!("no tag:Team=chat/usd_per_day in {limits}"))
        .clone();
    assert_eq!(nanos(row["used"].as_f64().unwrap()), spent, "{row}");
    let reply = gw.send(&chat(false, 100)).await;
    assert_eq!((reply.status, reply.code.as_str()), (429, "insufficient_quota"), "{reply:?}");
    assert!(reply.message.contains("tag:Team=chat"), "{reply:?}");
    assert_eq!(gw.send(&search(false, 100)).await.status, 200, "another team is not limited by it");
    gw.stop().await;
}
