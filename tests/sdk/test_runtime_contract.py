"""The runtime contract the container image (Dockerfile) relies on, checked on the release binary itself, since no
image can be built here: run as distroless's unprivileged user (65532) from a copy of the binary, in a root-owned
tree where it can read only its config and its key file and write only the ledger directory (as a read-only root
filesystem with one volume leaves it), with the config path from `MANTLEGATE_CONFIG` and an env override, it
starts, serves a plain and a streamed request, drains a stream in flight on SIGTERM, and exits 0 having written
nothing but the ledger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from harness import gateway_binary, start_gateway
from mock_upstream import MockUpstream

NONROOT = 65532  # gcr.io/distroless/cc-debian12:nonroot's user and group
UPSTREAM_KEY = "runtime-contract-upstream-key"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running the gateway as another user needs root")


def owned_by(top: Path, uid: int) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.lstat().st_uid == uid)


@pytest.fixture
def tree(request):
    """A root-owned filesystem for the gateway: /usr/local/bin/mantlegate, /etc/mantlegate/mantlegate.toml,
    /var/run/secrets/mantle/api-key (readable by its group only) and /var/lib/mantlegate (its only writable place).
    It lives under /tmp itself (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="mantlegate-contract-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    for d in ("usr/local/bin", "etc/mantlegate", "var/run/secrets/mantle", "var/lib/mantlegate", "work"):
        (root / d).mkdir(parents=True, mode=0o755)
    shutil.copy2(gateway_binary(), root / "usr/local/bin/mantlegate")
    os.chmod(root / "usr/local/bin/mantlegate", 0o755)
    key = root / "var/run/secrets/mantle/api-key"
    key.write_text(UPSTREAM_KEY + "\n")
    os.chown(key, 0, NONROOT)
    os.chmod(key, 0o440)
    os.chown(root / "var/lib/mantlegate", NONROOT, NONROOT)
    os.chmod(root / "var/lib/mantlegate", 0o700)
    return root


def test_the_image_contract(request, tree, tmp_path):
    upstream = MockUpstream().start()
    request.addfinalizer(upstream.stop)
    config = tree / "etc/mantlegate/mantlegate.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "20s"

[upstream]
base_url = "http://127.0.0.1:9"  # overridden from the environment
auth = "api_key"
api_key_file = "{tree}/var/run/secrets/mantle/api-key"

[callers]
auth = "none"

[attribution]
default_project = "Workload"

[[projects]]
name = "Workload"
id = "proj_workload"

[metering]
ledger_path = "{tree}/var/lib/mantlegate/usage.jsonl"
""")
    os.chmod(config, 0o644)
    before = set(owned_by(Path("/tmp"), NONROOT))
    env = {
        "PATH": "/usr/bin:/bin",
        "MANTLEGATE_CONFIG": str(config),
        "MANTLEGATE__UPSTREAM__BASE_URL": upstream.url,
    }
    gw = start_gateway(
        request,
        tree / "work",  # not writable by the gateway
        None,
        env,
        binary=tree / "usr/local/bin/mantlegate",
        user=NONROOT,
        log_path=tmp_path / "gateway.log",
    )
    assert httpx.get(f"{gw.admin_url}/readyz", timeout=10).status_code == 200

    chat = {"model": "openai.gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    seen = upstream.only_request()
    assert seen.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert seen.header("openai-project") == "proj_workload"

    # A stream in flight when SIGTERM comes finishes whole; the gateway then exits 0.
    upstream.stream_gate = threading.Event()
    streamed: dict = {}

    def stream() -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            response = client.post("/v1/chat/completions", json={**chat, "stream": True})
            streamed["status"], streamed["body"] = response.status_code, response.text

    caller = threading.Thread(target=stream)
    caller.start()
    assert upstream.streaming.wait(timeout=20), "the stream never began"
    gw.proc.send_signal(signal.SIGTERM)
    gw.wait_for_log("draining: no new connections, in-flight requests may finish")
    upstream.stream_gate.set()
    caller.join(timeout=30)
    assert streamed["status"] == 200 and streamed["body"].rstrip().endswith("data: [DONE]"), streamed
    assert gw.proc.wait(timeout=30) == 0, gw.log_tail()

    # Nothing written but the ledger, which holds both requests.
    written = owned_by(tree, NONROOT)
    assert written == [tree / "var/lib/mantlegate", tree / "var/lib/mantlegate/usage.jsonl"], written
    lines = [json.loads(line) for line in (tree / "var/lib/mantlegate/usage.jsonl").read_text().splitlines()]
    assert [line["project"] for line in lines] == ["Workload", "Workload"], lines
    assert set(owned_by(Path("/tmp"), NONROOT)) - before <= set(written)
    assert UPSTREAM_KEY not in gw.log_path.read_text()
