//! Limits and budgets on the memory backend, in process: refusals the SDKs understand, reservations replaced by
//! what requests used, budgets that see the month so far, and `limits status`. (The Redis backend, several
//! replicas and faults: tests/limits_redis.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
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
    let l =
        start("rpm", upstream().await, "[[limits.rules]]\nproject = \"Chat-Prod\"\nrequests_per_minute = 2\n").await;
    // A minute boundary between the requests would start a new window: begin early in one.
    wait_for_minute_start().await;
    for _ in 0..2 {
        assert_eq!(l.send(CHAT_KEY, &chat(Some(10))).await.status(), StatusCode::OK);
    }
    let refused = l.send(CHAT_KEY, &chat(Some(10))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = |name: &str| refused.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let retry: u64 = h("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(h("x-ratelimit-limit-requests").as_deref(), Some("2"));
    assert_eq!(h("x-ratelimit-remaining-requests").as_deref(), Some("0"));
    assert!(h("x-ratelimit-reset-requests").unwrap().ends_with('s'));
    assert_eq!(h("x-should-retry"), None, "a rate limit is worth retrying later");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("project:Chat-Prod") && message.contains("requests_per_minute"), "{message}");
    // Another project is not limited by Chat-Prod's rule.
    assert_eq!(l.send(SEARCH_KEY, &json!({"model": "openai.gpt-oss-20b"})).await.status(), StatusCode::OK);
    assert_eq!(l.gw.mock.hits(), 3);
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

/// Waits until the current UTC minute has at least 20 s left.
async fn wait_for_minute_start() {
    let left = 60 - (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60);
    if left < 20 {
        tokio::time::sleep(Duration::from_secs(left)).await;
    }
}
