//! The spend index against the ledger it reads and the report it must agree with.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

use super::*;
use crate::attribution::Source;
use crate::cli::usage;
use crate::endpoint::Endpoint;
use crate::metering::Unmetered;
use crate::metering::ledger::{Ledger, LedgerSink};
use crate::snapshot::Snapshot;
use crate::telemetry::Stamp;

const CONFIG: &str = r#"
    [callers]
    auth = "keys"
    [attribution]
    unattributed = "reroute"
    reroute_to = "Unattributed"
    [[projects]]
    name = "Chat"
    id = "proj_chat"
    tags = { Team = "chat", CostCenter = "CC-1" }
    [[projects]]
    name = "Search"
    id = "proj_search"
    tags = { Team = "search", CostCenter = "CC-2", "Odd \"Tag\"" = "x\\y" }
    [[projects]]
    name = "Unattributed"
    id = "proj_none"
    tags = { Team = "platform" }
    [[keys]]
    name = "chat-backend"
    sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
    project = "Chat"
    may_select = ["Search"]
    [[keys]]
    name = "search-batch"
    sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
    project = "Search"
    [[prices]]
    model = "m.priced"
    input = 0.15
    output = 0.6
    [[prices]]
    model = "m.dear"
    input = 5.5
    output = 33.0
"#;

/// 2026-12-15T12:00:00Z: the tests' "now".
fn now() -> SystemTime {
    humantime::parse_rfc3339("2026-12-15T12:00:00Z").expect("time")
}

fn hour(text: &str) -> u32 {
    hour_of_text(text).expect("time")
}

/// A fresh directory for the test `name`.
fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mantlegate-spend-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// The `i`th request of a scripted month: every project, key and model, days from November 30th to December
/// 15th, priced, unpriced, incomplete, unmetered, refused by a limit, rerouted and rejected ones.
fn record(snapshot: &Arc<Snapshot>, i: u64) -> Record {
    let project = |name: &str| snapshot.project(name).expect("project").clone();
    let (key, project, source) = match i % 5 {
        0 | 1 => (Some(snapshot.keys[0].clone()), Some(project("Chat")), Source::Key),
        2 => (Some(snapshot.keys[0].clone()), Some(project("Search")), Source::Header),
        3 => (Some(snapshot.keys[1].clone()), Some(project("Search")), Source::Key),
        _ if i % 10 == 4 => (None, Some(project("Unattributed")), Source::Rerouted),
        _ => (None, None, Source::Key),
    };
    let model = ["m.priced", "m.dear", "m.unpriced"][(i % 3) as usize];
    let usage = Usage { input: 1000 + i * 7, output: 100 + i % 13, cached_input: i % 4 * 10, reasoning: i % 2 };
    let price = snapshot.prices.get(model);
    let refused = i.is_multiple_of(17);
    let rejected = project.is_none();
    let forwarded = !refused && !rejected;
    // Half-hours from November 30th 20:00 on, wrapping before "now".
    let at = humantime::parse_rfc3339("2026-11-30T20:00:00Z").expect("time")
        + Duration::from_secs((i * 1800 + i % 7 * 60) % (15 * 86_400));
    Record {
        snapshot: snapshot.clone(),
        request_id: http::HeaderValue::from_static("rid"),
        method: http::Method::POST,
        path: "/v1/chat/completions".into(),
        endpoint: Some(Endpoint::ChatCompletions),
        key,
        project: project.map(|p| (p, source)),
        model: (!i.is_multiple_of(11)).then(|| model.to_owned()),
        stream: i.is_multiple_of(2),
        status: if rejected {
            403
        } else if refused {
            429
        } else if i.is_multiple_of(23) {
            502
        } else {
            200
        },
        error: rejected.then(|| crate::error::GatewayError::ProjectRequired.code()),
        forwarded,
        hold: None,
        refused_by: refused.then(|| "project:Chat/usd_per_day".to_owned()),
        usage: forwarded.then_some(usage),
        cost: if forwarded && !i.is_multiple_of(11) { price.map(|p| p.cost(&usage)) } else { None },
        unmetered: i.is_multiple_of(19).then_some(Unmetered::NoUsage),
        complete: !i.is_multiple_of(9),
        incomplete_reason: None,
        duration: Duration::from_millis(5),
        ttfb: None,
        time: Stamp::new(at),
    }
}

/// A snapshot of [`CONFIG`] writing to a ledger at `path`, and the ledger's writer.
fn with_ledger(path: &Path) -> (Arc<Snapshot>, crate::metering::ledger::LedgerWriter) {
    let mut snapshot = crate::snapshot::tests::snapshot(CONFIG);
    let (ledger, writer) = Ledger::open(path, Counter::default()).expect("ledger");
    snapshot.ledger = Some(ledger);
    (Arc::new(snapshot), writer)
}

/// Waits until `spend` has read its ledger.
pub(crate) async fn ready(spend: &Spend) -> IndexState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match spend.state() {
            IndexState::Reading { .. } => {}
            done => return done,
        }
        assert!(Instant::now() < deadline, "the ledger was never read");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn took_ms(state: &IndexState) -> u64 {
    match state {
        IndexState::Ready { took_ms, .. } => *took_ms,
        other => panic!("not read: {other:?}"),
    }
}

const GROUPINGS: [&str; 6] = ["project", "model", "key", "Team", "CostCenter", "Odd \"Tag\""];

fn group_by(name: &str) -> GroupBy {
    usage::GroupBy::parse(name)
}

#[tokio::test]
async fn what_is_read_at_start_and_what_ends_after_add_up_to_the_ledger_and_its_report() {
    let dir = dir("incremental");
    let path = dir.join("usage.jsonl");
    let month = Hours { since: hour("2026-12-01T00:00:00Z"), until: None };

    // Before the start: the first 300 requests, in the ledger only.
    let (snapshot, writer) = with_ledger(&path);
    for i in 0..300 {
        LedgerSink.record(&record(&snapshot, i));
    }
    drop(snapshot);
    writer.finish(Duration::from_secs(10)).await;

    // The start reads them while 300 more end, written to the ledger and added to the index as they do.
    let (snapshot, writer) = with_ledger(&path);
    let spend = Spend::start(Some(&path), now());
    for i in 300..600 {
        let r = record(&snapshot, i);
        LedgerSink.record(&r);
        spend.record(&r);
    }
    drop(snapshot);
    writer.finish(Duration::from_secs(10)).await;
    // Only requests with a project leave a line (a limit's refusal among them).
    let lines = |range: std::ops::Range<u64>| {
        let snapshot = Arc::new(crate::snapshot::tests::snapshot(CONFIG));
        range.filter(|&i| record(&snapshot, i).project.is_some()).count() as u64
    };
    let state = ready(&spend).await;
    assert_eq!(state, IndexState::Ready { lines: lines(0..300), skipped: 0, took_ms: took_ms(&state) });

    // The same ledger read whole at a later start, and `usage report` over it.
    let reread = Spend::start(Some(&path), now());
    let state = ready(&reread).await;
    assert_eq!(state, IndexState::Ready { lines: lines(0..600), skipped: 0, took_ms: took_ms(&state) });
    let text = std::fs::read_to_string(&path).expect("ledger");
    let since = humantime::parse_rfc3339("2026-12-01T00:00:00Z").ok();
    for name in GROUPINGS {
        let (rows, total) = spend.rows(&group_by(name), month, now());
        assert_eq!((rows.clone(), total.clone()), reread.rows(&group_by(name), month, now()), "{name}");
        let (report, skipped) = usage::aggregate(text.lines().map(str::to_owned), &group_by(name), since, None);
        assert_eq!(skipped, 0);
        assert_eq!(rows.len(), report.len(), "{name}");
        for (row, want) in rows.iter().zip(&report) {
            assert!((row.cost_usd - want.cost_usd).abs() < 1e-9, "{name}: {row:?} {want:?}");
            assert_eq!(Row { cost_usd: 0.0, ..row.clone() }, Row { cost_usd: 0.0, ..want.clone() }, "{name}");
        }
        assert_eq!(total.requests, report.iter().map(|r| r.requests).sum::<u64>());
    }
    // Every kind of request is there to be counted.
    let (rows, total) = spend.rows(&GroupBy::Project, month, now());
    let mut projects: Vec<&str> = rows.iter().map(|r| r.group.as_str()).collect();
    projects.sort_unstable();
    assert_eq!(projects, ["Chat", "Search", "Unattributed"]);
    assert!(total.unpriced_requests > 0 && total.incomplete_requests > 0 && total.unmetered_requests > 0, "{total:?}");
    let model_rows = spend.rows(&GroupBy::Model, month, now()).0;
    assert!(model_rows.iter().any(|r| r.group == "(unknown)"));
    let key_rows = spend.rows(&GroupBy::Key, month, now()).0;
    assert!(key_rows.iter().any(|r| r.group == "(no key)"));
    let odd = spend.rows(&group_by("Odd \"Tag\""), month, now()).0;
    assert_eq!(odd.len(), 2, "{odd:?}");
    assert!(odd.iter().any(|r| r.group == "x\\y") && odd.iter().any(|r| r.group == "(untagged)"), "{odd:?}");

    // The days add up to the month, and each day is its own range.
    let december = Hours { since: month.since, until: Some(hour("2027-01-01T00:00:00Z")) };
    let days = spend.daily(december, now());
    assert_eq!(days.len(), 31);
    assert_eq!((days[0].day.as_str(), days[30].day.as_str()), ("2026-12-01", "2026-12-31"));
    assert_eq!(days.iter().map(|d| d.requests).sum::<u64>(), total.requests);
    assert!((days.iter().map(|d| d.cost_usd).sum::<f64>() - total.cost_usd).abs() < 1e-9);
    let third = Hours { since: hour("2026-12-03T00:00:00Z"), until: Some(hour("2026-12-04T00:00:00Z")) };
    assert_eq!(spend.rows(&GroupBy::Project, third, now()).1.requests, days[2].requests);
    assert!(days[2].requests > 0 && days[20].requests == 0);

    // Requests nothing attributed, from the records (the ledger has the rerouted under their project only).
    let (since_start, _) = spend.unattributed(now());
    let live: Vec<Record> =
        (300..600).map(|i| record(&Arc::new(crate::snapshot::tests::snapshot(CONFIG)), i)).collect();
    let rerouted = live.iter().filter(|r| matches!(r.project, Some((_, Source::Rerouted)))).count() as u64;
    let rejected = live.iter().filter(|r| r.project.is_none()).count() as u64;
    assert_eq!(since_start, Unattributed { rejected, rerouted });
    assert!(rejected > 0 && rerouted > 0);
    let answered = spend.answered();
    assert_eq!(answered.requests, 300);
    assert_eq!(answered.client_errors, live.iter().filter(|r| (400..500).contains(&r.status)).count() as u64);
    assert_eq!(answered.server_errors, live.iter().filter(|r| r.status >= 500).count() as u64);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn lines_of_other_months_refusals_and_torn_lines_are_left_out_and_rotated_files_read() {
    let dir = dir("files");
    let path = dir.join("usage.jsonl");
    let line = |time: &str, project: &str, cost: &str, extra: &str| {
        format!(
            r#"{{"time":"{time}","key":"k","project":"{project}","tags":{{"Team":"t"}},"model":"m","input_tokens":10,"output_tokens":5,"cost_usd":{cost},"complete":true{extra}}}"#
        ) + "\n"
    };
    // Rotated: a file of October (not even opened), November 30th (a line of December 1st that the day's last
    // batch took), December 1st; then the file in force with a refusal, a torn line, a blank line and a line whose
    // time cannot be read.
    std::fs::write(dir.join("usage.2026-10-31.jsonl"), "not even read\n").expect("write");
    std::fs::write(
        dir.join("usage.2026-11-30.jsonl"),
        line("2026-11-30T10:00:00Z", "A", "1.0", "") + &line("2026-12-01T00:00:00.004Z", "A", "0.25", ""),
    )
    .expect("write");
    std::fs::write(dir.join("usage.2026-12-01.jsonl"), line("2026-12-01T10:00:00Z", "B", "0.5", "")).expect("write");
    let current = line("2026-12-15T09:00:00Z", "A", "0.125", "")
        + &line("2026-12-15T09:00:00Z", "A", "9.0", r#","refused_by":"project:A/usd_per_day""#)
        + "{\"time\":\"2026-12-15T0"
        + "\n\n"
        + &line("yesterday", "A", "1.0", "")
        + &line("2026-12-15T10:00:00Z", "A", "null", r#","unmetered":"encoded""#);
    std::fs::write(&path, current).expect("write");
    let spend = Spend::start(Some(&path), now());
    // Appended after the start: not the index's to read (the index adds such lines as their requests end).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line("2026-12-15T11:00:00Z", "A", "5.0", "").as_bytes()))
        .expect("append");
    // Nine lines read: two rotated on November 30th, one on December 1st, six in force (a blank one among them).
    let state = ready(&spend).await;
    assert!(matches!(state, IndexState::Ready { lines: 9, skipped: 2, .. }), "{state:?}");
    let month = Hours { since: spend.first_hour(now()), until: None };
    let (rows, total) = spend.rows(&GroupBy::Project, month, now());
    let costs: Vec<(&str, u64, f64)> = rows.iter().map(|r| (r.group.as_str(), r.requests, r.cost_usd)).collect();
    assert_eq!(costs, [("B", 1, 0.5), ("A", 3, 0.375)]);
    assert_eq!((total.requests, total.cost_usd, total.unmetered_requests, total.unpriced_requests), (4, 0.875, 1, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_a_ledger_there_is_nothing_to_read_and_a_ledger_in_a_device_is_not_read_back() {
    assert_eq!(Spend::start(None, now()).state(), IndexState::NoLedger);
    let spend = Spend::start(Some(Path::new("/dev/null")), now());
    assert!(matches!(ready(&spend).await, IndexState::Ready { lines: 0, .. }));
}

#[test]
fn the_index_keeps_its_start_month_then_the_current_and_previous_months() {
    let spend = Spend::start(None, now());
    let at = |t: &str| humantime::parse_rfc3339(t).expect("time");
    assert_eq!(hour_text(spend.first_hour(now())), "2026-12-01T00:00:00Z");
    assert_eq!(hour_text(spend.first_hour(at("2027-01-20T00:00:00Z"))), "2026-12-01T00:00:00Z");
    assert_eq!(hour_text(spend.first_hour(at("2027-02-01T00:00:00Z"))), "2027-01-01T00:00:00Z");
    assert_eq!(hour_text(next_month(hour("2026-12-31T23:00:00Z"))), "2027-01-01T00:00:00Z");
    assert_eq!(picos(0.000_000_075), 75_000);
    assert_eq!((picos(f64::NAN), picos(-1.0)), (0, 0));
}

#[test]
fn model_names_past_the_bound_are_summed_as_other_models_and_unattributed_counts_outlive_their_month() {
    let dir = dir("models");
    let (snapshot, _writer) = with_ledger(&dir.join("usage.jsonl"));
    let spend = Spend::start(snapshot.ledger.as_ref().map(|l| l.path()), now());
    // Priced and forwarded, with made-up model names: the first MAX_MODELS are told apart, the rest are not.
    let made_up = MAX_MODELS + 5;
    for n in 0..made_up {
        let mut r = record(&snapshot, 1);
        r.time = Stamp::new(now());
        r.model = Some(format!("made.up-{n}"));
        spend.record(&r);
    }
    let (rows, total) = spend.rows(&GroupBy::Model, Hours { since: hour("2026-12-01T00:00:00Z"), until: None }, now());
    assert_eq!(rows.len(), MAX_MODELS + 1);
    let other = rows.iter().find(|r| r.group == OTHER_MODELS).expect("other models");
    assert_eq!((other.requests, total.requests), (5, made_up as u64));

    // Requests nothing attributed (rejected: record 9; rerouted: record 4) on December 15th, then January 1st:
    // today's count is the day's, the count since the start keeps December's after its month is pruned.
    for (i, at) in [(9, "2026-12-15T12:00:00Z"), (4, "2026-12-15T12:00:00Z"), (9, "2027-01-01T00:10:00Z")] {
        let mut r = record(&snapshot, i);
        r.time = Stamp::new(humantime::parse_rfc3339(at).expect("time"));
        spend.record(&r);
    }
    let february = humantime::parse_rfc3339("2027-02-01T00:10:00Z").expect("time");
    let mut r = record(&snapshot, 9);
    r.time = Stamp::new(february);
    spend.record(&r);
    let (since_start, today) = spend.unattributed(february);
    assert_eq!((since_start.rejected, since_start.rerouted), (3, 1));
    assert_eq!((today.rejected, today.rerouted), (1, 0));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn hours_that_ended_leave_the_traffic_threads_shards_and_still_count() {
    let dir = dir("fold");
    let (snapshot, _writer) = with_ledger(&dir.join("usage.jsonl"));
    let spend = Spend::start(snapshot.ledger.as_ref().map(|l| l.path()), now());
    let month = Hours { since: hour("2026-12-01T00:00:00Z"), until: None };
    let at = |t: &str| Stamp::new(humantime::parse_rfc3339(t).expect("time"));
    let mut r = record(&snapshot, 1);
    for t in ["2026-12-15T10:30:00Z", "2026-12-15T11:59:00Z", "2026-12-15T12:01:00Z"] {
        r.time = at(t);
        spend.record(&r);
    }
    assert_eq!(spend.rows(&GroupBy::Project, month, now()).1.requests, 3);
    // A query at 12:00 moved 10:00's and 11:00's sums out: the traffic thread's shard holds only 12:00's.
    let live_cells = || spend.live.iter().map(|shard| lock(shard).cells.len()).sum::<usize>();
    assert_eq!((live_cells(), lock(&spend.folded).cells.len()), (1, 2));
    // A request of an hour already moved, ending late, joins that hour's sums at the next query.
    r.time = at("2026-12-15T11:59:59Z");
    spend.record(&r);
    assert_eq!(spend.rows(&GroupBy::Project, month, now()).1.requests, 4);
    assert_eq!((live_cells(), lock(&spend.folded).cells.len()), (1, 2));
    let eleven = Hours { since: hour("2026-12-15T11:00:00Z"), until: Some(hour("2026-12-15T12:00:00Z")) };
    assert_eq!(spend.rows(&GroupBy::Project, eleven, now()).1.requests, 2);
    assert_eq!(
        spend.daily(Hours { since: hour("2026-12-15T00:00:00Z"), until: Some(hour("2026-12-16T00:00:00Z")) }, now())[0]
            .requests,
        4
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
