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
//! is the cost of sharing. Numbers are in bench/README.md ("Fifth round"). The last two rows are the spend
//! index's sink (`metering::spend`), which each thread adds to a shard of its own: a request's hour, project,
//! key and model found, and its sums added (see "The spend page").

use std::sync::Arc;
use std::time::{Duration, Instant};

use mantlegate::attribution::Source;
use mantlegate::config::Config;
use mantlegate::endpoint::Endpoint;
use mantlegate::metering::ledger::Ledger;
use mantlegate::metering::metrics::Metrics;
use mantlegate::metering::spend::Spend;
use mantlegate::metering::usage::Usage;
use mantlegate::proxy::Credential;
use mantlegate::record::{Record, Sink};
use mantlegate::snapshot::Snapshot;

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
    let metrics = Metrics::new();
    let mut snapshot = Snapshot::build(Config::from_toml(CONFIG)?, Credential::Passthrough, None, &metrics)
        .map_err(|problems| anyhow::anyhow!("{problems:?}"))?;
    // A ledger for the spend index to follow (nothing is written to it).
    let dir = std::env::temp_dir().join(format!("mantlegate-bench-metrics-{}", std::process::id()));
    let ledger_path = dir.join("usage.jsonl");
    let (ledger, _writer) = Ledger::open(&ledger_path, Default::default())?;
    snapshot.ledger = Some(ledger);
    let spend = Spend::start(Some(&ledger_path), std::time::SystemTime::now());
    let snapshot = Arc::new(snapshot);
    metrics.publish(&snapshot.projects, &snapshot.config.sha256);
    let project = snapshot.projects[0].clone();
    let usage = Usage { input: 12, output: 16, cached_input: 0, reasoning: 0 };
    println!("| recorded request | 1 thread | 2 threads at once |");
    println!("|---|---|---|");
    let rows: [(&str, bool, &dyn Sink); 4] = [
        ("plain (counter, two histograms)", false, &metrics),
        ("metered (tokens and cost too)", true, &metrics),
        ("spend index, a request without usage", false, &*spend),
        ("spend index, a metered request", true, &*spend),
    ];
    for (kind, metered, sink) in rows {
        let record = Record {
            snapshot: snapshot.clone(),
            request_id: http::HeaderValue::from_static("rid"),
            method: http::Method::POST,
            path: "/v1/chat/completions".into(),
            endpoint: Some(Endpoint::ChatCompletions),
            key: None,
            project: Some((project.clone(), Source::Key)),
            model: metered.then(|| "openai.gpt-oss-120b".to_owned()),
            stream: false,
            status: 200,
            error: None,
            forwarded: true,
            hold: None,
            refused_by: None,
            usage: metered.then_some(usage),
            cost: metered.then_some(0.0000114),
            unmetered: None,
            complete: true,
            incomplete_reason: None,
            duration: Duration::from_micros(500),
            ttfb: Some(Duration::from_micros(400)),
            time: mantlegate::telemetry::Stamp::new(std::time::SystemTime::now()),
        };
        let per_request = |threads: u32| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..REQUESTS {
                            sink.record(&record);
                        }
                    });
                }
            });
            start.elapsed() / REQUESTS
        };
        let (one, two) = (per_request(1), per_request(2));
        println!("| {kind} | {one:?} | {two:?} |");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
