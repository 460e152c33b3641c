"""Limits refuse in ways the official SDKs understand (README "Limits and budgets", "Refusals the SDKs
understand"), on a gateway of this module's own: the suite's config plus a spent budget on Labs (`usd_per_day =
0`: every billed request is refused), one request a minute on Search, and limits on Chat-Prod that no refusal may
show (the Claude model is given a price, as an operator would, so that its requests cost something). A spent
budget is 429 `insufficient_quota` with `x-should-retry: false`, so the OpenAI and Anthropic SDKs stop after one
request at their default retries; a rate limit is 429 `rate_limit_exceeded` with `Retry-After` and OpenAI's
`x-ratelimit-*-requests`, so the OpenAI SDK waits as long as it says, and retries."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import anthropic
import openai
import pytest
from openai import _base_client

from harness import (
    CHAT_KEY,
    ROUTE_PREFIX,
    SEARCH_KEY,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    Gateway,
    assert_error,
    config_text,
    start_gateway,
)

MODEL = "openai.gpt-oss-120b"
MESSAGES = [{"role": "user", "content": "Say hello."}]
PROJECTS = ("Chat-Prod", "Chat-Dev", "Labs", "Search")
RULES = """
[[limits.rules]]
project = "Labs"
usd_per_day = 0

[[limits.rules]]
project = "Search"
requests_per_minute = 1

[[limits.rules]]
project = "Chat-Prod"
requests_per_minute = 9876
usd_per_day = 4321.0

[[prices]]
model = "anthropic.claude-sonnet-4-5"
input = 3.0
output = 15.0
"""
OTHER_NUMBERS = ("9876", "4321")  # Chat-Prod's limits


@pytest.fixture(scope="module")
def gateway(request, mock, tmp_path_factory) -> Gateway:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANTLEGATE") and k != "RUST_LOG"}
    env[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
    return start_gateway(request, tmp_path_factory.mktemp("limits"), config_text(mock.url) + RULES, env)


def openai_client(gateway, key: str, path: str, **kwargs) -> tuple[openai.OpenAI, list]:
    """A client, and the responses it got on the wire (an httpx hook: one per HTTP request, retries included)."""
    responses = []
    http_client = openai.DefaultHttpxClient(event_hooks={"response": [responses.append]})
    client = openai.OpenAI(api_key=key, base_url=gateway.url + path, timeout=20, http_client=http_client, **kwargs)
    return client, responses


def assert_names_limit(message: str, subject: str, window: str) -> None:
    """The message names the limit that refused (its subject and window) and no other project or its numbers."""
    assert subject in message and window in message, message
    for other in PROJECTS:
        assert other == subject.removeprefix("project:") or other not in message, message
    for number in OTHER_NUMBERS:
        assert number not in message, message


def test_openai_spent_budget_is_not_retried(gateway, upstream):
    client, responses = openai_client(gateway, CHAT_KEY, f"{ROUTE_PREFIX}/v1")
    assert client.max_retries == 2  # the SDK's default
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    err = info.value
    assert_error(err, status=429, code="insufficient_quota", type_="insufficient_quota")
    assert err.response.headers["x-should-retry"] == "false"
    assert len(responses) == 1, "the SDK retried a spent budget"
    assert upstream.requests() == []
    assert_names_limit(err.body["message"], "project:Labs", "usd_per_day")


def test_anthropic_spent_budget_is_not_retried(gateway, upstream):
    """The Anthropic SDK obeys `x-should-retry` before its status rules (`_should_retry` in its _base_client.py,
    major 2), as the OpenAI SDK does."""
    responses = []
    client = anthropic.Anthropic(
        api_key=CHAT_KEY,
        base_url=f"{gateway.url}{ROUTE_PREFIX}/anthropic",
        timeout=20,
        http_client=anthropic.DefaultHttpxClient(event_hooks={"response": [responses.append]}),
    )
    assert client.max_retries == 2  # the SDK's default
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="anthropic.claude-sonnet-4-5", max_tokens=64, messages=MESSAGES)

    err = info.value
    assert err.status_code == 429
    assert err.body["type"] == "error"
    assert err.body["error"]["code"] == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    assert len(responses) == 1, "the SDK retried a spent budget"
    assert upstream.requests() == []
    assert_names_limit(err.body["error"]["message"], "project:Labs", "usd_per_day")


def test_a_budget_refuses_a_model_it_cannot_price(gateway, upstream):
    """A budget counts spend at the gateway's prices, so a model it cannot price is refused where a budget applies
    (403 model_not_priced), before anything reaches upstream; the SDK does not retry a 403."""
    client, responses = openai_client(gateway, CHAT_KEY, f"{ROUTE_PREFIX}/v1")
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="anthropic.claude-haiku-4-5", messages=MESSAGES)

    assert_error(info.value, status=403, code="model_not_priced")
    assert len(responses) == 1
    assert upstream.requests() == []


def refused_by_rate_limit(gateway) -> tuple[openai.RateLimitError, list]:
    """Search's refusal once its one request of the minute is used, and every response it took. Up to three
    requests: if a minute ends between the first two, the second is admitted too (no waiting on the clock)."""
    client, responses = openai_client(gateway, SEARCH_KEY, "/v1", max_retries=0)
    for _ in range(3):
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        except openai.RateLimitError as err:
            return err, responses
    pytest.fail("three requests in a row admitted under requests_per_minute = 1")


def seconds(reset: str) -> int:
    """`48s` or `1m0s` (OpenAI's x-ratelimit-reset-* spelling) in seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(\d+)s", reset)
    assert match, reset
    return int(match[1] or 0) * 60 + int(match[2])


def test_openai_rate_limit_headers(gateway, upstream):
    err, responses = refused_by_rate_limit(gateway)
    second = datetime.now(timezone.utc).second

    assert_error(err, status=429, code="rate_limit_exceeded", type_="requests")
    headers = err.response.headers
    assert "x-should-retry" not in headers  # the SDK's own policy applies: retry a 429
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    retry_after = int(headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert seconds(headers["x-ratelimit-reset-requests"]) == retry_after
    # The window is the UTC minute: it resets at its end (the clock may have ticked a second since).
    assert (second + retry_after) % 60 in (0, 1), (second, retry_after)
    assert len(upstream.requests()) == len(responses) - 1, "the refused request reached upstream"
    assert_names_limit(err.body["message"], "project:Search", "requests_per_minute")


def test_openai_rate_limit_is_retried_after_retry_after(gateway, upstream, monkeypatch):
    """At its default retries the SDK retries a rate limit twice, each time after the `Retry-After` it was given.
    That wait is up to 60 s here, so the SDK's sleep (its module's `time.sleep`) is replaced by a recorder: the test
    sees what the SDK decided, in milliseconds."""
    waits = []
    monkeypatch.setattr(_base_client, "time", SimpleNamespace(sleep=waits.append, time=time.time))
    for _ in range(2):  # once more if a minute ends between using it up and the retries (one is admitted)
        refused_by_rate_limit(gateway)
        before = len(upstream.requests())
        client, responses = openai_client(gateway, SEARCH_KEY, "/v1")
        waits.clear()
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        except openai.RateLimitError as err:
            assert_error(err, status=429, code="rate_limit_exceeded")
            break
    else:
        pytest.fail("a retry was admitted twice under requests_per_minute = 1")

    assert client.max_retries == 2
    assert [r.status_code for r in responses] == [429, 429, 429]
    assert [r.request.headers["x-stainless-retry-count"] for r in responses] == ["0", "1", "2"]
    assert waits == [float(r.headers["retry-after"]) for r in responses[:2]]
    assert len(upstream.requests()) == before
