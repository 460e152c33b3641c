"""The official OpenAI Node SDK through the gateway: each test runs one test of node/gateway.test.mjs with Node's
built-in runner against this session's mock upstream and gateway, then checks what upstream received against
what the Node SDK sent."""

from __future__ import annotations

import json

from harness import CHAT_KEY, WRONG_KEY, assert_forwarded
from harness import run_node_test as _run_node_test


def run_node_test(gateway, tmp_path, name: str) -> list[dict]:
    return _run_node_test(gateway, tmp_path, "gateway.test.mjs", name)


def only(sent: list[dict]) -> dict:
    assert len(sent) == 1, f"the Node SDK sent {len(sent)} requests"
    return sent[0]


def test_node_chat_streaming(gateway, upstream, tmp_path):
    sent = only(run_node_test(gateway, tmp_path, "chat streaming"))

    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_chat")
    assert seen.body.decode() == sent["body"]
    body = json.loads(seen.body)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert sent["headers"]["authorization"] == f"Bearer {CHAT_KEY}"


def test_node_responses_create(gateway, upstream, tmp_path):
    sent = only(run_node_test(gateway, tmp_path, "responses create"))

    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/responses", project="proj_chat")
    assert seen.body.decode() == sent["body"]
    assert json.loads(seen.body) == {"model": "openai.gpt-oss-120b", "input": "Say hello from Node"}


def test_node_responses_stream(gateway, upstream, tmp_path):
    sent = only(run_node_test(gateway, tmp_path, "responses stream"))

    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/responses", project="proj_chat")
    assert seen.body.decode() == sent["body"]
    assert json.loads(seen.body)["stream"] is True


def test_node_forbidden_project(gateway, upstream, tmp_path):
    sent = only(run_node_test(gateway, tmp_path, "forbidden project"))

    assert sent["headers"]["openai-project"] == "Search"
    assert upstream.requests() == []


def test_node_wrong_key(gateway, upstream, tmp_path):
    sent = only(run_node_test(gateway, tmp_path, "wrong key"))

    assert sent["headers"]["authorization"] == f"Bearer {WRONG_KEY}"
    assert upstream.requests() == []
