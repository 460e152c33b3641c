//! Limits and budgets on the memory backend, in process: refusals the SDKs understand, reservations replaced by
//! what requests used, budgets that see the month so far, and `limits status`. (The Redis backend, several
//! replicas and faults: tests/limits_redis.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::response::IntoResponse;
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use mantlegate::limits::nanos;
use mantlegate::live::Outcome;
use serde_json::{Value, json};

/// 1000 input and 500 output tokens of openai.gpt-oss-120b, at $0.15 and $0.60 per 1M: $0.00045.
const USAGE: &str = r#"{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500}"#;
const COST: f64 = (1000.0 * 0.15 + 500.0 * 0.60) / 1e6;

/// An upstream that answers every chat request with [`USAGE`].
async fn upstream() -> std::sync::Arc<Mock> {
    Mock::start(|_seen| async move {
        json_response(
            StatusCode::OK,
            Box::leak(
                format!(r#"{{"id":"c","object":"chat.completion","model":"openai.gpt-oss-120b","choices":[],"usage":{USAGE}}}"#)
                    .into_boxed_str(),
            ),
        )
    })
    .await
}

struct Limited {
    gw: Gw,
    ledger: std::path::PathBuf,
}

/// A gateway with a ledger and `rules` (TOML `[[limits.rules]]` stanzas) in front of `mock`.
async fn start(name: &str, mock: std::sync::Arc<Mock>, limits: &str) -> Limited {
    let dir = std::env::temp_dir().join(format!("mantlegate-limits-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ledger = dir.join("usage.jsonl");
    let extra = format!("\n[metering]\nledger_path = \"{}\"\n{limits}\n", ledger.display());
    let gw = Gw::start(mock, Opts { extra, max_body_bytes: 1 << 20, ..Opts::default() }).await;
    Limited { gw, ledger }
}

fn chat(max_tokens: Option<u64>) -> Value {
    let mut body = json!({"model": "openai.gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}]});
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

impl Limited {
    async fn send(&self, key: &str, body: &Value) -> reqwest::Response {
        self.gw.post("/v1/chat/completions", key).json(body).send().await.unwrap()
    }

    async fn limits(&self) -> Value {
        let url = format!("http://{}/limits", self.gw.admin);
        self.gw.client.get(url).send().await.unwrap().json().await.unwrap()
    }

    fn used(limits: &Value, subject: &str, limit: &str) -> f64 {
        limits["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["subject"] == subject && l["limit"] == limit)
            .unwrap_or_else(|| panic!("no {subject}/{limit} in {limits}"))["used"]
            .as_f64()
            .unwrap()
    }
}

#[tokio::test]
async fn a_request_rate_limit_refuses_with_the_headers_openai_clients_read() {
    // The three requests must fall in one UTC minute: if a minute ends among them, start again (a fresh gateway,
    // so no count carries over).
    for attempt in 0.. {
        assert!(attempt < 3, "three minute boundaries in a row");
        let minute = utc_minute();
        let l = start(
            &format!("rpm-{attempt}"),
            upstream().await,
            "[[limits.rules]]\nproject = \"Chat-Prod\"\nrequests_per_minute = 2\n",
        )
        .await;
        let first =
            [l.send(CHAT_KEY, &chat(Some(10))).await.status(), l.send(CHAT_KEY, &chat(Some(10))).await.status()];
        let refused = l.send(CHAT_KEY, &chat(Some(10))).await;
        if utc_minute() != minute {
            continue;
        }
        assert_eq!(first, [StatusCode::OK, StatusCode::OK]);
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = |name: &str| refused.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
        let retry: u64 = h("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "retry-after {retry}");
        assert_eq!(h("x-ratelimit-limit-requests").as_deref(), Some("2"));
        assert_eq!(h("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        // Retry-After in seconds, and the same moment as OpenAI spells it (within a minute: `{s}s`).
        assert_eq!(h("x-ratelimit-reset-requests"), Some(format!("{retry}s")));
        assert_eq!(h("x-should-retry"), None, "a rate limit is worth retrying later");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("project:Chat-Prod") && message.contains("requests_per_minute"), "{message}");
        // Another project is not limited by Chat-Prod's rule.
        assert_eq!(l.send(SEARCH_KEY, &json!({"model": "openai.gpt-oss-20b"})).await.status(), StatusCode::OK);
        assert_eq!(l.gw.mock.hits(), 3);
        let metrics = l.gw.metric_prefix("mantlegate_limit_rejections_total{").await;
        assert!(
            metrics.contains(r#"project="Chat-Prod",subject="project:Chat-Prod",limit="requests_per_minute"} 1"#),
            "{metrics}"
        );
        return;
    }
}

#[tokio::test]
async fn a_request_larger_than_a_rate_limit_is_refused_as_too_large() {
    let l = start(
        "too-large",
        upstream().await,
        "[[limits.rules]]\nkey = \"chat-service\"\noutput_tokens_per_minute = 1000\n",
    )
    .await;
    let refused = l.send(CHAT_KEY, &chat(Some(5000))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers().get("x-should-retry").unwrap(), "false");
    assert_eq!(refused.headers().get("x-ratelimit-limit-tokens").unwrap(), "1000");
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("alone needs 5000"), "{body}");
    // Without a cap, the configured default (4096) is reserved: too large too.
    assert_eq!(l.send(CHAT_KEY, &chat(None)).await.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(l.send(CHAT_KEY, &chat(Some(600))).await.status(), StatusCode::OK);
    assert_eq!(l.gw.mock.hits(), 1);
}

#[tokio::test]
async fn a_spent_budget_refuses_with_insufficient_quota_and_tells_sdks_not_to_retry() {
    // Room for the first request's reservation (1 KB-ish input + 100 output), not for a second once it settles.
    let budget = COST * 1.5;
    let l = start(
        "budget",
        upstream().await,
        &format!("[[limits.rules]]\ntag = {{ Team = \"chat\" }}\nusd_per_day = {budget}\n"),
    )
    .await;
    assert_eq!(l.send(CHAT_KEY, &chat(Some(500))).await.status(), StatusCode::OK);
    let limits = l.limits().await;
    // The reservation was replaced by what the request used.
    assert!((Limited::used(&limits, "tag:Team=chat", "usd_per_day") - COST).abs() < 1e-9, "{limits}");
    let refused = l.send(CHAT_KEY, &chat(Some(500))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers().get("x-should-retry").unwrap(), "false");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("tag:Team=chat") && message.contains("usd_per_day"), "{message}");
    // The tag's other project shares the budget.
    let dev = l.gw.post("/v1/chat/completions", CHAT_KEY).header("openai-project", "Chat-Dev").json(&chat(Some(500)));
    assert_eq!(dev.send().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(l.gw.mock.hits(), 1);
    let _ = tokio::time::timeout(Duration::from_secs(10), l.gw.running.unwrap().stop()).await;
    let lines: Vec<Value> =
        std::fs::read_to_string(&l.ledger).unwrap().lines().map(|t| serde_json::from_str(t).unwrap()).collect();
    let refused: Vec<&Value> = lines.iter().filter(|v| v["refused_by"].is_string()).collect();
    assert_eq!(refused.len(), 2, "{lines:?}");
    assert_eq!(refused[0]["refused_by"], "tag:Team=chat/usd_per_day");
    assert_eq!(refused[0]["status"], 429);
}

#[tokio::test]
async fn a_stream_the_caller_leaves_before_its_usage_counts_its_reservation() {
    let (mock, mut scripts) = Mock::scripted().await;
    let l = start(
        "cut",
        mock,
        "[[limits.rules]]\nkey = \"chat-service\"\noutput_tokens_per_minute = 100000\nusd_per_month = 100\n",
    )
    .await;
    let mut body = chat(Some(5000));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = l.send(CHAT_KEY, &body).await;
    let script = scripts.recv().await.unwrap();
    // While it streams, its whole cap is held.
    let held = l.limits().await;
    assert_eq!(Limited::used(&held, "key:chat-service", "output_tokens_per_minute"), 5000.0);
    let reserved_usd = Limited::used(&held, "key:chat-service", "usd_per_month");
    assert!(reserved_usd > 0.0, "{held}");
    script.tx.send(r#"data: {"id":"c","model":"openai.gpt-oss-120b","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#.to_owned().into()).await.unwrap();
    script.tx.send("\n\n".into()).await.unwrap();
    let mut stream = response.bytes_stream();
    futures_util::StreamExt::next(&mut stream).await.unwrap().unwrap();
    drop(stream);
    script.dropped.await.unwrap();
    // Cut before its usage: AWS bills what it generated, which the gateway cannot know, so the worst case it
    // reserved counts (and the reservation itself is gone: nothing is held).
    l.gw.metric_line("mantlegate_limit_reservations_in_flight 0").await;
    let settled = l.limits().await;
    assert_eq!(Limited::used(&settled, "key:chat-service", "output_tokens_per_minute"), 5000.0);
    assert_eq!(Limited::used(&settled, "key:chat-service", "usd_per_month"), reserved_usd);
    let _ = tokio::time::timeout(Duration::from_secs(10), l.gw.running.unwrap().stop()).await;
    let lines: Vec<Value> =
        std::fs::read_to_string(&l.ledger).unwrap().lines().map(|t| serde_json::from_str(t).unwrap()).collect();
    assert_eq!(lines[0]["unmetered"], "incomplete", "{lines:?}");
}

#[tokio::test]
async fn a_budget_refuses_a_model_it_cannot_price() {
    let l =
        start("unpriced", upstream().await, "[[limits.rules]]\nproject = \"Chat-Prod\"\nusd_per_month = 100\n").await;
    let refused = l.send(CHAT_KEY, &json!({"model": "someone.unpriced-model", "max_tokens": 10})).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_priced");
    assert!(body["error"]["message"].as_str().unwrap().contains("project:Chat-Prod"), "{body}");
    // A project without a budget may use it.
    let free = l.gw.post("/v1/chat/completions", SEARCH_KEY).json(&json!({"model": "openai.gpt-oss-20b"}));
    assert_eq!(free.send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(l.gw.mock.hits(), 1);
}

#[tokio::test]
async fn a_restarted_gateway_and_a_reloaded_budget_both_see_the_spend_so_far() {
    let dir = std::env::temp_dir().join(format!("mantlegate-limits-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (config, ledger) = (dir.join("mantlegate.toml"), dir.join("usage.jsonl"));
    let metering = format!("\n[metering]\nledger_path = \"{}\"\n", ledger.display());
    // Spend is counted for every project and tag once any rule exists: here, a rule on another project.
    let first = format!("{metering}[[limits.rules]]\nproject = \"Search\"\nrequests_per_minute = 1000\n");
    let opts = |extra: String| Opts { extra, max_body_bytes: 1 << 20, ..Opts::default() };
    let mock = upstream().await;
    let gw = Gw::start_from_file(mock.clone(), opts(first), &config).await;
    for _ in 0..3 {
        let r = gw.post("/v1/chat/completions", CHAT_KEY).json(&chat(Some(600))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // A budget added by a reload counts the day so far.
    let budget = format!("{metering}[[limits.rules]]\nproject = \"Chat-Prod\"\nusd_per_day = 1\n");
    std::fs::write(&config, config_text(mock.addr, &opts(budget.clone()))).unwrap();
    // (The file watch may have put it in force already: then the reload finds it unchanged.)
    let outcome = gw.reload().await;
    assert!(matches!(outcome, Outcome::Applied { .. } | Outcome::Unchanged { .. }), "{outcome:?}");
    let url = format!("http://{}/limits", gw.admin);
    let limits: Value = gw.client.get(&url).send().await.unwrap().json().await.unwrap();
    assert!((Limited::used(&limits, "project:Chat-Prod", "usd_per_day") - 3.0 * COST).abs() < 1e-9, "{limits}");
    gw.running.unwrap().stop().await;
    // A new process starts from its ledger.
    let gw = Gw::start_from_file(mock, opts(budget), &config).await;
    let url = format!("http://{}/limits", gw.admin);
    let limits: Value = gw.client.get(&url).send().await.unwrap().json().await.unwrap();
    assert!((Limited::used(&limits, "project:Chat-Prod", "usd_per_day") - 3.0 * COST).abs() < 1e-9, "{limits}");
    // And its metrics say so.
    let metrics = gw.metric_prefix("mantlegate_limit_used{").await;
    assert!(metrics.contains(r#"subject="project:Chat-Prod""#), "{metrics}");
}

/// 20 input tokens, and half the output cap the request sets (so each settle gives back part of its reservation).
fn usage_of(body: &Value) -> (u64, u64) {
    (20, body["max_tokens"].as_u64().unwrap() / 2)
}

/// An upstream that answers JSON or a stream (as the request asks) after a few milliseconds, so that requests
/// overlap, with [`usage_of`] the request.
async fn concurrent_upstream() -> Arc<Mock> {
    Mock::start(|seen| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let body: Value = serde_json::from_slice(&seen.body).unwrap();
        let (input, output) = usage_of(&body);
        let model = body["model"].as_str().unwrap().to_owned();
        let usage = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output});
        if body["stream"] == true {
            let chunk = json!({"id": "c", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": "Hi"}}]});
            let last =
                json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage});
            let text = format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n");
            ([(http::header::CONTENT_TYPE, "text/event-stream")], text).into_response()
        } else {
            let text = json!({"id": "c", "object": "chat.completion", "model": model, "choices": [], "usage": usage});
            ([(http::header::CONTENT_TYPE, "application/json")], text.to_string()).into_response()
        }
    })
    .await
}

/// The chat team's day budget: 24 requests' worth at max_tokens 100 (20 in, 50 out of gpt-oss-120b: $0.000033
/// each), against 72 chat requests sent.
const TEAM_BUDGET_USD: f64 = 24.0 * (20.0 * 0.15 + 50.0 * 0.60) / 1e6;
/// Search's output tokens per minute: 8 requests of 50, against 36 sent.
const SEARCH_OUTPUT_PER_MINUTE: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_traffic_never_spends_past_a_budget_and_leaves_the_counts_equal_to_the_ledger() {
    let rules = format!(
        "[[limits.rules]]\ntag = {{ Team = \"chat\" }}\nusd_per_day = {TEAM_BUDGET_USD}\n\
         [[limits.rules]]\nproject = \"Search\"\noutput_tokens_per_minute = {SEARCH_OUTPUT_PER_MINUTE}\n"
    );
    let l = Arc::new(start("concurrent", concurrent_upstream().await, &rules).await);

    // Watches the team's day spend as the store has it (settled plus reserved) while the traffic runs: what the
    // gateway admitted never exceeds the budget, at any moment.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (l, watching) = (l.clone(), watching.clone());
        async move {
            let (mut highest, mut reads) = (0f64, 0u64);
            while watching.load(Ordering::SeqCst) {
                highest = highest.max(Limited::used(&l.limits().await, "tag:Team=chat", "usd_per_day"));
                reads += 1;
            }
            (highest, reads)
        }
    });

    // 108 requests, 24 at a time: Chat-Prod and Chat-Dev (sharing the team budget) and Search (its output
    // rate), JSON and streams, max_tokens 100 or 60 (Search always 100).
    let replies: Vec<(&str, StatusCode, Value)> = futures_util::stream::iter(0..108)
        .map(|i| {
            let l = l.clone();
            async move {
                let project = ["Chat-Prod", "Chat-Dev", "Search"][i % 3];
                let (model, max_tokens) = if project == "Search" {
                    ("openai.gpt-oss-20b", 100)
                } else {
                    ("openai.gpt-oss-120b", [100, 60][i / 3 % 2])
                };
                let mut body =
                    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]});
                if i % 2 == 0 {
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                }
                let key = if project == "Search" { SEARCH_KEY } else { CHAT_KEY };
                let mut req = l.gw.post("/v1/chat/completions", key).json(&body);
                if project == "Chat-Dev" {
                    req = req.header("openai-project", project);
                }
                let res = req.send().await.unwrap();
                let status = res.status();
                let text = res.text().await.unwrap();
                let error = if status == StatusCode::OK { Value::Null } else { serde_json::from_str(&text).unwrap() };
                (project, status, error)
            }
        })
        .buffer_unordered(24)
        .collect()
        .await;
    watching.store(false, Ordering::SeqCst);
    let (highest, reads) = watcher.await.unwrap();

    let mut by_code: BTreeMap<(&str, u16, String), usize> = BTreeMap::new();
    for (project, status, error) in &replies {
        let code = error["error"]["code"].as_str().unwrap_or_default().to_owned();
        match (*project, status.as_u16(), code.as_str()) {
            (_, 200, _)
            | ("Chat-Prod" | "Chat-Dev", 429, "insufficient_quota")
            | ("Search", 429, "rate_limit_exceeded") => {}
            other => panic!("unexpected answer {other:?}: {error}"),
        }
        *by_code.entry((*project, status.as_u16(), code)).or_default() += 1;
    }
    let count = |project: &str, status: u16| {
        by_code.iter().filter(|((p, s, _), _)| *p == project && *s == status).map(|(_, n)| n).sum::<usize>()
    };
    assert!(count("Chat-Prod", 429) + count("Chat-Dev", 429) > 0, "the budget refused nothing: {by_code:?}");
    assert!(count("Search", 429) > 0, "the rate limit refused nothing: {by_code:?}");
    assert!(reads > 10, "the watcher read the store {reads} times");
    let budget = nanos(TEAM_BUDGET_USD);
    assert!(
        nanos(highest) <= budget,
        "spend admitted at one moment (${highest}) exceeded the budget (${TEAM_BUDGET_USD})"
    );

    // Settled: nothing is held, and what the store counts is what the ledger says, to the nano-dollar.
    l.gw.metric_line("mantlegate_limit_reservations_in_flight 0").await;
    let counted = nanos(Limited::used(&l.limits().await, "tag:Team=chat", "usd_per_day"));
    let l = Arc::into_inner(l).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), l.gw.running.unwrap().stop()).await;
    let lines: Vec<Value> =
        std::fs::read_to_string(&l.ledger).unwrap().lines().map(|t| serde_json::from_str(t).unwrap()).collect();
    let forwarded: Vec<&Value> = lines.iter().filter(|v| v["refused_by"].is_null()).collect();
    assert_eq!(forwarded.len(), count("Chat-Prod", 200) + count("Chat-Dev", 200) + count("Search", 200));
    let mut spend_by_day: BTreeMap<&str, u64> = BTreeMap::new();
    let mut search_output_by_minute: BTreeMap<&str, u64> = BTreeMap::new();
    for line in &forwarded {
        let time = line["time"].as_str().unwrap();
        assert!(line["complete"] == true && line["unmetered"].is_null(), "{line}");
        if line["tags"]["Team"] == "chat" {
            *spend_by_day.entry(&time[..10]).or_default() += nanos(line["cost_usd"].as_f64().unwrap());
        } else {
            *search_output_by_minute.entry(&time[..16]).or_default() += line["output_tokens"].as_u64().unwrap();
        }
    }
    for (day, spent) in &spend_by_day {
        assert!(*spent <= budget, "{day}: the chat team spent {spent} nano-USD of {budget}");
    }
    // More than half of it: the refusals were the budget's, not a count run away.
    let today = *spend_by_day.values().last().unwrap();
    assert!(today > budget / 2, "the chat team spent only {today} nano-USD of {budget}");
    assert_eq!(counted, today, "the store's count against the ledger's sum today");
    for (minute, output) in &search_output_by_minute {
        assert!(*output <= SEARCH_OUTPUT_PER_MINUTE, "{minute}: Search used {output} output tokens");
    }
}

/// Minutes since the epoch, as limits count them.
fn utc_minute() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 60
}
