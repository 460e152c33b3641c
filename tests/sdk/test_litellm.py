"""LiteLLM's Python SDK (`litellm.completion`) through the gateway, choosing a project. The README's recipe uses
LiteLLM's generic OpenAI-compatible provider (`openai/<model>` with `api_base`), which has no project setting:
the project goes in `extra_headers`. LiteLLM's own `bedrock_mantle/` provider sends `aws_bedrock_project_id`
as `OpenAI-Project`, and works against the gateway too. Upstream must see the resolved project id and the
gateway's credential, never the caller's key.

At import LiteLLM fetches its model price list from GitHub unless LITELLM_OFFLINE_MODE is true (the suite
refuses any outside traffic, so the import would fail the first test): set before importing it, as the README
says."""

from __future__ import annotations

import os

os.environ["LITELLM_OFFLINE_MODE"] = "true"

import litellm  # noqa: E402
import pytest  # noqa: E402

from harness import CHAT_KEY, assert_forwarded  # noqa: E402
from mock_upstream import TEXT, TEXT_PIECES  # noqa: E402

# LiteLLM's pydantic types warn about their own ReadOnly items at first use.
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly. qualifier:UserWarning")
litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banner on each error

MODEL = "openai.gpt-oss-120b"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def completion(gateway, project: str, **kwargs):
    # The README's recipe, with the suite's gateway, key and project.
    return litellm.completion(
        model=f"openai/{MODEL}",
        api_base=gateway.url + "/v1",
        api_key=CHAT_KEY,
        extra_headers={"OpenAI-Project": project},
        messages=MESSAGES,
        **kwargs,
    )


@pytest.mark.parametrize("asked", ["Chat-Dev", "proj_dev"], ids=["by-name", "by-id"])
def test_litellm_completion(gateway, upstream, asked):
    response = completion(gateway, asked)

    assert response.choices[0].message.content == TEXT
    assert response.usage.completion_tokens == len(TEXT_PIECES)
    seen = upstream.only_request()
    # Chat-Dev, not the key's own Chat-Prod: the header was sent, and honoured.
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    body = seen.json()
    assert body["model"] == MODEL  # the "openai/" provider prefix is LiteLLM's, not sent
    assert body["messages"] == MESSAGES


def test_litellm_stream(gateway, upstream):
    chunks = list(completion(gateway, "Chat-Dev", stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    assert seen.json()["stream"] is True


def test_litellm_forbidden_project(gateway, upstream):
    # LiteLLM maps a 403 from an OpenAI-compatible server to its generic APIError, not PermissionDeniedError;
    # the status and the gateway's error body are kept.
    with pytest.raises(litellm.exceptions.APIError) as info:
        completion(gateway, "Search")

    err = info.value
    assert err.status_code == 403
    assert "the project the request names is not allowed" in err.message
    assert err.response.json()["error"]["code"] == "project_not_allowed"
    assert upstream.requests() == []


def test_litellm_bedrock_mantle_provider(gateway, upstream):
    """LiteLLM's provider for bedrock-mantle itself: `aws_bedrock_project_id` becomes `OpenAI-Project`, and an
    `api_key` is sent as a bearer token (without one it would sign with AWS credentials, which the gateway
    refuses)."""
    response = litellm.completion(
        model=f"bedrock_mantle/{MODEL}",
        api_base=gateway.url + "/v1",
        api_key=CHAT_KEY,
        aws_bedrock_project_id="Chat-Dev",
        messages=MESSAGES,
    )

    assert response.choices[0].message.content == TEXT
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    assert seen.json()["model"] == MODEL
