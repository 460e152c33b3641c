"""The official Anthropic Python SDK through the gateway's `/anthropic/v1/messages`, directly and under a
`[[routes]]` prefix, with the caller's key in `x-api-key` (Claude's usual header) and, where it matters, the way
the SDK sends a plain `api_key=` (major 2 sends it as `Authorization: Bearer`). Upstream must see
`anthropic-workspace-id` with the resolved project and the gateway's credential, never the caller's key."""

from __future__ import annotations

import json
from dataclasses import dataclass

import anthropic
import pytest

from harness import CHAT_KEY, ROUTE_PREFIX, WRONG_KEY, assert_forwarded
from mock_upstream import TEXT, TEXT_PIECES

MODEL = "anthropic.claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Say hello, with unicode: h\u00e9llo \u2603"}]


@dataclass(frozen=True)
class BaseUrl:
    client_path: str
    project: str


BASE_URLS = {
    "anthropic": BaseUrl("/anthropic", "proj_chat"),
    "route-prefix": BaseUrl(f"{ROUTE_PREFIX}/anthropic", "proj_labs"),
}
UPSTREAM_PATH = "/anthropic/v1/messages"


@pytest.fixture(params=list(BASE_URLS), ids=list(BASE_URLS))
def base(request) -> BaseUrl:
    return BASE_URLS[request.param]


@pytest.fixture(params=["x-api-key", "sdk-api-key"])
def key_header(request) -> str:
    """Where the caller's key goes: `x-api-key`, or wherever the SDK puts `api_key=` by itself."""
    return request.param


def client_for(gateway, base: BaseUrl, key: str = CHAT_KEY, key_header: str = "x-api-key", **kwargs):
    if key_header == "x-api-key":
        # The SDK would also send api_key as a bearer token: send the key in x-api-key alone.
        headers = {"x-api-key": key, "Authorization": anthropic.omit, **kwargs.pop("default_headers", {})}
        kwargs["default_headers"] = headers
    sent = []  # requests as they went on the wire (seen from the response, so after the SDK's auth step)
    http_client = anthropic.DefaultHttpxClient(event_hooks={"response": [lambda response: sent.append(response.request)]})
    client = anthropic.Anthropic(
        api_key=key,
        base_url=gateway.url + base.client_path,
        max_retries=0,
        timeout=20,
        http_client=http_client,
        **kwargs,
    )
    return client, sent


def assert_sent_key(sent, key_header: str, key: str = CHAT_KEY) -> bytes:
    """The SDK sent the caller's key where the test meant it to; returns the body it sent."""
    assert len(sent) == 1, f"the SDK sent {len(sent)} requests"
    headers = sent[0].headers
    if key_header == "x-api-key":
        assert headers["x-api-key"] == key
        assert "authorization" not in headers
    else:
        assert key in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    return sent[0].content


def test_messages(gateway, upstream, base, key_header):
    client, sent = client_for(gateway, base, key_header=key_header)
    message = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES, system="Be terse.")

    assert message.id == "msg_mock"
    assert message.content[0].text == TEXT
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, len(TEXT_PIECES))
    body = assert_sent_key(sent, key_header)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)
    assert seen.body == body
    assert json.loads(seen.body) == {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "system": "Be terse."}
    assert seen.header("anthropic-version") == sent[0].headers["anthropic-version"]


# What upstream streams; the SDK's event iterator drops the `ping`.
UPSTREAM_MESSAGE_EVENTS = (
    ["message_start", "content_block_start", "ping"]
    + ["content_block_delta"] * len(TEXT_PIECES)
    + ["content_block_stop", "message_delta", "message_stop"]
)
EXPECTED_MESSAGE_EVENTS = [e for e in UPSTREAM_MESSAGE_EVENTS if e != "ping"]


def test_messages_stream(gateway, upstream, base, key_header):
    client, sent = client_for(gateway, base, key_header=key_header)
    events = list(client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES, stream=True))

    assert [e.type for e in events] == EXPECTED_MESSAGE_EVENTS
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == TEXT
    assert events[-2].delta.stop_reason == "end_turn"
    body = assert_sent_key(sent, key_header)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)
    assert seen.body == body
    assert json.loads(seen.body)["stream"] is True


def test_messages_stream_raw_events(gateway, upstream, base):
    """The SSE stream reaches the client event for event, `ping` included, each `event:` line matching its data."""
    client, _ = client_for(gateway, base)
    with client.messages.with_streaming_response.create(
        model=MODEL, max_tokens=64, messages=MESSAGES, stream=True
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]

    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == UPSTREAM_MESSAGE_EVENTS
    assert [d["type"] for d in data] == UPSTREAM_MESSAGE_EVENTS
    assert_forwarded(upstream.only_request(), method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)


def test_messages_stream_helper(gateway, upstream, base):
    key_header = "x-api-key"
    client, sent = client_for(gateway, base, key_header=key_header)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()

    assert pieces == TEXT_PIECES
    assert final.content[0].text == TEXT
    assert final.usage.output_tokens == len(TEXT_PIECES)
    body = assert_sent_key(sent, key_header)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)
    assert seen.body == body


@pytest.mark.parametrize("asked", ["proj_dev", "Chat-Dev"], ids=["by-id", "by-name"])
def test_messages_workspace_selected(gateway, upstream, base, asked, key_header):
    # With key_header "sdk-api-key", the README's recipe: api_key= and default_headers, nothing else.
    client, sent = client_for(gateway, base, key_header=key_header, default_headers={"anthropic-workspace-id": asked})
    message = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)

    assert message.content[0].text == TEXT
    assert_sent_key(sent, key_header)
    assert sent[0].headers["anthropic-workspace-id"] == asked
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project="proj_dev", anthropic=True)


def test_messages_forbidden_workspace(gateway, upstream, base):
    client, _ = client_for(gateway, base, default_headers={"anthropic-workspace-id": "Search"})
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)

    assert info.value.status_code == 403
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["code"] == "project_not_allowed"
    assert upstream.requests() == []


def test_messages_wrong_key(gateway, upstream, base, key_header):
    client, _ = client_for(gateway, base, key=WRONG_KEY, key_header=key_header)
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)

    assert info.value.status_code == 401
    # Anthropic-shaped: the SDK reads the top-level "type": "error" and the nested error.
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert info.value.body["error"]["code"] == "invalid_api_key"
    assert upstream.requests() == []
