//! A fast OpenAI-compatible upstream for benchmarks: the demo stub with no delay between streamed events.
//! Usage: `bench_upstream ADDR API_KEY PROJECT_ID...`; prints `listening on ADDR` once bound.

use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let api_key = args.next().unwrap_or_else(|| "bench-upstream-key".into());
    let project_ids = args.collect();
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let stub = mantlegate::demo::stub::router(mantlegate::demo::stub::StubConfig {
        api_key,
        project_ids,
        event_delay: Duration::ZERO,
    });
    // Small SSE writes must leave at once, not wait on Nagle's algorithm for the previous one's ACK.
    axum::serve(axum::serve::ListenerExt::tap_io(listener, |tcp| drop(tcp.set_nodelay(true))), stub).await?;
    Ok(())
}
