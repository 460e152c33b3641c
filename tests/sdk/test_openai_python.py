"""The official OpenAI Python SDK through the gateway, on each way a client can point its base_url at it: `/v1`,
`/openai/v1` and a `[[routes]]` prefix (`/labs/v1`). Every test checks what the client got and what upstream
received: path, project header, credential, and the request body the SDK sent, byte for byte (the one documented
exception: a chat stream that did not ask for usage is asked for it upstream, for metering)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import openai
import pytest

from harness import (
    CHAT_KEY,
    ROUTE_PREFIX,
    WRONG_KEY,
    assert_error,
    assert_forwarded,
)
from mock_upstream import MODELS, RATE_LIMIT_BODY, TEXT, TEXT_PIECES

MODEL = "openai.gpt-oss-120b"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello, with unicode: h\u00e9llo \u2603"},
]


@dataclass(frozen=True)
class BaseUrl:
    """One way to reach the gateway: the path the client's base_url ends with, the path prefix upstream sees,
    and the project a chat-service request lands in when it asks for none."""

    client_path: str
    upstream_prefix: str
    project: str


BASE_URLS = {
    "v1": BaseUrl("/v1", "/v1", "proj_chat"),
    "openai-v1": BaseUrl("/openai/v1", "/openai/v1", "proj_chat"),
    "route-prefix": BaseUrl(f"{ROUTE_PREFIX}/v1", "/v1", "proj_labs"),
}


@pytest.fixture(params=list(BASE_URLS), ids=list(BASE_URLS))
def base(request) -> BaseUrl:
    return BASE_URLS[request.param]


class Sent:
    """The requests the SDK put on the wire, seen through an httpx response hook (so after the SDK's auth step)."""

    def __init__(self) -> None:
        self.requests = []

    def hook(self, response) -> None:
        self.requests.append(response.request)

    def only_body(self) -> bytes:
        assert len(self.requests) == 1, f"the SDK sent {len(self.requests)} requests"
        return self.requests[0].content


def client_for(gateway, base: BaseUrl, key: str = CHAT_KEY, **kwargs) -> tuple[openai.OpenAI, Sent]:
    sent = Sent()
    http_client = openai.DefaultHttpxClient(event_hooks={"response": [sent.hook]})
    client = openai.OpenAI(
        api_key=key,
        base_url=gateway.url + base.client_path,
        max_retries=0,
        timeout=20,
        http_client=http_client,
        **kwargs,
    )
    return client, sent


def assert_body_unchanged(seen, sent: Sent, **expected) -> dict:
    """Upstream got exactly the bytes the SDK sent, and they say what the test asked for."""
    body = sent.only_body()
    assert seen.body == body, "the request body was changed on the way upstream"
    parsed = json.loads(body)
    for key, value in expected.items():
        assert parsed[key] == value, key
    return parsed


# --- chat completions ---------------------------------------------------------------------------------------


def test_chat_completion(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0.2)
    completion = raw.parse()

    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == 11 + len(TEXT_PIECES)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project=base.project)
    assert_body_unchanged(seen, sent, model=MODEL, messages=MESSAGES, temperature=0.2)
    assert seen.header("content-type") == "application/json"
    # The request id the client sees is the one upstream was sent.
    assert raw.headers.get("x-request-id")
    assert raw.headers["x-request-id"] == seen.header("x-request-id")


def test_chat_stream(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)

    assert [c.object for c in chunks] == ["chat.completion.chunk"] * (len(TEXT_PIECES) + 2)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project=base.project)
    # The one change the gateway makes to a body: a chat stream that did not ask for usage is asked for it
    # upstream (for metering), and the usage chunk is hidden from the client again (above: no usage anywhere).
    sent_body = json.loads(sent.only_body())
    assert sent_body == {"model": MODEL, "messages": MESSAGES, "stream": True}
    assert seen.json() == {**sent_body, "stream_options": {"include_usage": True}}


def test_chat_stream_raw_sse(gateway, upstream, base):
    """On the wire the client gets the stream it would have got without the gateway: no usage chunk and no
    `usage` members although upstream was asked for usage, every chunk intact, then [DONE]."""
    client, _ = client_for(gateway, base)
    with client.chat.completions.with_streaming_response.create(model=MODEL, messages=MESSAGES, stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]

    assert all(line.startswith("data: ") for line in lines), lines
    data = [line.removeprefix("data: ") for line in lines]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == len(TEXT_PIECES) + 2
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks), chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == TEXT
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project=base.project)
    assert seen.json()["stream_options"] == {"include_usage": True}


def test_chat_stream_include_usage(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    *content, last = chunks
    assert all(c.choices and c.usage is None for c in content)
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, len(TEXT_PIECES))
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project=base.project)
    assert_body_unchanged(seen, sent, model=MODEL, stream=True, stream_options={"include_usage": True})


def test_chat_completion_gzip_upstream(gateway, upstream):
    """Metered endpoints ask upstream for identity encoding (usage is read from the bytes as they pass); a
    compressing upstream then answers plainly and the client gets its completion."""
    upstream.gzip = True
    client, _ = client_for(gateway, BASE_URLS["v1"])
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert completion.choices[0].message.content == TEXT
    assert upstream.only_request().header("accept-encoding") == "identity"


def test_chat_stream_gzip_upstream(gateway, upstream):
    """With a compressing upstream, the client still gets the stream it asked for: no usage chunk."""
    upstream.gzip = True
    client, _ = client_for(gateway, BASE_URLS["v1"])
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert all(c.choices and c.usage is None for c in chunks), "the gateway's usage chunk leaked to the client"
    assert upstream.only_request().header("accept-encoding") == "identity"


# --- responses ----------------------------------------------------------------------------------------------


def test_responses_create(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    response = client.responses.create(model=MODEL, input="Say hello", instructions="Be terse.")

    assert response.id == "resp_mock"
    assert response.status == "completed"
    assert response.output_text == TEXT
    assert response.usage.input_tokens_details.cached_tokens == 2
    assert response.usage.output_tokens_details.reasoning_tokens == 1
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/responses", project=base.project)
    assert_body_unchanged(seen, sent, model=MODEL, input="Say hello", instructions="Be terse.")


EXPECTED_RESPONSE_EVENTS = (
    ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    + ["response.output_text.delta"] * len(TEXT_PIECES)
    + [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
)


def test_responses_stream(gateway, upstream, base):
    client, sent = client_for(gateway, base)
    events = list(client.responses.create(model=MODEL, input="Say hello", stream=True))

    assert [e.type for e in events] == EXPECTED_RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(EXPECTED_RESPONSE_EVENTS)))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == TEXT_PIECES
    completed = events[-1].response
    assert completed.output_text == TEXT
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (11, len(TEXT_PIECES))
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/responses", project=base.project)
    assert_body_unchanged(seen, sent, model=MODEL, input="Say hello", stream=True)


def test_responses_retrieve(gateway, upstream, base):
    client, _ = client_for(gateway, base)
    response = client.responses.retrieve("resp_0123abc")

    assert response.id == "resp_0123abc"
    assert response.output_text == TEXT
    seen = upstream.only_request()
    assert_forwarded(seen, method="GET", path=f"{base.upstream_prefix}/responses/resp_0123abc", project=base.project)
    assert seen.body == b""


def test_responses_delete(gateway, upstream, base):
    client, _ = client_for(gateway, base)
    result = client.responses.delete("resp_0123abc")

    assert result is None  # the SDK's delete returns nothing on success
    seen = upstream.only_request()
    assert_forwarded(seen, method="DELETE", path=f"{base.upstream_prefix}/responses/resp_0123abc", project=base.project)
    assert seen.body == b""


# --- models -------------------------------------------------------------------------------------------------


def test_models_list(gateway, upstream, base):
    client, _ = client_for(gateway, base)
    models = [m.id for m in client.models.list()]

    assert models == MODELS
    seen = upstream.only_request()
    assert_forwarded(seen, method="GET", path=f"{base.upstream_prefix}/models", project=base.project)


# --- attribution through the SDK's `project=` ---------------------------------------------------------------


@pytest.mark.parametrize("asked", ["proj_dev", "Chat-Dev"], ids=["by-id", "by-name"])
def test_allowed_project(gateway, upstream, base, asked):
    client, sent = client_for(gateway, base, project=asked)
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert completion.choices[0].message.content == TEXT
    assert sent.requests[0].headers["openai-project"] == asked  # the SDK did send it
    seen = upstream.only_request()
    # The caller's header is replaced by the resolved project id, whatever the route or key default.
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project="proj_dev")
    assert_body_unchanged(seen, sent, model=MODEL, messages=MESSAGES)


@pytest.mark.parametrize("asked", ["proj_search", "Search"], ids=["by-id", "by-name"])
def test_forbidden_project(gateway, upstream, base, asked):
    client, _ = client_for(gateway, base, project=asked)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert_error(info.value, status=403, code="project_not_allowed", type_="permission_error")
    # An id is quoted back; a name never is (a configured project's name is not the caller's to learn, and what
    # a caller sends as one may be a pasted key).
    assert (asked in info.value.message) == asked.startswith("proj_"), info.value.message
    assert upstream.requests() == []


def test_caller_organization_never_reaches_upstream(gateway, upstream, base):
    client, sent = client_for(gateway, base, organization="org-caller-own")
    client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert sent.requests[0].headers["openai-organization"] == "org-caller-own"
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project=base.project)


# --- errors -------------------------------------------------------------------------------------------------


def test_wrong_key(gateway, upstream, base):
    client, _ = client_for(gateway, base, key=WRONG_KEY)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert_error(info.value, status=401, code="invalid_api_key", type_="authentication_error")
    assert info.value.request_id  # the gateway's own errors carry x-request-id too
    assert upstream.requests() == []


def test_rate_limit_from_upstream(gateway, upstream, base):
    upstream.rate_limit_next()
    client, sent = client_for(gateway, base)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    err = info.value
    # Passed through unchanged: status, body, and upstream's rate-limit headers.
    assert_error(err, status=429, code="rate_limit_exceeded", type_="rate_limit_error")
    assert err.body == RATE_LIMIT_BODY["error"]
    assert err.message.endswith(RATE_LIMIT_BODY["error"]["message"])
    assert err.response.headers["retry-after"] == "7"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path=f"{base.upstream_prefix}/chat/completions", project=base.project)
    assert_body_unchanged(seen, sent, model=MODEL, messages=MESSAGES)


@pytest.mark.parametrize(
    "method,path",
    [("get", "/organization/projects"), ("post", "/organization/projects"), ("get", "/files")],
    ids=["list-projects", "create-project", "files"],
)
def test_unknown_route(gateway, upstream, base, method, path):
    client, _ = client_for(gateway, base)
    call = getattr(client, method)
    kwargs = {"body": {"name": "sneaky", "tags": {"Team": "x"}}} if method == "post" else {}
    with pytest.raises(openai.NotFoundError) as info:
        call(path, cast_to=object, **kwargs)

    assert_error(info.value, status=404, code="unknown_route", type_="not_found_error")
    assert upstream.requests() == []
