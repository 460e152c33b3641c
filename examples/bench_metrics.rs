//! What recording one finished request in the metrics costs, on one traffic thread and on two at once.
//!
//! ```text
//! cargo run --release --example bench_metrics
//! ```
//!
//! Every traffic thread writes the same series for a project, route and model, so the cache lines holding
//! them move between cores on each request. This measures that in isolation: each thread records the same
//! request over and over (a worst case: in the gateway a thread records one every few tens of
//! microseconds), plain (counter and latency histograms) and metered (tokens and cost too). Prints the wall
//! time per recorded request on each thread; with two threads on two cores, any increase over one thread
//! is the cost of sharing. Numbers are in bench/README.md ("Fifth round").

use std::time::Instant;

use mantlegate::config::{Config, ProjectIdx};
use mantlegate::endpoint::Endpoint;
use mantlegate::metering::metrics::{Metrics, Observation};
use mantlegate::metering::usage::Usage;

const CONFIG: &str = r#"
[upstream]
base_url = "http://127.0.0.1:9"
auth = "passthrough"
[callers]
auth = "none"
[metering]
enabled = true
[[projects]]
name = "Bench"
id = "proj_bench"
"#;

const REQUESTS: u32 = 2_000_000;

fn main() -> anyhow::Result<()> {
    let metrics = Metrics::new(&Config::from_toml(CONFIG)?);
    let usage = Usage { input: 12, output: 16, cached_input: 0, reasoning: 0 };
    println!("| recorded request | 1 thread | 2 threads at once |");
    println!("|---|---|---|");
    for metered in [false, true] {
        let per_request = |threads: u32| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..REQUESTS {
                            metrics.observe(&Observation {
                                project: Some(ProjectIdx(0)),
                                endpoint: Endpoint::ChatCompletions,
                                status: 200,
                                duration: 0.0005,
                                ttfb: Some(0.0004),
                                model: metered.then_some("openai.gpt-oss-120b"),
                                usage: metered.then_some(usage),
                                unmetered: None,
                            });
                        }
                    });
                }
            });
            start.elapsed() / REQUESTS
        };
        let (one, two) = (per_request(1), per_request(2));
        let kind = if metered { "metered (tokens and cost too)" } else { "plain (counter, two histograms)" };
        println!("| {kind} | {one:?} | {two:?} |");
    }
    Ok(())
}
