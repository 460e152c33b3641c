//! A small OpenAI- and Anthropic-compatible upstream for `mantlegate demo`: it answers every inference
//! endpoint the gateway forwards, streams word by word, and says in its answer which project and which
//! credential the request arrived with, so the demo shows attribution at work. Like bedrock-mantle, it
//! refuses a wrong credential (401) and an unknown project (404).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

/// What the stub accepts.
#[derive(Debug, Clone)]
pub struct StubConfig {
    /// The Bearer token it expects (the gateway's upstream credential).
    pub api_key: String,
    /// Project ids it knows; anything else is 404, and no project is the `default` project.
    pub project_ids: HashSet<String>,
    /// Pause between streamed events.
    pub event_delay: Duration,
}

const MODELS: [&str; 5] =
    ["openai.gpt-oss-120b", "openai.gpt-oss-20b", "openai.gpt-5.4", "openai.gpt-5.5", "anthropic.claude-sonnet-4-5"];

/// The stub's router.
pub fn router(config: StubConfig) -> Router {
    let api = Router::new()
        .route("/chat/completions", post(chat))
        .route("/responses", post(responses_create))
        .route("/responses/{id}", get(responses_get).delete(responses_delete))
        .route("/responses/{id}/cancel", post(responses_cancel))
        .route("/models", get(models));
    Router::new()
        .nest("/v1", api.clone())
        .nest("/openai/v1", api)
        .route("/anthropic/v1/messages", post(messages))
        .with_state(Arc::new(config))
}

type Stub = State<Arc<StubConfig>>;

/// An error the stub answers with, OpenAI-shaped like bedrock-mantle's.
struct StubError(StatusCode, &'static str, String);

impl IntoResponse for StubError {
    fn into_response(self) -> Response {
        let Self(status, code, message) = self;
        let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
        (status, axum::Json(body)).into_response()
    }
}

/// Checks the credential and the project header as bedrock-mantle would; returns the project id.
fn admit(stub: &StubConfig, headers: &HeaderMap, project_header: &str) -> Result<String, StubError> {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(stub.api_key.as_str()) {
        return Err(StubError(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "the stub upstream did not get the gateway's key".into(),
        ));
    }
    match headers.get(project_header).and_then(|v| v.to_str().ok()) {
        None => Ok("default".into()),
        Some(id) if stub.project_ids.contains(id) => Ok(id.to_owned()),
        Some(id) => Err(StubError(StatusCode::NOT_FOUND, "project_not_found", format!("project {id} not found"))),
    }
}

/// [`admit`], then the JSON body.
fn admit_json(
    stub: &StubConfig,
    headers: &HeaderMap,
    project_header: &str,
    body: &Bytes,
) -> Result<(String, Value), StubError> {
    let project = admit(stub, headers, project_header)?;
    let body = serde_json::from_slice(body)
        .map_err(|_| StubError(StatusCode::BAD_REQUEST, "invalid_json", "body is not JSON".into()))?;
    Ok((project, body))
}

fn reply_text(project: &str, model: &str) -> String {
    format!(
        "Hello from the mantlegate demo upstream. This request for {model} arrived with the gateway's own key \
         and was billed to project {project}."
    )
}

fn words(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}

fn tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn input_tokens(body: &Value) -> u64 {
    tokens(&body.to_string()).max(1)
}

fn sse(delay: Duration, events: Vec<String>) -> Response {
    let stream = futures_util::stream::unfold((events.into_iter(), true), move |(mut events, first)| async move {
        let event = events.next()?;
        if !first && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(event)), (events, false)))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
        .into_response()
}

async fn chat(State(stub): Stub, headers: HeaderMap, body: Bytes) -> Response {
    let (project, req) = match admit_json(&stub, &headers, "openai-project", &body) {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let text = reply_text(&project, &model);
    let (input, output) = (input_tokens(&req), tokens(&text));
    let usage = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output});
    let id = "chatcmpl-demo";
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(json!({
            "id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    events.extend(words(&text).iter().map(|w| chunk(json!({"content": w}), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    if req["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".into());
    sse(stub.event_delay, events)
}

fn response_object(id: &str, model: &str, status: &str, text: &str, input: u64) -> Value {
    let output = tokens(text);
    json!({
        "id": id, "object": "response", "created_at": 0, "status": status, "model": model,
        "output": [{"type": "message", "id": "msg_demo", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": input + output},
    })
}

async fn responses_create(State(stub): Stub, headers: HeaderMap, body: Bytes) -> Response {
    let (project, req) = match admit_json(&stub, &headers, "openai-project", &body) {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let text = reply_text(&project, &model);
    let done = response_object("resp_demo", &model, "completed", &text, input_tokens(&req));
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(done).into_response();
    }
    let event = |seq: usize, kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        format!("event: {kind}\ndata: {data}\n\n")
    };
    let mut in_progress = done.clone();
    in_progress["status"] = json!("in_progress");
    in_progress["output"] = json!([]);
    let mut events = vec![event(0, "response.created", json!({"response": in_progress}))];
    for (i, w) in words(&text).iter().enumerate() {
        events.push(event(
            i + 1,
            "response.output_text.delta",
            json!({"item_id": "msg_demo", "output_index": 0, "content_index": 0, "delta": w}),
        ));
    }
    events.push(event(events.len(), "response.completed", json!({"response": done})));
    sse(stub.event_delay, events)
}

async fn responses_get(State(stub): Stub, headers: HeaderMap, Path(id): Path<String>) -> Response {
    match admit(&stub, &headers, "openai-project") {
        Ok(project) => axum::Json(response_object(
            &id,
            "openai.gpt-oss-120b",
            "completed",
            &reply_text(&project, "a stored response"),
            1,
        ))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn responses_delete(State(stub): Stub, headers: HeaderMap, Path(id): Path<String>) -> Response {
    match admit(&stub, &headers, "openai-project") {
        Ok(_) => axum::Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn responses_cancel(State(stub): Stub, headers: HeaderMap, Path(id): Path<String>) -> Response {
    match admit(&stub, &headers, "openai-project") {
        Ok(project) => axum::Json(response_object(
            &id,
            "openai.gpt-oss-120b",
            "cancelled",
            &reply_text(&project, "a cancelled response"),
            1,
        ))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(stub): Stub, headers: HeaderMap) -> Response {
    match admit(&stub, &headers, "openai-project") {
        Ok(_) => axum::Json(json!({
            "object": "list",
            "data": MODELS.iter().map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "bedrock"})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn messages(State(stub): Stub, headers: HeaderMap, body: Bytes) -> Response {
    let (project, req) = match admit_json(&stub, &headers, "anthropic-workspace-id", &body) {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let text = reply_text(&project, &model);
    let (input, output) = (input_tokens(&req), tokens(&text));
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(json!({
            "id": "msg_demo", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output},
        }))
        .into_response();
    }
    let event = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_demo", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for w in words(&text) {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse(stub.event_delay, events)
}
