//! An experiment, not a gateway: `bench_floor`'s job and threading with no HTTP library but `httparse`, to
//! measure how much of a request's cost is hyper's (bench/README.md, tenth round). It reads a request head,
//! swaps the caller's key for the upstream key and the project header, writes the request upstream over the
//! caller connection's own upstream connection, and copies the response back. It handles only what the JSON
//! workload sends: `Content-Length` bodies both ways (a chunked message ends the connection), no limits on
//! head or body size, no timeouts, no `Connection: close`. `bench/paired.py` measures it as `rawfloor`.
//!
//! Usage: `bench_rawfloor UPSTREAM_ADDR CALLER_KEY UPSTREAM_KEY PROJECT_ID [THREADS]`; prints
//! `listening on ADDR` once bound.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Floor {
    upstream: SocketAddr,
    caller: Vec<u8>,
    authorization: Vec<u8>,
    project: Vec<u8>,
}

#[path = "shared/floor.rs"]
mod floor;

fn main() -> anyhow::Result<()> {
    let args = floor::args("bench_rawfloor")?;
    let state = Arc::new(Floor {
        upstream: args.upstream,
        caller: format!("Bearer {}", args.caller_key).into_bytes(),
        authorization: format!("Bearer {}", args.upstream_key).into_bytes(),
        project: args.project.into_bytes(),
    });
    floor::run(args.threads, state, connection)
}

async fn connection(caller: TcpStream, floor: Arc<Floor>) {
    if let Err(e) = exchange(caller, floor).await {
        eprintln!("connection: {e}");
    }
}

/// A message's body length; a chunked body is an error (not in the JSON workload).
fn content_length(headers: &[httparse::Header]) -> anyhow::Result<usize> {
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            return Ok(std::str::from_utf8(h.value)?.trim().parse()?);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::bail!("chunked not supported");
        }
    }
    Ok(0)
}

/// Reads until `buf` holds `want` bytes; false if the peer closed first.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> anyhow::Result<bool> {
    while buf.len() < want {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A caller connection's requests, one after another, each over the one upstream connection.
async fn exchange(mut caller: TcpStream, floor: Arc<Floor>) -> anyhow::Result<()> {
    let mut upstream = TcpStream::connect(floor.upstream).await?;
    upstream.set_nodelay(true)?;
    let mut inbuf: Vec<u8> = Vec::with_capacity(16384);
    let mut upbuf: Vec<u8> = Vec::with_capacity(16384);
    let mut out: Vec<u8> = Vec::with_capacity(16384);
    loop {
        // The caller's request head.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = request.parse(&inbuf)? {
                let body_len = content_length(request.headers)?;
                out.clear();
                let authorized = request
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("authorization") && h.value == floor.caller.as_slice());
                if !authorized {
                    caller.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n").await?;
                    return Ok(());
                }
                out.extend_from_slice(request.method.unwrap_or("GET").as_bytes());
                out.push(b' ');
                out.extend_from_slice(request.path.unwrap_or("/").as_bytes());
                out.extend_from_slice(b" HTTP/1.1\r\n");
                for h in request.headers.iter() {
                    if h.name.eq_ignore_ascii_case("authorization") || h.name.eq_ignore_ascii_case("openai-project") {
                        continue;
                    }
                    out.extend_from_slice(h.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"authorization: ");
                out.extend_from_slice(&floor.authorization);
                out.extend_from_slice(b"\r\nopenai-project: ");
                out.extend_from_slice(&floor.project);
                out.extend_from_slice(b"\r\n\r\n");
                break (n, body_len);
            }
            let want = inbuf.len() + 1;
            if !fill(&mut caller, &mut inbuf, want).await? {
                return Ok(());
            }
        };
        if !fill(&mut caller, &mut inbuf, head_len + body_len).await? {
            return Ok(());
        }
        out.extend_from_slice(&inbuf[head_len..head_len + body_len]);
        inbuf.drain(..head_len + body_len);
        upstream.write_all(&out).await?;
        // Upstream's response.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = response.parse(&upbuf)? {
                break (n, content_length(response.headers)?);
            }
            let want = upbuf.len() + 1;
            if !fill(&mut upstream, &mut upbuf, want).await? {
                anyhow::bail!("upstream closed");
            }
        };
        if !fill(&mut upstream, &mut upbuf, head_len + body_len).await? {
            anyhow::bail!("upstream closed");
        }
        caller.write_all(&upbuf[..head_len + body_len]).await?;
        upbuf.drain(..head_len + body_len);
    }
}
