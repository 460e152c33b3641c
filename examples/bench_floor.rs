//! The benchmarks' floor: the least a hyper reverse proxy does for the job `bench/nginx.conf` gives nginx
//! (the caller's key mapped to a project, the project header and the upstream key sent, the response
//! streamed back), laid out as mantlegate's traffic threads are: one single-threaded runtime per core, each
//! accepting from the one listening socket. None of the gateway's own work is here: no routes, no access
//! line, no metrics, no timeouts, no request id, and no pool (each caller connection gets an upstream
//! connection of its own). `bench/compare.py` measures it beside the other arms, so a report shows how much
//! of the distance to nginx is the HTTP stack's (hyper, tokio) and how much is mantlegate's.
//!
//! Usage: `bench_floor UPSTREAM_ADDR CALLER_KEY UPSTREAM_KEY PROJECT_ID [THREADS]`; prints `listening on ADDR`
//! once bound. THREADS defaults to one per CPU, as `server.workers` does.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

struct Floor {
    upstream: SocketAddr,
    /// `Bearer CALLER_KEY`, the one key nginx's `map` knows.
    caller: HeaderValue,
    authorization: HeaderValue,
    project: HeaderValue,
}

type Body = Either<Incoming, Full<Bytes>>;

#[path = "shared/floor.rs"]
mod floor;

fn main() -> anyhow::Result<()> {
    let args = floor::args("bench_floor")?;
    let state = Arc::new(Floor {
        upstream: args.upstream,
        caller: format!("Bearer {}", args.caller_key).parse()?,
        authorization: format!("Bearer {}", args.upstream_key).parse()?,
        project: args.project.parse()?,
    });
    floor::run(args.threads, state, connection)
}

/// A caller connection, with the upstream connection its requests go over.
async fn connection(tcp: TcpStream, floor: Arc<Floor>) {
    let upstream = match TcpStream::connect(floor.upstream).await {
        Ok(upstream) => upstream,
        Err(e) => return eprintln!("connecting upstream: {e}"),
    };
    let _ = upstream.set_nodelay(true);
    let (sender, upstream) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(handshaken) => handshaken,
        Err(e) => return eprintln!("upstream handshake: {e}"),
    };
    tokio::task::spawn_local(upstream);
    let sender = Rc::new(RefCell::new(sender));
    let service = hyper::service::service_fn(move |request| forward(floor.clone(), sender.clone(), request));
    // The same write strategy as mantlegate's traffic listener.
    let served = hyper::server::conn::http1::Builder::new().writev(false).serve_connection(TokioIo::new(tcp), service);
    if let Err(e) = served.await {
        eprintln!("caller connection: {e}");
    }
}

async fn forward(
    floor: Arc<Floor>,
    sender: Rc<RefCell<SendRequest<Incoming>>>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    let headers = request.headers_mut();
    if headers.get(header::AUTHORIZATION) != Some(&floor.caller) {
        let mut refused = Response::new(Either::Right(Full::from(r#"{"error":{"code":"invalid_api_key"}}"#)));
        *refused.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(refused);
    }
    headers.insert(header::AUTHORIZATION, floor.authorization.clone());
    headers.insert("openai-project", floor.project.clone());
    // A caller connection sends its next request only after the last response ended, so the upstream
    // connection is free by then; this waits for hyper to see that too.
    poll_fn(|cx| sender.borrow_mut().poll_ready(cx)).await?;
    let response = sender.borrow_mut().send_request(request);
    Ok(response.await?.map(Either::Left))
}
