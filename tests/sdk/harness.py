"""What the SDK suite shares: the gateway config it runs, the caller and upstream keys, and the assertions on
what upstream received and what the client got."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mock_upstream import TEXT, Seen

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_KEY = "sdk-suite-upstream-key"
UPSTREAM_KEY_ENV = "MANTLEGATE_SDK_SUITE_UPSTREAM_KEY"
CHAT_KEY = "mg-sdk-chat-key"  # project Chat-Prod, may also select Chat-Dev
SEARCH_KEY = "mg-sdk-search-key"  # project Search only
WRONG_KEY = "mg-sdk-not-a-key"
ALL_CALLER_KEYS = (CHAT_KEY, SEARCH_KEY, WRONG_KEY)
ROUTE_PREFIX = "/labs"  # [[routes]] prefix -> project Labs
START_TIMEOUT = 30.0

# The SDKs and libraries read these from the environment (keys, base URLs, LangSmith tracing, LiteLLM
# settings); a developer's own settings must not leak into the suite.
ENV_PREFIXES = ("OPENAI_", "ANTHROPIC_", "LANGSMITH_", "LANGCHAIN_", "LITELLM_")
for _name in list(os.environ):
    if _name.startswith(ENV_PREFIXES):
        del os.environ[_name]


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config_text(upstream_url: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"

[upstream]
base_url = "{upstream_url}"
auth = "api_key"
api_key_env = "{UPSTREAM_KEY_ENV}"
connect_timeout = "2s"
response_timeout = "20s"
idle_timeout = "20s"

[callers]
auth = "keys"

[attribution]
unattributed = "reject"

[taxonomy]
required_tags = ["Team"]

[[projects]]
name = "Chat-Prod"
id = "proj_chat"
tags = {{ Team = "chat" }}

[[projects]]
name = "Chat-Dev"
id = "proj_dev"
tags = {{ Team = "chat" }}

[[projects]]
name = "Labs"
id = "proj_labs"
tags = {{ Team = "chat" }}

[[projects]]
name = "Search"
id = "proj_search"
tags = {{ Team = "search" }}

[[keys]]
name = "chat-service"
sha256 = "{sha256_hex(CHAT_KEY)}"
project = "Chat-Prod"
may_select = ["Chat-Dev", "Labs"]

[[keys]]
name = "search-service"
sha256 = "{sha256_hex(SEARCH_KEY)}"
project = "Search"

[[routes]]
prefix = "{ROUTE_PREFIX}"
project = "Labs"
"""


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    admin_url: str
    proc: subprocess.Popen
    log_path: Path

    def wait_for_log(self, message: str, timeout: float = 20.0) -> dict:
        """The first log record whose message is `message`, once the gateway has written it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in map(log_record, self.log_path.read_text(errors="replace").splitlines()):
                if record and record.get("message") == message:
                    return record
            time.sleep(0.05)  # polls the log file: the gateway announces nothing else
        pytest.fail(f"the gateway never logged {message!r}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def gateway_binary() -> Path:
    """$MANTLEGATE_BIN, else target/release/mantlegate (scripts/sdk-tests builds it)."""
    binary = Path(os.environ.get("MANTLEGATE_BIN") or ROOT / "target" / "release" / "mantlegate")
    if not binary.is_file():
        pytest.fail(f"gateway binary {binary} not found: run scripts/sdk-tests (it builds it)")
    return binary


def start_gateway(
    request,
    workdir: Path,
    config: str | None,
    env: dict[str, str],
    *,
    binary: Path | None = None,
    user: int | None = None,
    log_path: Path | None = None,
) -> Gateway:
    """Runs `mantlegate serve` on `config` (written to `workdir`; None: the config the environment names) with
    exactly `env` (plus info logs), in `workdir`, as `user` (uid and gid) if given, and waits for it to listen; it
    is stopped when `request` (a fixture's) finishes, even if the test fails."""
    argv = [str(binary or gateway_binary()), "serve"]
    if config is not None:
        config_path = workdir / "mantlegate.toml"
        config_path.write_text(config)
        argv += ["--config", str(config_path)]
    log_path = log_path or workdir / "gateway.log"
    as_user = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**env, "MANTLEGATE_LOG": "info"},
        cwd=workdir,
        **as_user,
    )
    # Registered before anything can fail, so the process never outlives the fixture.
    request.addfinalizer(lambda: stop_process(proc))

    # One thread drains the gateway's output for its whole life (a full pipe would block it), keeps it in a log
    # file, and hands over the "listening" line.
    listening: queue.Queue = queue.Queue()

    def drain() -> None:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                record = log_record(line)
                if record and record.get("message") == "mantlegate listening":
                    listening.put(record)
        listening.put(None)  # output closed: the process is gone

    threading.Thread(target=drain, name="gateway-log", daemon=True).start()
    try:
        record = listening.get(timeout=START_TIMEOUT)
    except queue.Empty:
        record = None
    if record is None:
        stop_process(proc)
        pytest.fail(f"the gateway did not start listening (exit {proc.poll()}):\n{log_path.read_text(errors='replace')}")
    return Gateway(f"http://{record['addr']}", f"http://{record['admin_addr']}", proc, log_path)


def log_record(line: str) -> dict | None:
    """One JSON log line of the gateway, with tracing's `fields` (if nested) lifted to the top."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    fields = record.get("fields") if isinstance(record.get("fields"), dict) else {}
    return {**record, **fields}


def stop_process(proc: subprocess.Popen) -> None:
    """Kills the process (idempotent) and reaps it."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --- assertions on what upstream received, shared by the test modules ---------------------------------------


def assert_forwarded(
    seen: Seen,
    *,
    method: str,
    path: str,
    project: str,
    anthropic: bool = False,
) -> None:
    """The request reached upstream on `path`, attributed to `project`, with the gateway's own upstream
    credential and none of the caller's keys or project/organization headers."""
    assert seen.method == method
    assert seen.path == path, f"upstream path {seen.path!r}, expected {path!r}"
    assert seen.header_all("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    if anthropic:
        assert seen.header_all("anthropic-workspace-id") == [project]
        assert seen.header_all("openai-project") == []
        assert seen.header_all("x-api-key") == [UPSTREAM_KEY]
    else:
        assert seen.header_all("openai-project") == [project]
        assert seen.header_all("anthropic-workspace-id") == []
        assert seen.header_all("x-api-key") == []
    assert seen.header_all("openai-organization") == []
    for key in ALL_CALLER_KEYS:
        for name, value in seen.headers:
            assert key not in value, f"caller key leaked upstream in header {name}"
        assert key not in seen.target and key.encode() not in seen.body, "caller key leaked upstream"
    assert len(seen.header_all("x-request-id")) == 1, "the gateway sends one x-request-id upstream"


def assert_error(err, *, status: int, code: str, type_: str | None = None) -> None:
    """An SDK error raised from a gateway (or upstream) error body."""
    assert err.status_code == status
    assert err.code == code, f"error code {err.code!r} (body {err.body!r})"
    if type_ is not None:
        assert err.type == type_


# --- Node: one test of a node --test file, run against the suite's gateway -----------------------------------

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_MODULES = Path(os.environ.get("MANTLEGATE_SDK_NODE_MODULES") or ROOT / ".sdk" / "node" / "node_modules")


def run_node_test(gateway, tmp_path: Path, script: str, name: str, package: str = "openai", **extra_env) -> list[dict]:
    """Runs the test called `name` in node/`script` with Node's built-in runner; returns the requests the code
    under test put on the wire (each test file records them to MANTLEGATE_SENT_FILE)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/sdk-tests needs node 20+ and npm)")
    if not (NODE_MODULES / package).is_dir():
        pytest.fail(f"the {package} npm package is not installed in {NODE_MODULES}: run scripts/sdk-tests")
    sent_file = tmp_path / "sent.jsonl"
    sent_file.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith((*ENV_PREFIXES, "NODE_OPTIONS"))}
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
        [node, "--test", "--test-reporter=tap", f"--test-name-pattern=^{name}$", str(NODE_DIR / script)],
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
