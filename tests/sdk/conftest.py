"""Fixtures for the SDK conformance suite: one mock upstream and one gateway binary per session, both on free
loopback ports, both stopped at the end even when tests fail. Each test starts with an empty upstream record.

The gateway binary is $MANTLEGATE_BIN, else target/release/mantlegate (scripts/sdk-tests builds it).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path

import pytest

from harness import ROOT, START_TIMEOUT, UPSTREAM_KEY, UPSTREAM_KEY_ENV, Gateway, config_text, log_record, stop_process
from mock_upstream import MockUpstream
from netguard import NetworkGuard

# Installed before the test modules import their libraries, so what a library does at import is seen too.
NETWORK = NetworkGuard().install()


@pytest.fixture(scope="session")
def mock(request) -> MockUpstream:
    upstream = MockUpstream().start()
    request.addfinalizer(upstream.stop)
    return upstream


@pytest.fixture(scope="session")
def gateway(request, mock, tmp_path_factory) -> Gateway:
    binary = Path(os.environ.get("MANTLEGATE_BIN") or ROOT / "target" / "release" / "mantlegate")
    if not binary.is_file():
        pytest.fail(f"gateway binary {binary} not found: run scripts/sdk-tests (it builds it)")
    workdir = tmp_path_factory.mktemp("gateway")
    config = workdir / "mantlegate.toml"
    config.write_text(config_text(mock.url))
    log_path = workdir / "gateway.log"
    # No MANTLEGATE_* overrides from the caller's environment; info logs carry the "listening" line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANTLEGATE") and k != "RUST_LOG"}
    env[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
    env["MANTLEGATE_LOG"] = "info"
    proc = subprocess.Popen(
        [str(binary), "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    # Registered before anything can fail, so the process never outlives the session.
    request.addfinalizer(lambda: stop_process(proc))

    # One thread drains the gateway's output for the whole session (a full pipe would block it), keeps it in a
    # log file, and hands over the "listening" line.
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


@pytest.fixture(autouse=True)
def upstream(mock) -> MockUpstream:
    """The mock upstream, with an empty record and no scripted answers, for this test."""
    mock.reset()
    yield mock
    mock.reset()


@pytest.fixture(autouse=True)
def only_loopback():
    """A client in this process reached nothing but loopback (the gateway), neither while a test ran nor
    before it (a library's import, another fixture): anything else was refused, and fails the test."""
    refused, _ = NETWORK.take()
    assert refused == [], f"refused outside traffic before this test (at import or in a fixture): {refused}"
    yield NETWORK
    refused, _ = NETWORK.take()
    assert refused == [], f"refused outside traffic during this test: {refused}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show the end of the gateway's log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "gateway" in getattr(item, "fixturenames", ()):
        gw = item.funcargs.get("gateway") if hasattr(item, "funcargs") else None
        if gw is not None:
            report.sections.append(("gateway log (tail)", gw.log_tail()))
