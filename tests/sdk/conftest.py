"""Fixtures for the SDK conformance suite: one mock upstream and one gateway binary per session, both on free
loopback ports, both stopped at the end even when tests fail. Each test starts with an empty upstream record.

The gateway binary is $MANTLEGATE_BIN, else target/release/mantlegate (scripts/sdk-tests builds it).
"""

from __future__ import annotations

import os

import pytest

from harness import UPSTREAM_KEY, UPSTREAM_KEY_ENV, Gateway, config_text, start_gateway
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
    workdir = tmp_path_factory.mktemp("gateway")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANTLEGATE") and k != "RUST_LOG"}
    env[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
    return start_gateway(request, workdir, config_text(mock.url), env)


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
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Gateway):
                report.sections.append((f"{name} log (tail)", value.log_tail()))
