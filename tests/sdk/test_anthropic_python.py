"""The official Anthropic Python SDK through the gateway's `/anthropic/v1/messages`, directly and under a
`[[routes]]` prefix. The SDK sends its key in `x-api-key`; upstream must see `anthropic-workspace-id` with the
resolved project and the gateway's credential, never the caller's key."""

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


def client_for(gateway, base: BaseUrl, key: str = CHAT_KEY, **kwargs):
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


def assert_sent_with_x_api_key(sent, key: str = CHAT_KEY) -> bytes:
    assert len(sent) == 1, f"the SDK sent {len(sent)} requests"
    assert sent[0].headers["x-api-key"] == key
    assert "authorization" not in sent[0].headers
    return sent[0].content


def test_messages(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    message = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES, system="Be terse.")

    assert message.id == "msg_mock"
    assert message.content[0].text == TEXT
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, len(TEXT_PIECES))
    body = assert_sent_with_x_api_key(sent)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)
    assert seen.body == body
    assert json.loads(seen.body) == {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "system": "Be terse."}
    assert seen.header("anthropic-version") == sent[0].headers["anthropic-version"]


EXPECTED_MESSAGE_EVENTS = (
    ["message_start", "content_block_start", "ping"]
    + ["content_block_delta"] * len(TEXT_PIECES)
    + ["content_block_stop", "message_delta", "message_stop"]
)


def test_messages_stream(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    events = list(client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES, stream=True))

    assert [e.type for e in events] == EXPECTED_MESSAGE_EVENTS
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == TEXT
    assert events[-2].delta.stop_reason == "end_turn"
    body = assert_sent_with_x_api_key(sent)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)
    assert seen.body == body
    assert json.loads(seen.body)["stream"] is True


def test_messages_stream_helper(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()

    assert pieces == TEXT_PIECES
    assert final.content[0].text == TEXT
    assert final.usage.output_tokens == len(TEXT_PIECES)
    body = assert_sent_with_x_api_key(sent)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=UPSTREAM_PATH, project=base.project, anthropic=True)
    assert seen.body == body


@pytest.mark.parametrize("asked", ["proj_dev", "Chat-Dev"], ids=["by-id", "by-name"])
def test_messages_workspace_selected(gateway, upstream, base, asked):
    client, sent = client_for(gateway, base, default_headers={"anthropic-workspace-id": asked})
    message = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)

    assert message.content[0].text == TEXT
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


def test_messages_wrong_key(gateway, upstream, base):
    client, _ = client_for(gateway, base, key=WRONG_KEY)
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)

    assert info.value.status_code == 401
    # Anthropic-shaped: the SDK reads the top-level "type": "error" and the nested error.
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert info.value.body["error"]["code"] == "invalid_api_key"
    assert upstream.requests() == []
