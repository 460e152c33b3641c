//! Metering end to end: exact token and cost figures for each API and streaming mode, the usage chunk the
//! gateway asks for and hides, incomplete streams, the metrics text, the ledger, and the usage report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use serde_json::{Value, json};

const CHAT_USAGE: &str = r#"{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":200},"completion_tokens_details":{"reasoning_tokens":100}}"#;
/// openai.gpt-oss-120b at the configured prices: 800 x 0.15 + 200 x 0.015 + 500 x 0.60, per 1M.
const CHAT_COST: f64 = (800.0 * 0.15 + 200.0 * 0.015 + 500.0 * 0.60) / 1e6;
/// openai.gpt-5.4 at the default prices: 2000 x 2.75 + 1000 x 16.50, per 1M.
const RESPONSES_COST: f64 = (2000.0 * 2.75 + 1000.0 * 16.50) / 1e6;

fn sse(events: Vec<String>) -> Response {
    let stream =
        futures_util::stream::iter(events.into_iter().map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e))));
    ([(http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(stream)).into_response()
}

/// An upstream that answers like bedrock-mantle, with fixed usage figures.
async fn upstream() -> std::sync::Arc<Mock> {
    Mock::start(|seen| async move {
        let req: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
        let stream = req["stream"] == true;
        match seen.uri.path().trim_start_matches("/openai") {
            "/v1/chat/completions" if !stream => json_response(
                StatusCode::OK,
                Box::leak(
                    format!(r#"{{"id":"c","object":"chat.completion","model":"openai.gpt-oss-120b","choices":[],"usage":{CHAT_USAGE}}}"#)
                        .into_boxed_str(),
                ),
            ),
            "/v1/chat/completions" => {
                let with_usage = req["stream_options"]["include_usage"] == true;
                let null = if with_usage { r#","usage":null"# } else { "" };
                let mut events = vec![
                    format!("data: {{\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hi\"}}}}]{null}}}\n\n"),
                    format!("data: {{\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{null}}}\n\n"),
                ];
                if with_usage {
                    events.push(format!("data: {{\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[],\"usage\":{CHAT_USAGE}}}\n\n"));
                }
                if req["user"] != "cut-before-done" {
                    events.push("data: [DONE]\n\n".into());
                }
                sse(events)
            }
            "/v1/responses" => {
                let usage = r#"{"input_tokens":2000,"input_tokens_details":{"cached_tokens":0},"output_tokens":1000,"output_tokens_details":{"reasoning_tokens":400},"total_tokens":3000}"#;
                sse(vec![
                    "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"openai.gpt-5.4\",\"usage\":null}}\n\n".into(),
                    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n".into(),
                    format!("event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"openai.gpt-5.4\",\"usage\":{usage}}}}}\n\n"),
                ])
            }
            "/anthropic/v1/messages" => sse(vec![
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"anthropic.claude-sonnet-4-5\",\"usage\":{\"input_tokens\":300,\"output_tokens\":1}}}\n\n".into(),
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":40}}\n\n".into(),
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
            ]),
            _ => json_response(StatusCode::OK, r#"{"object":"list","data":[]}"#),
        }
    })
    .await
}

struct Metered {
    gw: Gw,
    ledger: std::path::PathBuf,
}

async fn start(name: &str, attribution: &'static str) -> Metered {
    start_with(name, upstream().await, attribution).await
}

/// A gateway with a ledger and a price override, in front of `mock`.
async fn start_with(name: &str, mock: std::sync::Arc<Mock>, attribution: &'static str) -> Metered {
    start_opts(name, mock, Opts { attribution, ..Opts::default() }).await
}

/// [`start_with`], with more options.
async fn start_opts(name: &str, mock: std::sync::Arc<Mock>, opts: Opts) -> Metered {
    let dir = std::env::temp_dir().join(format!("mantlegate-metering-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ledger = dir.join("usage.jsonl");
    let extra = format!(
        "\n[metering]\nledger_path = \"{}\"\n\n[[prices]]\nmodel = \"openai.gpt-oss-120b\"\ninput = 0.15\noutput = 0.60\ncached_input = 0.015\n",
        ledger.display()
    );
    let gw = Gw::start(mock, Opts { extra, ..opts }).await;
    Metered { gw, ledger }
}

impl Metered {
    /// Stops the gateway (which writes out the ledger) and reads the ledger back.
    async fn ledger(mut self) -> Vec<Value> {
        self.gw.running.take().unwrap().stop().await;
        std::fs::read_to_string(&self.ledger).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// Metrics text as `series -> value`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, value)| (series.to_owned(), value.parse().unwrap())))
        .collect()
}

fn assert_close(actual: f64, expected: f64) {
    assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
}

#[tokio::test]
async fn chat_json_usage_and_cost() {
    let m = start("chat-json", "").await;
    let res = m.gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap();
    let text = m
        .gw
        .metric_line(r#"mantlegate_tokens_total{project="Chat-Prod",model="openai.gpt-oss-120b",kind="input"} 1000"#)
        .await;
    let metrics = parse_metrics(&text);
    for (kind, n) in [("output", 500.0), ("cached_input", 200.0), ("reasoning", 100.0)] {
        assert_eq!(
            metrics[&format!(
                r#"mantlegate_tokens_total{{project="Chat-Prod",model="openai.gpt-oss-120b",kind="{kind}"}}"#
            )],
            n
        );
    }
    assert_close(metrics[r#"mantlegate_cost_usd_total{project="Chat-Prod",model="openai.gpt-oss-120b"}"#], CHAT_COST);
    assert_eq!(metrics[r#"mantlegate_requests_total{project="Chat-Prod",route="chat.completions",status="200"}"#], 1.0);
    assert_eq!(
        metrics[r#"mantlegate_request_duration_seconds_count{project="Chat-Prod",route="chat.completions"}"#],
        1.0
    );
    assert_eq!(
        metrics[r#"mantlegate_time_to_first_byte_seconds_count{project="Chat-Prod",route="chat.completions"}"#],
        1.0
    );

    let ledger = m.ledger().await;
    assert_eq!(ledger.len(), 1);
    let l = &ledger[0];
    assert_eq!(
        (l["project"].as_str(), l["project_id"].as_str(), l["key"].as_str()),
        (Some("Chat-Prod"), Some("proj_chat"), Some("chat-service"))
    );
    assert_eq!(l["tags"], json!({"Team": "chat"}));
    assert_eq!((l["route"].as_str(), l["model"].as_str()), (Some("chat.completions"), Some("openai.gpt-oss-120b")));
    assert_eq!(
        (l["stream"].as_bool(), l["status"].as_u64(), l["complete"].as_bool()),
        (Some(false), Some(200), Some(true))
    );
    let tokens: Vec<u64> = ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"]
        .iter()
        .map(|k| l[k].as_u64().unwrap())
        .collect();
    assert_eq!(tokens, [1000, 500, 200, 100]);
    assert_close(l["cost_usd"].as_f64().unwrap(), CHAT_COST);
    assert!(l["request_id"].as_str().unwrap().len() == 36 && l["time"].as_str().unwrap().ends_with('Z'));
    assert!(l.get("unmetered").is_none(), "{l}");
    assert!(!text.contains("mantlegate_unmetered_requests_total{"), "{text}");
}

#[tokio::test]
async fn a_trusted_callers_ledger_line_names_no_key() {
    let opts = Opts { callers: "none", keys: false, attribution: "default_project = \"Chat-Prod\"", ..Opts::default() };
    let m = start_opts("trusted", upstream().await, opts).await;
    let res = m.gw.post("/v1/chat/completions", "not-a-gateway-key").body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap();
    let ledger = m.ledger().await;
    let l = &ledger[0];
    assert_eq!(l.get("key"), Some(&Value::Null), "{l}");
    assert_eq!((l["project"].as_str(), l["route"].as_str()), (Some("Chat-Prod"), Some("chat.completions")));
    assert_eq!(l["input_tokens"].as_u64(), Some(1000));
}

#[tokio::test]
async fn chat_stream_is_metered_even_when_the_client_did_not_ask_for_usage() {
    let m = start("chat-inject", "").await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let res = m.gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap();
    let text = res.text().await.unwrap();
    // Exactly what the client would have seen without the gateway: no usage chunk, no usage fields.
    let expected = concat!(
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    assert_eq!(text, expected);
    let seen = m.gw.mock.next().await;
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "hi"}]));
    assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));

    let ledger = m.ledger().await;
    assert_eq!((ledger[0]["input_tokens"].as_u64(), ledger[0]["output_tokens"].as_u64()), (Some(1000), Some(500)));
    assert_eq!((ledger[0]["stream"].as_bool(), ledger[0]["complete"].as_bool()), (Some(true), Some(true)));
    assert_close(ledger[0]["cost_usd"].as_f64().unwrap(), CHAT_COST);
}

#[tokio::test]
async fn chat_stream_that_asked_for_usage_keeps_it() {
    let m = start("chat-asked", "").await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let text = m.gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#""choices":[],"usage":{"prompt_tokens":1000"#), "{text}");
    assert!(text.contains(r#""usage":null"#));
    assert_eq!(m.gw.mock.next().await.body, body.as_bytes(), "body forwarded untouched");
    assert_eq!(m.ledger().await[0]["output_tokens"].as_u64(), Some(500));
}

#[tokio::test]
async fn responses_and_messages_streams_are_metered() {
    let m = start("responses", "").await;
    let body = r#"{"model":"openai.gpt-5.4","stream":true,"input":"hi"}"#;
    let text = m.gw.post("/openai/v1/responses", CHAT_KEY).body(body).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("response.completed"));
    let res =
        m.gw.client
            .post(m.gw.url("/anthropic/v1/messages"))
            .header("x-api-key", CHAT_KEY)
            .body(r#"{"model":"anthropic.claude-sonnet-4-5","stream":true,"max_tokens":50,"messages":[]}"#)
            .send()
            .await
            .unwrap();
    assert!(res.text().await.unwrap().contains("message_stop"));

    let metrics = parse_metrics(
        &m.gw
            .metric_line(
                r#"mantlegate_unpriced_requests_total{project="Chat-Prod",model="anthropic.claude-sonnet-4-5"} 1"#,
            )
            .await,
    );
    assert_eq!(
        metrics[r#"mantlegate_tokens_total{project="Chat-Prod",model="anthropic.claude-sonnet-4-5",kind="input"}"#],
        300.0
    );
    assert_eq!(
        metrics[r#"mantlegate_tokens_total{project="Chat-Prod",model="anthropic.claude-sonnet-4-5",kind="output"}"#],
        40.0
    );
    assert!(
        !metrics.contains_key(r#"mantlegate_cost_usd_total{project="Chat-Prod",model="anthropic.claude-sonnet-4-5"}"#)
    );

    let ledger = m.ledger().await;
    let responses = ledger.iter().find(|l| l["route"] == "responses.create").unwrap();
    assert_eq!(responses["model"], "openai.gpt-5.4");
    let tokens: Vec<u64> = ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"]
        .iter()
        .map(|k| responses[k].as_u64().unwrap())
        .collect();
    assert_eq!(tokens, [2000, 1000, 0, 400]);
    assert_close(responses["cost_usd"].as_f64().unwrap(), RESPONSES_COST);
    assert_eq!(responses["complete"], true);
    let messages = ledger.iter().find(|l| l["route"] == "messages").unwrap();
    assert_eq!((messages["input_tokens"].as_u64(), messages["output_tokens"].as_u64()), (Some(300), Some(40)));
    assert_eq!(messages["cost_usd"], Value::Null);
}

#[tokio::test]
async fn a_response_with_no_body_is_complete_when_sent() {
    // hyper never polls the body of a 204: the request is complete with its head.
    let mock = Mock::start(|_| async { StatusCode::NO_CONTENT.into_response() }).await;
    let m = start_with("no-body", mock, "").await;
    let res = m.gw.client.delete(m.gw.url("/v1/responses/resp_1")).bearer_auth(CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let ledger = m.ledger().await;
    assert_eq!((ledger[0]["status"].as_u64(), ledger[0]["complete"].as_bool()), (Some(204), Some(true)), "{ledger:?}");
}

#[tokio::test]
async fn incomplete_streams_are_recorded_with_what_was_seen() {
    let m = start("incomplete", "").await;
    // Upstream ends the stream without [DONE].
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{"include_usage":true},"user":"cut-before-done","messages":[]}"#;
    let text = m.gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    let ledger = m.ledger().await;
    assert_eq!(ledger[0]["complete"], false);
    assert_eq!(ledger[0]["output_tokens"].as_u64(), Some(500));
    assert!(ledger[0].get("unmetered").is_none(), "its usage arrived: {}", ledger[0]);
}

#[tokio::test]
async fn a_stream_the_client_cut_is_recorded_as_incomplete() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let m = start_with("cut", mock, "").await;
    let gw = &m.gw;
    let res =
        gw.post("/v1/responses", CHAT_KEY).body(r#"{"model":"openai.gpt-5.4","stream":true}"#).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"openai.gpt-5.4\"}}\n\n")).await.unwrap();
    let mut stream = res.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    tokio::time::timeout(WAIT, script.dropped).await.unwrap().unwrap();
    let ledger = m.ledger().await;
    let line = &ledger[0];
    assert_eq!((line["complete"].as_bool(), line["model"].as_str()), (Some(false), Some("openai.gpt-5.4")));
    assert_eq!((line["input_tokens"].as_u64(), line["unmetered"].as_str()), (Some(0), Some("incomplete")));
}

#[tokio::test]
async fn a_stream_cut_when_the_shutdown_grace_runs_out_is_in_the_ledger() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let m = start_opts("grace", mock, Opts { grace: "300ms", ..Opts::default() }).await;
    let res =
        m.gw.post("/v1/responses", CHAT_KEY).body(r#"{"model":"openai.gpt-5.4","stream":true}"#).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"openai.gpt-5.4\"}}\n\n")).await.unwrap();
    let mut stream = res.bytes_stream();
    stream.next().await.unwrap().unwrap();
    // Upstream never ends the stream: the drain gives up after the grace, the connection is closed, and its
    // request's line reaches the ledger before the ledger closes.
    let stopping = std::time::Instant::now();
    let ledger = tokio::time::timeout(WAIT, m.ledger()).await.expect("the gateway did not stop after its grace");
    assert!(stopping.elapsed() >= Duration::from_millis(300));
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!((ledger[0]["complete"].as_bool(), ledger[0]["model"].as_str()), (Some(false), Some("openai.gpt-5.4")));
    drop(script);
}

#[tokio::test]
async fn unattributed_outcomes_and_project_info_are_exported() {
    let m = start("unattributed", "unattributed = \"reroute\"\nreroute_to = \"Unattributed\"").await;
    m.gw.get("/v1/models", FLOATING_KEY).send().await.unwrap();
    m.gw.get("/v1/models", FLOATING_KEY).send().await.unwrap();
    let text = m.gw.metric_line(r#"mantlegate_unattributed_total{outcome="rerouted"} 2"#).await;
    assert!(
        text.contains(r#"mantlegate_project_info{project="Chat-Prod",project_id="proj_chat",Team="chat"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mantlegate_project_info{project="Unattributed",project_id="proj_unattr",Team="platform"} 1"#)
    );
    assert!(!text.contains(CHAT_KEY) && !text.contains(FLOATING_KEY) && !text.contains(UPSTREAM_KEY));

    let rejecting = start("rejected", "").await;
    rejecting.gw.get("/v1/models", FLOATING_KEY).send().await.unwrap();
    rejecting.gw.get("/v1/models", "bad-key").send().await.unwrap();
    let text = rejecting.gw.metric_line(r#"mantlegate_unattributed_total{outcome="rejected"} 1"#).await;
    let metrics = parse_metrics(&text);
    assert_eq!(metrics[r#"mantlegate_requests_total{project="",route="models.list",status="403"}"#], 1.0);
    assert_eq!(metrics[r#"mantlegate_requests_total{project="",route="models.list",status="401"}"#], 1.0);
    // Gateway refusals are not billable: the ledger only holds what upstream served.
    assert!(rejecting.ledger().await.is_empty());
}

#[tokio::test]
async fn usage_report_sums_the_ledger_by_tag() {
    let m = start("report", "").await;
    for key in [CHAT_KEY, CHAT_KEY, SEARCH_KEY] {
        let body = if key == SEARCH_KEY { r#"{"model":"openai.gpt-oss-20b","messages":[]}"# } else { CHAT_BODY };
        m.gw.post("/v1/chat/completions", key).body(body).send().await.unwrap().bytes().await.unwrap();
    }
    let ledger_path = m.ledger.clone();
    assert_eq!(m.ledger().await.len(), 3);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mantlegate"))
        .args(["usage", "report", "--group-by", "Team", "--since", "1h", "--format", "json", "--ledger"])
        .arg(&ledger_path)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let chat = rows.iter().find(|r| r["group"] == "chat").unwrap();
    assert_eq!(
        (chat["requests"].as_u64(), chat["input_tokens"].as_u64(), chat["output_tokens"].as_u64()),
        (Some(2), Some(2000), Some(1000))
    );
    assert_close(chat["cost_usd"].as_f64().unwrap(), 2.0 * CHAT_COST);
    let search = rows.iter().find(|r| r["group"] == "search").unwrap();
    // The mock answers every chat request as gpt-oss-120b, so the search team's line is priced at that model.
    assert_eq!(search["requests"].as_u64(), Some(1));
    assert_eq!(rows[0]["group"], "chat", "most expensive first");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mantlegate"))
        .args(["usage", "report", "--group-by", "project", "--ledger"])
        .arg(&ledger_path)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.lines().any(|l| l.starts_with("Chat-Prod") && l.contains(" 2 ")), "{table}");
    assert!(table.contains("over 3 requests"), "{table}");
}

#[tokio::test]
async fn metered_endpoints_ask_upstream_for_identity_encoding() {
    let m = start("encoding", "").await;
    m.gw.post("/v1/chat/completions", CHAT_KEY)
        .header("accept-encoding", "gzip, br")
        .body(CHAT_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(m.gw.mock.next().await.header("accept-encoding"), Some("identity"));
    // Endpoints with nothing to meter keep the caller's preference.
    m.gw.get("/v1/models", CHAT_KEY).header("accept-encoding", "gzip, br").send().await.unwrap();
    assert_eq!(m.gw.mock.next().await.header("accept-encoding"), Some("gzip, br"));
}

#[tokio::test]
async fn an_encoded_response_passes_through_unmetered() {
    let gzipped: &'static [u8] = &[0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03];
    let mock = Mock::start(move |_| async move {
        ([(http::header::CONTENT_TYPE, "text/event-stream"), (http::header::CONTENT_ENCODING, "gzip")], gzipped)
            .into_response()
    })
    .await;
    let m = start_with("encoded", mock, "").await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[]}"#;
    let res = m.gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    // Untapped: the length upstream declared still holds (a rewriting tap would have dropped it).
    assert_eq!(res.headers()["content-length"], gzipped.len().to_string().as_str());
    assert_eq!(res.bytes().await.unwrap(), gzipped, "bytes the tap cannot read are not touched");
    // ...and the spend the gateway could not see is said, not silent.
    m.gw.metric_line(
        r#"mantlegate_unmetered_requests_total{project="Chat-Prod",route="chat.completions",reason="encoded"} 1"#,
    )
    .await;
    let ledger = m.ledger().await;
    assert_eq!((ledger[0]["unmetered"].as_str(), ledger[0]["input_tokens"].as_u64()), (Some("encoded"), Some(0)));
}

#[tokio::test]
async fn edge_answers_are_metered_or_marked_as_what_they_are() {
    let chat_json = format!(r#"{{"id":"c","object":"chat.completion","model":"m","choices":[],"usage":{CHAT_USAGE}}}"#);
    let mock = Mock::start(move |seen| {
        let chat_json = chat_json.clone();
        async move {
            match seen.header("x-case").unwrap_or_default() {
                // Content codings are case-insensitive: this body is plain.
                "identity" => (
                    [(http::header::CONTENT_ENCODING, "Identity")],
                    [(http::header::CONTENT_TYPE, "application/json")],
                    chat_json,
                )
                    .into_response(),
                "empty" => StatusCode::OK.into_response(),
                _ => StatusCode::IM_A_TEAPOT.into_response(),
            }
        }
    })
    .await;
    let m = start_with("edges", mock, "").await;
    for case in ["identity", "empty"] {
        let res =
            m.gw.post("/v1/chat/completions", CHAT_KEY).header("x-case", case).body(CHAT_BODY).send().await.unwrap();
        assert_eq!(res.status(), 200, "{case}");
        let body = res.bytes().await.unwrap();
        assert_eq!(body.is_empty(), case == "empty", "{case}");
    }
    let ledger = m.ledger().await;
    let seen: Vec<_> =
        ledger.iter().map(|l| (l["input_tokens"].as_u64(), l["complete"].as_bool(), l["unmetered"].as_str())).collect();
    assert_eq!(seen, [(Some(1000), Some(true), None), (Some(0), Some(true), Some("no_usage"))], "{ledger:?}");
}

/// An upstream written by hand (hyper only sends trailers to a peer that asked for them): it reads one request
/// and answers `head` then `body` as one chunk ending in trailers, then holds the connection open, so that the
/// body's end is the trailers' doing.
async fn chunked_with_trailers(head: &'static str, body: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = upstream.accept().await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let request = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize =
            request.lines().find_map(|l| l.strip_prefix("content-length:")).unwrap().trim().parse().unwrap();
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\n{head}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-checksum: 1\r\n\r\n",
            body.len()
        );
        conn.write_all(response.as_bytes()).await.unwrap();
        let _ = conn.read(&mut [0u8; 1]).await;
    });
    addr
}

#[tokio::test]
async fn a_body_that_ends_in_trailers_is_metered() {
    let json = format!(r#"{{"id":"c","object":"chat.completion","model":"m","choices":[],"usage":{CHAT_USAGE}}}"#);
    let addr = chunked_with_trailers("content-type: application/json", json).await;
    let m = start_opts("trailers", Mock::ok_json().await, Opts { upstream_addr: Some(addr), ..Opts::default() }).await;
    let res = m.gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("\"usage\""));
    let ledger = m.ledger().await;
    let l = &ledger[0];
    assert_eq!(
        (l["input_tokens"].as_u64(), l["complete"].as_bool(), l.get("unmetered")),
        (Some(1000), Some(true), None),
        "{l}"
    );
}

#[tokio::test]
async fn an_event_held_back_when_trailers_end_the_stream_still_reaches_the_caller() {
    // The gateway asked for usage on the caller's behalf, so it holds each event until its blank line; this
    // stream's last event never gets one before the trailers.
    let events = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\ndata: {{\"choices\":[],\"usage\":{CHAT_USAGE}}}\n\ndata: [DONE]"
    );
    let addr = chunked_with_trailers("content-type: text/event-stream", events).await;
    let m =
        start_opts("trailers-sse", Mock::ok_json().await, Opts { upstream_addr: Some(addr), ..Opts::default() }).await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[]}"#;
    let res = m.gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap();
    assert_eq!(
        res.text().await.unwrap(),
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]",
        "the usage chunk hidden, the held-back end passed on"
    );
    let ledger = m.ledger().await;
    assert_eq!(ledger[0]["input_tokens"].as_u64(), Some(1000), "{}", ledger[0]);
}

#[tokio::test]
async fn an_anthropic_stream_cut_before_its_final_count_is_marked_incomplete_with_what_was_seen() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let m = start_with("anthropic-cut", mock, "").await;
    let res =
        m.gw.post("/anthropic/v1/messages", CHAT_KEY)
            .body(r#"{"model":"anthropic.claude-sonnet-4-5","stream":true,"messages":[]}"#)
            .send()
            .await
            .unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"anthropic.claude-sonnet-4-5\",\"usage\":{\"input_tokens\":300,\"output_tokens\":1}}}\n\n")).await.unwrap();
    // Upstream ends the body there: no message_delta with the final output count, no message_stop.
    drop(script);
    res.bytes().await.unwrap();
    let ledger = m.ledger().await;
    let l = &ledger[0];
    assert_eq!(
        (l["input_tokens"].as_u64(), l["complete"].as_bool(), l["unmetered"].as_str()),
        (Some(300), Some(false), Some("incomplete")),
        "{l}"
    );
}

#[tokio::test]
async fn answers_that_bill_tokens_but_name_no_usage_are_marked_unmetered() {
    let mock = Mock::start(|seen| async move {
        match seen.uri.path().trim_start_matches("/openai") {
            "/v1/chat/completions" => {
                json_response(StatusCode::OK, r#"{"id":"c","object":"chat.completion","model":"m","choices":[]}"#)
            }
            // A background Response: queued, its usage not known yet.
            "/v1/responses" => json_response(
                StatusCode::OK,
                r#"{"id":"resp_1","object":"response","status":"queued","model":"openai.gpt-5.4","usage":null}"#,
            ),
            "/anthropic/v1/messages" => json_response(StatusCode::TOO_MANY_REQUESTS, r#"{"type":"error"}"#),
            _ => json_response(StatusCode::OK, r#"{"object":"list","data":[]}"#),
        }
    })
    .await;
    let m = start_with("no-usage", mock, "").await;
    let gw = &m.gw;
    for res in [
        gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap(),
        gw.post("/v1/responses", CHAT_KEY)
            .body(r#"{"model":"openai.gpt-5.4","background":true}"#)
            .send()
            .await
            .unwrap(),
        gw.post("/anthropic/v1/messages", CHAT_KEY).body(r#"{"model":"m","messages":[]}"#).send().await.unwrap(),
        gw.get("/v1/models", CHAT_KEY).send().await.unwrap(),
    ] {
        res.bytes().await.unwrap();
    }
    let text = gw
        .metric_line(
            r#"mantlegate_unmetered_requests_total{project="Chat-Prod",route="responses.create",reason="no_usage"} 1"#,
        )
        .await;
    let metrics = parse_metrics(&text);
    let unmetered: Vec<_> = metrics.keys().filter(|k| k.starts_with("mantlegate_unmetered_requests_total{")).collect();
    assert_eq!(unmetered.len(), 2, "only the two answers that bill tokens: {unmetered:?}");
    assert_eq!(
        metrics[r#"mantlegate_unmetered_requests_total{project="Chat-Prod",route="chat.completions",reason="no_usage"}"#],
        1.0
    );
    let ledger = m.ledger().await;
    let reasons: Vec<_> = ledger.iter().map(|l| (l["route"].as_str(), l["unmetered"].as_str())).collect();
    assert_eq!(
        reasons,
        [
            (Some("chat.completions"), Some("no_usage")),
            (Some("responses.create"), Some("no_usage")),
            // An error answer bills nothing, and listing models never does.
            (Some("messages"), None),
            (Some("models.list"), None),
        ]
    );
}

#[tokio::test]
async fn a_stream_ended_at_its_end_marker_keeps_its_upstream_connection() {
    // The gateway ends a metered stream at `[DONE]`, before hyper has read the end of the body that follows
    // it; when that end has arrived with `[DONE]` (upstream wrote them together, as this mock does), the
    // connection must still go back to the pool. (An end that arrives later is not waited for: the
    // connection is closed, as hyper-util's client did.)
    let mock = Mock::start(|_| async {
        let events = ["data: {\"choices\":[],\"usage\":null}\n\n".to_owned(), "data: [DONE]\n\n".to_owned()];
        let stream = futures_util::stream::iter(events.map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e))));
        ([(http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(stream)).into_response()
    })
    .await;
    let m = start_opts("keepalive", mock.clone(), Opts { server: "workers = 1", ..Opts::default() }).await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[]}"#;
    for _ in 0..3 {
        let res = m.gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap();
        assert!(res.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
    assert_eq!((mock.hits(), mock.connections()), (3, 1));
}

#[tokio::test]
async fn a_stream_held_open_after_its_end_marker_is_ended() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let m = start_with("open", mock, "").await;
    let gw = &m.gw;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    for event in [
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n".to_owned(),
        format!("data: {{\"choices\":[],\"usage\":{CHAT_USAGE}}}\n\n"),
        "data: [DONE]\n\n".to_owned(),
    ] {
        script.tx.send(Bytes::from(event)).await.unwrap();
    }
    // Upstream keeps the stream open (script.tx is still alive); the client still gets a clean end.
    let text = tokio::time::timeout(WAIT, res.text()).await.expect("stream never ended").unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    tokio::time::timeout(WAIT, script.dropped).await.expect("upstream still attached").unwrap();
    let ledger = m.ledger().await;
    let line = &ledger[0];
    assert_eq!((line["complete"].as_bool(), line["output_tokens"].as_u64()), (Some(true), Some(500)));
    drop(script.tx);
}
