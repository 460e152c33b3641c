"""Runs the README's OpenAI Agents SDK recipe in a process of its own (run by test_openai_agents.py): tracing is
process-wide state, and traces are uploaded by a background thread and at interpreter exit, which only a whole
process shows. Writes a JSON report to MANTLEGATE_REPORT_FILE once everything else, the SDK's exit-time trace
flush included, has run.

    python openai_agents_run.py recipe       # the README's recipe: set_tracing_disabled(True), use_for_tracing=False
    python openai_agents_run.py env          # tracing off by OPENAI_AGENTS_DISABLE_TRACING=1 alone (set by the caller)
    python openai_agents_run.py tracing-on   # the control: neither, with the trace upload stubbed out, and on
                                             # the Chat Completions API, whose traces carry prompts and answers

The report: the agent's answer; every call of the SDK's trace exporter (how many items, the API key it would
upload with, whether the prompt and the answer were in them); and every name lookup or connect this process
made, where anything but loopback is refused before a packet leaves.

Environment: MANTLEGATE_URL, MANTLEGATE_KEY, MANTLEGATE_PROJECT, MANTLEGATE_REPORT_FILE.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

from mock_upstream import TEXT
from netguard import NetworkGuard

MODE = sys.argv[1]
PROMPT = "Say hello from the agent"
ANSWER = TEXT  # what the suite's mock upstream answers
NETWORK = NetworkGuard().install()
REPORT: dict = {"mode": MODE, "exports": []}


def write_report() -> None:
    refused, connects = NETWORK.take()
    REPORT.update(refused=refused, connects=[list(c) for c in connects])
    with open(os.environ["MANTLEGATE_REPORT_FILE"], "w") as f:
        json.dump(REPORT, f)


# atexit runs handlers last-registered first: registered before the SDK is imported (its tracing registers its
# own exit-time flush lazily, later), this one runs after that flush, and sees it.
atexit.register(write_report)

from agents.tracing.processors import BackendSpanExporter  # noqa: E402

# Every upload goes through this method (`export` calls it, and so does the batch processor at exit).
real_export = BackendSpanExporter._export_with_deadline


def recording_export(self, items, deadline):
    if items:
        payload = json.dumps([item.export() for item in items], default=str)
        keys = sorted({item.tracing_api_key or self.api_key or "" for item in items})
        REPORT["exports"].append(
            {"items": len(items), "api_keys": keys, "has_prompt": PROMPT in payload, "has_answer": ANSWER in payload}
        )
    if MODE == "tracing-on":
        return  # the control: see what would be uploaded, upload nothing
    real_export(self, items, deadline)


BackendSpanExporter._export_with_deadline = recording_export

gateway_url = os.environ["MANTLEGATE_URL"]
key = os.environ["MANTLEGATE_KEY"]
project = os.environ["MANTLEGATE_PROJECT"]

# --- the README's recipe, with the suite's gateway, key and project ------------------------------------------
from agents import Agent, Runner, set_default_openai_api, set_default_openai_client, set_tracing_disabled  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

if MODE == "recipe":
    set_tracing_disabled(True)  # else each run's trace is uploaded to OpenAI, with this client's key
    set_default_openai_client(AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=key, project=project), use_for_tracing=False)
else:
    # "env": only OPENAI_AGENTS_DISABLE_TRACING=1 stands between the SDK and the upload; "tracing-on": nothing.
    set_default_openai_client(AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=key, project=project))
    if MODE == "tracing-on":
        set_default_openai_api("chat_completions")

agent = Agent(name="Assistant", instructions="Be terse.", model="openai.gpt-oss-120b")
result = Runner.run_sync(agent, PROMPT)
# ------------------------------------------------------------------------------------------------------------

REPORT["final_output"] = result.final_output
