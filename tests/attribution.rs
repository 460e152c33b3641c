//! Attribution end to end: what upstream receives for every branch of the attribution order, and that
//! nothing a caller sends gets it a project its key may not use.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mantlegate::proxy::Credential;

#[tokio::test]
async fn key_project_is_injected_and_caller_identity_removed() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let res = gw
        .post("/v1/chat/completions?trace=1", CHAT_KEY)
        .header("openai-organization", "org_caller")
        .header("x-request-id", "caller-rid-42")
        .body(CHAT_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "caller-rid-42");
    let seen = gw.mock.next().await;
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/v1/chat/completions?trace=1");
    assert_eq!(seen.header("openai-project"), Some("proj_chat"));
    assert_eq!(seen.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    assert_eq!(seen.header("openai-organization"), None);
    assert_eq!(seen.header("x-request-id"), Some("caller-rid-42"));
    assert_eq!(seen.body, CHAT_BODY.as_bytes());
    assert!(!format!("{:?}", seen.headers).contains(CHAT_KEY));
}

#[tokio::test]
async fn request_id_is_made_when_absent_and_shared_with_upstream() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 36);
    assert_eq!(gw.mock.next().await.header("x-request-id"), Some(rid.as_str()));
    // Errors the gateway answers itself carry one too.
    let res = gw.get("/v1/models", "wrong").send().await.unwrap();
    assert!(res.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn caller_may_select_an_allowed_project_by_name_or_id() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    for asked in ["Chat-Dev", "proj_dev", "Chat-Prod", "proj_chat"] {
        let res = gw
            .post("/v1/chat/completions", CHAT_KEY)
            .header("OpenAI-Project", asked)
            .body(CHAT_BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{asked}");
        let seen = gw.mock.next().await;
        let expected = if asked.contains("Dev") || asked == "proj_dev" { "proj_dev" } else { "proj_chat" };
        assert_eq!(seen.header("openai-project"), Some(expected), "{asked}");
        assert_eq!(seen.header_count("openai-project"), 1);
    }
    // Both headers naming the same project, one by name and one by id, agree.
    let res = gw
        .post("/v1/chat/completions", CHAT_KEY)
        .header("OpenAI-Project", "Chat-Dev")
        .header("anthropic-workspace-id", "proj_dev")
        .body(CHAT_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_dev"));
}

#[tokio::test]
async fn caller_cannot_reach_a_forbidden_project_by_any_header() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let attempts: Vec<Vec<(&str, &str)>> = vec![
        vec![("openai-project", "Search")],
        vec![("openai-project", "proj_search")],
        vec![("openai-project", "proj_not_configured")],
        vec![("anthropic-workspace-id", "proj_search")],
        vec![("openai-project", "chat-dev")],
    ];
    for headers in attempts {
        let mut req = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY);
        for (k, v) in &headers {
            req = req.header(*k, *v);
        }
        assert_eq!(error_code(req.send().await.unwrap()).await, (403, "project_not_allowed".into()), "{headers:?}");
    }
    // Duplicates that disagree are refused outright, in either order and across both header names.
    for (a, b) in [("openai-project", "openai-project"), ("openai-project", "anthropic-workspace-id")] {
        for (first, second) in [("proj_chat", "proj_search"), ("proj_search", "proj_chat")] {
            let res =
                gw.post("/v1/chat/completions", CHAT_KEY).header(a, first).header(b, second).body(CHAT_BODY).send();
            assert_eq!(error_code(res.await.unwrap()).await, (400, "invalid_request".into()));
        }
    }
    assert_eq!(gw.mock.hits(), 0, "no refused request may reach upstream");
}

#[tokio::test]
async fn asking_for_default_is_asking_for_nothing() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let res =
        gw.post("/v1/chat/completions", CHAT_KEY).header("OpenAI-Project", "default").body(CHAT_BODY).send().await;
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_chat"));
    let res = gw.post("/v1/chat/completions", FLOATING_KEY).header("OpenAI-Project", "default").body(CHAT_BODY).send();
    assert_eq!(error_code(res.await.unwrap()).await, (403, "project_required".into()));
}

#[tokio::test]
async fn route_prefix_selects_the_project_and_is_stripped() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let res = gw.post("/chatbot/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = gw.mock.next().await;
    assert_eq!(seen.uri.path(), "/v1/chat/completions");
    assert_eq!(seen.header("openai-project"), Some("proj_chat"));

    // The floating key has no project, but a route gives it none it may use either.
    let res = gw.post("/chatbot/v1/chat/completions", FLOATING_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (403, "project_not_allowed".into()));
    // A key may not use another team's route, and is not told the name of the project behind it.
    let res = gw.get("/search/openai/v1/models", CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), 403);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "project_not_allowed");
    assert_eq!(body["error"]["message"], "the project the request names is not allowed for this caller");
    // A header the key is allowed beats the route.
    let res =
        gw.post("/chatbot/v1/chat/completions", CHAT_KEY).header("OpenAI-Project", "Chat-Dev").body(CHAT_BODY).send();
    assert_eq!(res.await.unwrap().status(), 200);
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_dev"));
    assert_eq!(gw.mock.hits(), 2);
}

#[tokio::test]
async fn unattributed_requests_are_rejected_by_default() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let res = gw.post("/v1/chat/completions", FLOATING_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (403, "project_required".into()));
    assert_eq!(gw.mock.hits(), 0);
}

#[tokio::test]
async fn unattributed_requests_can_be_rerouted() {
    let opts = Opts { attribution: "unattributed = \"reroute\"\nreroute_to = \"Unattributed\"", ..Opts::default() };
    let gw = Gw::start(Mock::ok_json().await, opts).await;
    let res = gw.post("/v1/chat/completions", FLOATING_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_unattr"));
    // Keys with a project are unaffected.
    gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_chat"));
}

#[tokio::test]
async fn default_project_catches_what_keys_do_not_attribute() {
    let opts = Opts { attribution: "default_project = \"Unattributed\"", ..Opts::default() };
    let gw = Gw::start(Mock::ok_json().await, opts).await;
    gw.post("/v1/chat/completions", FLOATING_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_unattr"));
}

#[tokio::test]
async fn missing_wrong_or_ambiguous_keys_are_401() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let c = &gw.client;
    let url = gw.url("/v1/models");
    let cases = [
        c.get(&url),
        c.get(&url).bearer_auth("not-a-key"),
        c.get(&url).header("x-api-key", "not-a-key"),
        c.get(&url).bearer_auth(CHAT_KEY).header("x-api-key", SEARCH_KEY),
        c.get(&url).header("authorization", format!("Basic {CHAT_KEY}")),
    ];
    for req in cases {
        assert_eq!(error_code(req.send().await.unwrap()).await, (401, "invalid_api_key".into()));
    }
    assert_eq!(gw.mock.hits(), 0);
    // x-api-key alone is a valid way to present a key.
    let res = c.get(&url).header("x-api-key", SEARCH_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = gw.mock.next().await;
    assert_eq!(seen.header("openai-project"), Some("proj_search"));
    assert_eq!(seen.header("x-api-key"), None);
}

#[tokio::test]
async fn anthropic_route_uses_the_workspace_header() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let body = r#"{"model":"anthropic.claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let res = gw
        .client
        .post(gw.url("/anthropic/v1/messages"))
        .header("x-api-key", CHAT_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-workspace-id", "Chat-Dev")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = gw.mock.next().await;
    assert_eq!(seen.uri.path(), "/anthropic/v1/messages");
    assert_eq!(seen.header("anthropic-workspace-id"), Some("proj_dev"));
    assert_eq!(seen.header("openai-project"), None);
    assert_eq!(seen.header("x-api-key"), Some(UPSTREAM_KEY));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen.body, body.as_bytes());
}

#[tokio::test]
async fn trusted_callers_lose_their_credentials_and_may_pick_any_project() {
    let opts = Opts { callers: "none", keys: false, attribution: "default_project = \"Chat-Prod\"", ..Opts::default() };
    let gw = Gw::start(Mock::ok_json().await, opts).await;
    gw.post("/v1/chat/completions", "sk-app-placeholder")
        .header("x-api-key", "other")
        .body(CHAT_BODY)
        .send()
        .await
        .unwrap();
    let seen = gw.mock.next().await;
    assert_eq!(seen.header("openai-project"), Some("proj_chat"));
    assert_eq!(seen.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    assert_eq!(seen.header("x-api-key"), None);
    let res = gw
        .post("/v1/chat/completions", "x")
        .header("OpenAI-Project", "Search")
        .body(r#"{"model":"openai.gpt-oss-20b"}"#);
    assert_eq!(res.send().await.unwrap().status(), 200);
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_search"));
    let res = gw.post("/v1/chat/completions", "x").header("OpenAI-Project", "proj_elsewhere").body(CHAT_BODY).send();
    assert_eq!(error_code(res.await.unwrap()).await, (403, "project_not_allowed".into()));
}

#[tokio::test]
async fn passthrough_forwards_the_callers_own_credential() {
    let opts = Opts {
        callers: "none",
        keys: false,
        upstream: "auth = \"passthrough\"",
        attribution: "default_project = \"Chat-Prod\"",
        credential: Some(Credential::Passthrough),
        ..Opts::default()
    };
    let gw = Gw::start(Mock::ok_json().await, opts).await;
    gw.post("/v1/chat/completions", "callers-own-bedrock-key").body(CHAT_BODY).send().await.unwrap();
    let seen = gw.mock.next().await;
    assert_eq!(seen.header("authorization"), Some("Bearer callers-own-bedrock-key"));
    assert_eq!(seen.header("openai-project"), Some("proj_chat"));
}

#[tokio::test]
async fn large_bodies_are_checked_as_small_ones_are() {
    // Bodies over 256 KiB are parsed off the traffic thread: same answers, same bytes forwarded.
    let gw = Gw::start(Mock::ok_json().await, Opts { max_body_bytes: 4 << 20, ..Opts::default() }).await;
    let prompt = "x".repeat(1 << 20);
    let body = |model: &str| format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let res = gw.post("/v1/chat/completions", SEARCH_KEY).body(body("openai.gpt-5.5")).send().await.unwrap();
    assert_eq!(error_code(res).await, (403, "model_not_allowed".into()));
    let allowed = body("openai.gpt-oss-20b");
    let res = gw.post("/v1/chat/completions", SEARCH_KEY).body(allowed.clone()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.mock.next().await.body, allowed.as_bytes());
    let res = gw.post("/v1/chat/completions", SEARCH_KEY).body(format!("{{{prompt}")).send().await.unwrap();
    assert_eq!(error_code(res).await.0, 400);
}

#[tokio::test]
async fn model_allowlist_is_enforced_on_every_model_endpoint() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    for path in ["/v1/chat/completions", "/openai/v1/responses", "/search/v1/responses"] {
        let res = gw.post(path, SEARCH_KEY).body(r#"{"model":"openai.gpt-5.5","input":"hi"}"#).send().await.unwrap();
        assert_eq!(error_code(res).await, (403, "model_not_allowed".into()), "{path}");
    }
    let res = gw
        .client
        .post(gw.url("/anthropic/v1/messages"))
        .header("x-api-key", SEARCH_KEY)
        .body(r#"{"model":"anthropic.claude-sonnet-4-5","max_tokens":1,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (403, "model_not_allowed".into()));
    // A second "model" key must not smuggle a forbidden model past the check.
    let res =
        gw.post("/v1/chat/completions", SEARCH_KEY).body(r#"{"model":"openai.gpt-oss-20b","model":"openai.gpt-5.5"}"#);
    assert_eq!(error_code(res.send().await.unwrap()).await, (400, "invalid_request".into()));
    for bad in ["not json", r#"{"messages":[]}"#, r#"{"model":5}"#] {
        let res = gw.post("/v1/chat/completions", SEARCH_KEY).body(bad).send().await.unwrap();
        assert_eq!(error_code(res).await, (400, "invalid_request".into()), "{bad}");
    }
    assert_eq!(gw.mock.hits(), 0);

    let allowed = r#"{"model":"openai.gpt-oss-20b","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#;
    let res = gw.post("/v1/chat/completions", SEARCH_KEY).body(allowed).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = gw.mock.next().await;
    assert_eq!(seen.body, allowed.as_bytes(), "a body read for its model is forwarded byte for byte");
    assert_eq!(seen.header("content-length"), Some(allowed.len().to_string().as_str()));
    // Endpoints without a model in the body are not held to the allowlist.
    assert_eq!(gw.get("/v1/models", SEARCH_KEY).send().await.unwrap().status(), 200);
}
