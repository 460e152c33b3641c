"""The official OpenAI Node SDK through the gateway: each test runs one test of node/gateway.test.mjs with Node's
built-in runner against this session's mock upstream and gateway, then checks what upstream received against
what the Node SDK sent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import CHAT_KEY, ROOT, WRONG_KEY, assert_forwarded
from mock_upstream import TEXT

NODE_TEST = Path(__file__).resolve().parent / "node" / "gateway.test.mjs"
NODE_MODULES = Path(os.environ.get("MANTLEGATE_SDK_NODE_MODULES") or ROOT / ".sdk" / "node" / "node_modules")


def run_node_test(gateway, tmp_path, name: str, **extra_env) -> list[dict]:
    """Runs the Node test called `name`; returns the requests the Node SDK sent."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/sdk-tests needs node 20+ and npm)")
    if not (NODE_MODULES / "openai").is_dir():
        pytest.fail(f"the openai npm package is not installed in {NODE_MODULES}: run scripts/sdk-tests")
    sent_file = tmp_path / "sent.jsonl"
    sent_file.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NODE_OPTIONS"))}
    env.update(
        MANTLEGATE_URL=gateway.url,
        MANTLEGATE_KEY=CHAT_KEY,
        MANTLEGATE_WRONG_KEY=WRONG_KEY,
        MANTLEGATE_FORBIDDEN_PROJECT="Search",
        MANTLEGATE_SDK_NODE_MODULES=str(NODE_MODULES),
        MANTLEGATE_SENT_FILE=str(sent_file),
        MOCK_TEXT=TEXT,
        **extra_env,
    )
    proc = subprocess.run(
        [node, "--test", "--test-reporter=tap", f"--test-name-pattern=^{name}$", str(NODE_TEST)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = f"--- node stdout ---\n{proc.stdout}\n--- node stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, output
    # Exactly the one test ran, and passed (a pattern that matches nothing passes vacuously).
    assert "# pass 1\n" in proc.stdout and "# fail 0\n" in proc.stdout, output
    return [json.loads(line) for line in sent_file.read_text().splitlines()]


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
