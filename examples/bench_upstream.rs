//! The benchmarks' mock upstream: an OpenAI-shaped chat completions endpoint, on plain hyper so that it costs
//! as little as possible and every arm of a benchmark shares the same floor.
//!
//! Usage: `bench_upstream ADDR API_KEY PROJECT_ID`; prints `listening on ADDR` once bound.
//!
//! Like bedrock-mantle it answers 401 without `Authorization: Bearer API_KEY` and 404 when `OpenAI-Project`
//! is not PROJECT_ID. A body containing `"stream":true` gets server-sent events, shaped by request headers:
//! - `x-bench-events: N`: content events per stream (default 20);
//! - `x-bench-gap-us: D`: pause before each event after the first (default 0);
//! - `x-bench-hold: 1`: send the first event, then hold the stream open until the client leaves (idle streams).
//!
//! Every event carries `"t":` the wall-clock time it was written, in nanoseconds since the Unix epoch, so a
//! client on the same machine can tell how long each event spent in transit. A body containing
//! `"include_usage":true` also gets the usage chunk at the end, and `"usage":null` in every other chunk, as
//! the real API sends them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};

const MODEL: &str = "openai.gpt-oss-120b";
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764115200,"model":"openai.gpt-oss-120b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is the benchmark upstream answering with a short, fixed completion."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}"#;

type Body = BoxBody<Bytes, Infallible>;

struct Upstream {
    authorization: String,
    project: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let api_key = args.next().unwrap_or_else(|| "bench-upstream-key".into());
    let project = args.next().unwrap_or_else(|| "proj_bench".into());
    let upstream = Arc::new(Upstream { authorization: format!("Bearer {api_key}"), project });

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, say: a benchmark asking for more streams than the machine allows.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small SSE writes must leave at once, not wait on Nagle's algorithm for the previous one's ACK.
        let _ = tcp.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(upstream.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(upstream: Arc<Upstream>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST, "unreadable body")),
    };
    if parts.headers.get(header::AUTHORIZATION).is_none_or(|v| v.as_bytes() != upstream.authorization.as_bytes()) {
        return Ok(status(StatusCode::UNAUTHORIZED, "the bench upstream did not get its key"));
    }
    if parts.headers.get("openai-project").is_none_or(|v| v.as_bytes() != upstream.project.as_bytes()) {
        return Ok(status(StatusCode::NOT_FOUND, "no such project"));
    }
    if !parts.uri.path().ends_with("/chat/completions") {
        return Ok(status(StatusCode::NOT_FOUND, "the bench upstream serves chat completions only"));
    }
    if memchr::memmem::find(&body, br#""stream":true"#).is_none() {
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(COMPLETION.as_bytes())).boxed())
            .expect("static response"));
    }
    let plan = Plan {
        events: number(&parts.headers, "x-bench-events").unwrap_or(20),
        gap: Duration::from_micros(number(&parts.headers, "x-bench-gap-us").unwrap_or(0)),
        hold: parts.headers.get("x-bench-hold").is_some_and(|v| v == "1"),
        usage: memchr::memmem::find(&body, br#""include_usage":true"#).is_some(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(plan.stream(tx));
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(body))
        .expect("static response"))
}

struct Plan {
    events: u64,
    gap: Duration,
    hold: bool,
    usage: bool,
}

impl Plan {
    /// Writes the stream's events; stops early when the client has gone.
    async fn stream(self, tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
        let send = |event: String| tx.send(Ok(Frame::data(Bytes::from(event))));
        for i in 0..self.events {
            if i > 0 && !self.gap.is_zero() {
                tokio::time::sleep(self.gap).await;
            }
            let (delta, finish) =
                if i + 1 == self.events { (r#"{}"#, r#""stop""#) } else { (r#"{"content":"word "}"#, "null") };
            // Under include_usage every other chunk carries `"usage":null`, as OpenAI's do.
            let usage = if self.usage { r#""usage":null,"# } else { "" };
            let event = format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764115200,\
                 \"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}],\
                 {usage}\"t\":{}}}\n\n",
                now_ns()
            );
            if send(event).await.is_err() {
                return;
            }
            if self.hold {
                // An idle stream: nothing more until the client leaves and the receiver is dropped.
                tx.closed().await;
                return;
            }
        }
        if self.usage {
            let n = self.events.saturating_sub(1);
            let event = format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764115200,\
                 \"model\":\"{MODEL}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{n},\
                 \"total_tokens\":{}}},\"t\":{}}}\n\n",
                n + 12,
                now_ns()
            );
            if send(event).await.is_err() {
                return;
            }
        }
        let _ = send("data: [DONE]\n\n".into()).await;
    }
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    let body = format!(r#"{{"error":{{"message":"{message}","type":"invalid_request_error","code":null}}}}"#);
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response")
}
