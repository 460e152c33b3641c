"""The OpenAI Agents SDK (`openai-agents`) through the gateway, with a project chosen on its own AsyncOpenAI
client, and with its tracing off. Left on, the SDK uploads every run's trace (agent, prompts and answers) to
OpenAI's servers, authenticated by the client's key when the client is registered for tracing, as
`set_default_openai_client` does unless told `use_for_tracing=False`.

Each test runs openai_agents_run.py in a process of its own (tracing is process-wide, and traces are uploaded by
a background thread and at exit); that process refuses any lookup or connect but loopback and reports every
call of the SDK's trace exporter. The control run, with tracing left on and the upload stubbed out, shows the
exporter would have been handed the prompt and the gateway key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from harness import CHAT_KEY, ENV_PREFIXES, assert_forwarded
from mock_upstream import TEXT

SCRIPT = Path(__file__).resolve().parent / "openai_agents_run.py"
MODEL = "openai.gpt-oss-120b"


def run_agent(gateway, tmp_path, mode: str, project: str = "Chat-Dev", **extra_env) -> dict:
    report_file = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    env.update(
        MANTLEGATE_URL=gateway.url,
        MANTLEGATE_KEY=CHAT_KEY,
        MANTLEGATE_PROJECT=project,
        MANTLEGATE_REPORT_FILE=str(report_file),
        **extra_env,
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert report_file.is_file(), output
    report = json.loads(report_file.read_text())
    report["output"] = output
    return report


def gateway_address(gateway) -> list:
    url = urlsplit(gateway.url)
    return [url.hostname, url.port]


def assert_agent_ran(report, gateway, upstream, path: str = "/v1/responses") -> None:
    assert report["final_output"] == TEXT
    seen = upstream.only_request()
    # Chat-Dev, not the key's own Chat-Prod: the client's project was sent, and honoured.
    assert_forwarded(seen, method="POST", path=path, project="proj_dev")
    assert seen.json()["model"] == MODEL
    # Nothing went anywhere but the gateway, not even a name lookup.
    assert report["refused"] == [], report["output"]
    assert report["connects"] and all(c == gateway_address(gateway) for c in report["connects"]), report["connects"]


@pytest.mark.parametrize("mode", ["recipe", "env"])
def test_agents_tracing_off(gateway, upstream, tmp_path, mode):
    """The README's recipe (set_tracing_disabled(True), the client not registered for tracing), and the
    environment's OPENAI_AGENTS_DISABLE_TRACING=1 alone with the client registered: the run goes to the gateway
    in the chosen project, and the trace exporter is never handed anything, during the run or at exit."""
    extra_env = {"OPENAI_AGENTS_DISABLE_TRACING": "1"} if mode == "env" else {}
    report = run_agent(gateway, tmp_path, mode, **extra_env)

    assert_agent_ran(report, gateway, upstream)
    assert report["exports"] == [], report["exports"]


def test_agents_tracing_left_on_would_upload(gateway, upstream, tmp_path):
    """The control: with neither switch, the same run hands its trace to the exporter, to be uploaded with the
    gateway key (here the upload itself is stubbed out), so the test above would have seen an upload. On the
    Chat Completions API the trace carries the prompt and the answer (on the Responses API, the default, it
    carries the agent, the response ids and the token counts)."""
    report = run_agent(gateway, tmp_path, "tracing-on")

    assert_agent_ran(report, gateway, upstream, path="/v1/chat/completions")
    exports = report["exports"]
    assert exports, "the exporter was never called: the tests above prove nothing"
    assert sum(e["items"] for e in exports) >= 2  # the trace and its spans
    assert any(e["has_prompt"] for e in exports) and any(e["has_answer"] for e in exports), exports
    assert all(e["api_keys"] == [CHAT_KEY] for e in exports), exports
