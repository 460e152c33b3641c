"""LangChain (`langchain-openai`'s ChatOpenAI) through the gateway, choosing a project: ChatOpenAI has no project
setting of its own (it passes `organization` to the OpenAI client, but not `project`), so the project goes in
`default_headers`. The recipe is the README's ("Choosing a project from client libraries"); upstream must see
the resolved project id and the gateway's credential, never the caller's key."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import ChatOpenAI

from harness import CHAT_KEY, assert_error, assert_forwarded
from mock_upstream import TEXT, TEXT_PIECES

MODEL = "openai.gpt-oss-120b"


def chat_model(gateway, project: str) -> ChatOpenAI:
    # The README's recipe, with the suite's gateway, key and project.
    return ChatOpenAI(
        model=MODEL,
        base_url=gateway.url + "/v1",
        api_key=CHAT_KEY,
        default_headers={"OpenAI-Project": project},
    )


@pytest.mark.parametrize("asked", ["Chat-Dev", "proj_dev"], ids=["by-name", "by-id"])
def test_langchain_invoke(gateway, upstream, asked):
    llm = chat_model(gateway, asked)
    answer = llm.invoke("Say hello")

    assert answer.content == TEXT
    assert answer.usage_metadata["output_tokens"] == len(TEXT_PIECES)
    seen = upstream.only_request()
    # Chat-Dev, not the key's own Chat-Prod: the header was sent, and honoured.
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    body = seen.json()
    assert body["model"] == MODEL
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]


def test_langchain_stream(gateway, upstream):
    llm = chat_model(gateway, "Chat-Dev")
    chunks = list(llm.stream("Say hello"))

    assert "".join(c.content for c in chunks) == TEXT
    seen = upstream.only_request()
    assert_forwarded(seen, method="POST", path="/v1/chat/completions", project="proj_dev")
    body = seen.json()
    # LangChain asks for no usage from a base URL of its own choosing; the gateway asks for it (for metering).
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_langchain_forbidden_project(gateway, upstream):
    llm = chat_model(gateway, "Search")
    with pytest.raises(openai.PermissionDeniedError) as info:
        llm.invoke("Say hello")

    assert_error(info.value, status=403, code="project_not_allowed", type_="permission_error")
    assert upstream.requests() == []

