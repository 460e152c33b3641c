//! The spend index alone on a whole month of ledger: how long reading it takes, and what each query the spend
//! page makes costs, at a moment chosen by the caller (so that a month's every hour can be in the index whatever
//! today's date is). `bench/spend.py` writes the ledger and runs this; numbers are in bench/README.md.
//!
//! ```text
//! cargo run --release --example bench_spend -- LEDGER NOW [ROUNDS]
//! ```

use std::time::{Duration, Instant, SystemTime};

use mantlegate::cli::usage::GroupBy;
use mantlegate::metering::spend::{Hours, IndexState, Spend};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(ledger), Some(now)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: bench_spend LEDGER NOW [ROUNDS]");
    };
    let now: SystemTime = humantime::parse_rfc3339(now)?;
    let rounds: usize = args.get(3).map_or(Ok(30), |r| r.parse())?;

    let began = Instant::now();
    let spend = Spend::start(Some(std::path::Path::new(ledger)), now);
    let deadline = began + Duration::from_secs(600);
    let state = loop {
        match spend.state() {
            IndexState::Reading { .. } if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            state => break state,
        }
    };
    let IndexState::Ready { lines, skipped, took_ms } = state else { anyhow::bail!("not read: {state:?}") };
    let (rss, peak) = memory();
    println!("read: {lines} lines ({skipped} skipped) in {took_ms} ms; {rss} resident, {peak} peak");

    let month = Hours { since: spend.first_hour(now), until: None };
    let days = Hours { since: month.since, until: Some(month.since + 31 * 24) };
    let last_day = Hours { since: hour(now) / 24 * 24, until: None };
    println!("| query ({rounds} in a row) | groups | p50 ms | max ms |\n|---|---|---|---|");
    for (title, group_by, hours) in [
        ("month by project", GroupBy::Project, month),
        ("month by tag:Team", GroupBy::Tag("Team".into()), month),
        ("month by model", GroupBy::Model, month),
        ("month by key", GroupBy::Key, month),
        ("last day by tag:Team", GroupBy::Tag("Team".into()), last_day),
    ] {
        let mut groups = 0;
        let times = timed(rounds, || groups = spend.rows(&group_by, hours, now).0.len());
        println!("| {title} | {groups} | {} |", summary(times));
    }
    let mut bars = 0;
    let times = timed(rounds, || bars = spend.daily(days, now).len());
    println!("| the daily series | {bars} days | {} |", summary(times));
    Ok(())
}

fn hour(time: SystemTime) -> u32 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| (d.as_secs() / 3600) as u32)
}

fn timed(rounds: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..rounds)
        .map(|_| {
            let began = Instant::now();
            f();
            began.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!("{:.2} | {:.2}", ms[ms.len() / 2], ms[ms.len() - 1])
}

/// This process's resident and peak resident memory.
fn memory() -> (String, String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map_or("?".into(), |v| {
            let kib: f64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0.0);
            format!("{:.0} MiB", kib / 1024.0)
        })
    };
    (field("VmRSS:"), field("VmHWM:"))
}
