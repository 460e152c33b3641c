//! The benchmarks' streaming client, for what wrk and oha do not measure: how long each server-sent event
//! spends in transit, time to first byte, and holding thousands of idle streams open.
//!
//! ```text
//! bench_client stream URL --streams 200 --concurrency 4 -H 'authorization: Bearer KEY' -H 'x-bench-gap-us: 2000'
//! bench_client idle URL --streams 1000 -H 'authorization: Bearer KEY'
//! bench_client rate URL --rate 2000 --seconds 10 -H 'authorization: Bearer KEY'
//! ```
//!
//! `stream` runs streamed chat completions against `examples/bench_upstream.rs` (directly or through a
//! proxy), each event stamped by the upstream with the time it was written, and prints one JSON object:
//! percentiles of time to first byte (request written to first event read) and of each event's transit
//! time (read minus written), in microseconds.
//!
//! `idle` opens that many streams, each on its own connection, asking the upstream to hold them open after
//! the first event; once every stream has its first event (or failed) it prints `{"open":N,"failed":M}`,
//! then keeps them all open until its standard input closes, and exits.
//!
//! `rate` sends non-streamed chat completions at a fixed rate, open loop: request i is due at start + i/rate
//! whether or not earlier ones have been answered, and its latency is counted from when it was due, so a
//! stall shows in every request it delays (the latency correction of wrk2 and oha, which avoids coordinated
//! omission). Prints the achieved rate and latency percentiles in milliseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;

const JSON_BODY: &str = r#"{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"Hello there"}]}"#;
const STREAM_BODY: &str =
    r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"Hello there"}]}"#;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Streams to completion, timing the first byte and every event.
    Stream {
        url: Uri,
        #[arg(long, default_value_t = 100)]
        streams: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// A request header, `name: value`.
        #[arg(short = 'H')]
        header: Vec<String>,
    },
    /// Non-streamed requests at a fixed rate, latency counted from when each was due.
    Rate {
        url: Uri,
        #[arg(long)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Connections to spread the requests over (each carries one request at a time).
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(short = 'H')]
        header: Vec<String>,
    },
    /// Holds streams open, idle after their first event, until standard input closes.
    Idle {
        url: Uri,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        #[arg(short = 'H')]
        header: Vec<String>,
    },
}

#[derive(Clone)]
struct Target {
    uri: Uri,
    authority: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: &'static str,
}

impl Target {
    fn new(uri: Uri, body: &'static str, headers: &[String], extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let authority = uri.authority().context("the URL needs a host:port")?.to_string();
        let mut parsed = Vec::new();
        for header in headers {
            let (name, value) = header.split_once(':').context("headers are `name: value`")?;
            parsed.push((name.trim().parse()?, value.trim().parse()?));
        }
        for (name, value) in extra {
            parsed.push((name.parse()?, value.parse()?));
        }
        Ok(Self { uri, authority, headers: parsed, body })
    }

    async fn connect(&self) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(&self.authority).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::post(self.uri.path())
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(self.body.as_bytes())))
            .expect("static request");
        for (name, value) in &self.headers {
            request.headers_mut().append(name.clone(), value.clone());
        }
        request
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Stream { url, streams, concurrency, header } => {
            stream(Target::new(url, STREAM_BODY, &header, &[])?, streams, concurrency).await
        }
        Mode::Rate { url, rate, seconds, connections, header } => {
            fixed_rate(Target::new(url, JSON_BODY, &header, &[])?, rate, seconds, connections).await
        }
        Mode::Idle { url, streams, header } => {
            idle(Target::new(url, STREAM_BODY, &header, &[("x-bench-hold", "1")])?, streams).await
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Default)]
struct Timings {
    ttfb_ns: Vec<u64>,
    transit_ns: Vec<u64>,
}

async fn stream(target: Target, streams: usize, concurrency: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, next) = (target.clone(), next.clone());
        workers.spawn(async move {
            let mut timings = Timings::default();
            let mut sender = target.connect().await?;
            while next.fetch_add(1, Ordering::Relaxed) < streams {
                one_stream(&target, &mut sender, &mut timings).await?;
            }
            anyhow::Ok(timings)
        });
    }
    let mut all = Timings::default();
    while let Some(worker) = workers.join_next().await {
        let timings = worker??;
        all.ttfb_ns.extend(timings.ttfb_ns);
        all.transit_ns.extend(timings.transit_ns);
    }
    println!(
        "{{\"streams\":{},\"events\":{},\"seconds\":{:.3},\"ttfb_us\":{},\"event_us\":{}}}",
        all.ttfb_ns.len(),
        all.transit_ns.len(),
        started.elapsed().as_secs_f64(),
        percentiles(&mut all.ttfb_ns),
        percentiles(&mut all.transit_ns)
    );
    Ok(())
}

/// One streamed request on a kept-alive connection, its first byte and every event timed.
async fn one_stream(
    target: &Target,
    sender: &mut http1::SendRequest<Full<Bytes>>,
    timings: &mut Timings,
) -> anyhow::Result<()> {
    sender.ready().await?;
    let sent = now_ns();
    let response = sender.send_request(target.request()).await?;
    if !response.status().is_success() {
        bail!("status {}", response.status());
    }
    let mut body = response.into_body();
    let mut pending = BytesMut::new();
    let mut first = true;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let arrived = now_ns();
        let Ok(data) = frame?.into_data() else { continue };
        if first {
            timings.ttfb_ns.push(arrived.saturating_sub(sent));
            first = false;
        }
        pending.extend_from_slice(&data);
        while let Some(end) = memchr::memmem::find(&pending, b"\n\n") {
            let event = pending.split_to(end + 2);
            if event.starts_with(b"data: [DONE]") {
                done = true;
            } else if let Some(written) = stamp(&event) {
                timings.transit_ns.push(arrived.saturating_sub(written));
            }
        }
    }
    if !done {
        bail!("stream ended without [DONE]");
    }
    Ok(())
}

/// The upstream's `"t":` stamp in an event.
fn stamp(event: &[u8]) -> Option<u64> {
    let at = memchr::memmem::rfind(event, br#""t":"#)? + 4;
    let digits = event[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&event[at..at + digits]).ok()?.parse().ok()
}

async fn fixed_rate(target: Target, rate: u32, seconds: u32, connections: usize) -> anyhow::Result<()> {
    let total = u64::from(rate) * u64::from(seconds);
    let interval = Duration::from_secs(1) / rate.max(1);
    let (due_tx, due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let due_rx = Arc::new(tokio::sync::Mutex::new(due_rx));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let (target, due_rx) = (target.clone(), due_rx.clone());
        workers.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            let mut sender = None;
            loop {
                let Some(due) = due_rx.lock().await.recv().await else { break };
                match send_one(&target, &mut sender).await {
                    Ok(()) => latencies.push(due.elapsed().as_nanos() as u64),
                    Err(_) => {
                        errors += 1;
                        sender = None;
                    }
                }
            }
            (latencies, errors)
        });
    }
    // The schedule runs on its own thread: std's sleep wakes within tens of microseconds, where tokio's
    // timer would round every due time up to the next millisecond and so add up to a millisecond to each.
    let start = Instant::now();
    let schedule = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if due_tx.send(due).is_err() {
                break;
            }
        }
    });
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while let Some(worker) = workers.join_next().await {
        let (l, e) = worker?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    schedule.join().map_err(|_| anyhow::anyhow!("the schedule thread panicked"))?;
    // In microseconds, which `percentiles` prints as milliseconds.
    let mut us = latencies.iter().map(|ns| ns / 1000).collect::<Vec<_>>();
    println!(
        "{{\"requests\":{},\"errors\":{errors},\"rps\":{:.1},\"latency_ms\":{}}}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        percentiles(&mut us)
    );
    Ok(())
}

/// One non-streamed request, its body read to the end, on `sender`'s connection (made if there is none).
async fn send_one(target: &Target, sender: &mut Option<http1::SendRequest<Full<Bytes>>>) -> anyhow::Result<()> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(target.connect().await?);
    }
    let connection = sender.as_mut().expect("connected above");
    connection.ready().await?;
    let response = connection.send_request(target.request()).await?;
    let status = response.status();
    response.into_body().collect().await?;
    if !status.is_success() {
        bail!("status {status}");
    }
    Ok(())
}

fn percentiles(values: &mut [u64]) -> String {
    values.sort_unstable();
    let at = |q: f64| {
        if values.is_empty() {
            return 0.0;
        }
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1] as f64 / 1000.0
    };
    format!(
        "{{\"p50\":{:.3},\"p99\":{:.3},\"p99_9\":{:.3},\"max\":{:.3}}}",
        at(0.5),
        at(0.99),
        at(0.999),
        values.last().map_or(0.0, |v| *v as f64 / 1000.0)
    )
}

async fn idle(target: Target, streams: usize) -> anyhow::Result<()> {
    // Connect a few hundred at a time: a burst of ten thousand SYNs overflows the listen backlog.
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    for _ in 0..streams {
        let (target, connecting, ready) = (target.clone(), connecting.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let permit = connecting.acquire_owned().await;
            let opened = async {
                let mut sender = target.connect().await?;
                let response = sender.send_request(target.request()).await?;
                if !response.status().is_success() {
                    bail!("status {}", response.status());
                }
                let mut body = response.into_body();
                match body.frame().await {
                    Some(Ok(_)) => anyhow::Ok((sender, body)),
                    _ => bail!("no first event"),
                }
            }
            .await;
            drop(permit);
            let _ = ready.send(opened.is_ok());
            // Held, idle, until the process exits.
            if let Ok(_open) = opened {
                std::future::pending::<()>().await;
            }
        });
    }
    let (mut open, mut failed) = (0, 0);
    while open + failed < streams {
        match ready_rx.recv().await {
            Some(true) => open += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    println!("{{\"open\":{open},\"failed\":{failed}}}");
    tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await??;
    Ok(())
}
