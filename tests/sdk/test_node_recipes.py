"""The README's Node recipes for choosing a project, LangChain JS and the Vercel AI SDK: each test runs one test
of node/recipes.test.mjs (what the client got, and that nothing but the gateway was reached), then checks what
upstream received against what the library sent.

- LangChain JS (`@langchain/openai` ChatOpenAI): `configuration` is handed to the OpenAI Node SDK, so the project
  goes in `configuration.defaultHeaders` (the SDK's own `configuration.project` would do too). Chat Completions.
- Vercel AI SDK (`@ai-sdk/openai`): `createOpenAI({ project })` sends `OpenAI-Project`. `openai(model)` is the
  Responses API, `openai.chat(model)` Chat Completions; the gateway serves both.
"""

from __future__ import annotations

import json

from harness import CHAT_KEY, assert_forwarded, run_node_test

MODEL = "openai.gpt-oss-120b"


def run(gateway, tmp_path, name: str, package: str) -> list[dict]:
    # Chat-Dev: a project the key may select, not its own (Chat-Prod), so upstream shows the choice was honoured.
    return run_node_test(gateway, tmp_path, "recipes.test.mjs", name, package=package, MANTLEGATE_PROJECT="Chat-Dev")


def only(sent: list[dict]) -> dict:
    assert len(sent) == 1, f"the library sent {len(sent)} requests: {[(s['method'], s['url']) for s in sent]}"
    return sent[0]


def assert_sent(sent: dict, gateway, path: str) -> None:
    """The library sent the caller's key and the project the recipe chose, to the gateway."""
    assert sent["url"] == gateway.url + path
    assert sent["headers"]["authorization"] == f"Bearer {CHAT_KEY}"
    assert sent["headers"]["openai-project"] == "Chat-Dev"


# --- LangChain JS -------------------------------------------------------------------------------------------


def test_langchain_js_invoke(gateway, upstream, tmp_path):
    sent = only(run(gateway, tmp_path, "langchain invoke", "@langchain/openai"))

    assert_sent(sent, gateway, "/v1/chat/completions")
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    assert seen.body.decode() == sent["body"]
    body = json.loads(seen.body)
    assert body["model"] == MODEL
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]


def test_langchain_js_stream(gateway, upstream, tmp_path):
    sent = only(run(gateway, tmp_path, "langchain stream", "@langchain/openai"))

    assert_sent(sent, gateway, "/v1/chat/completions")
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    body = json.loads(seen.body)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_langchain_js_forbidden_project(gateway, upstream, tmp_path):
    sent = only(run(gateway, tmp_path, "langchain forbidden project", "@langchain/openai"))

    assert sent["headers"]["openai-project"] == "Search"
    assert upstream.requests() == []


# --- Vercel AI SDK ------------------------------------------------------------------------------------------


def test_ai_sdk_generate_text(gateway, upstream, tmp_path):
    sent = only(run(gateway, tmp_path, "ai-sdk generateText", "@ai-sdk/openai"))

    assert_sent(sent, gateway, "/v1/responses")
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/responses", project="proj_dev")
    assert seen.body.decode() == sent["body"]
    assert json.loads(seen.body)["model"] == MODEL


def test_ai_sdk_chat_stream_text(gateway, upstream, tmp_path):
    sent = only(run(gateway, tmp_path, "ai-sdk chat streamText", "@ai-sdk/openai"))

    assert_sent(sent, gateway, "/v1/chat/completions")
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    body = json.loads(seen.body)
    assert body["model"] == MODEL and body["stream"] is True


def test_ai_sdk_forbidden_project(gateway, upstream, tmp_path):
    sent = only(run(gateway, tmp_path, "ai-sdk forbidden project", "@ai-sdk/openai"))

    assert sent["headers"]["openai-project"] == "Search"
    assert upstream.requests() == []
