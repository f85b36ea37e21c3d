"""Shared fixtures: real nats-server and redis-server on free ports, from the project's launcher.

The servers are started once per test session by `specedge.launcher` — the same code
`specedge up` uses — and stopped at the end. Tests that need a pristine server (for
example to restart it) start their own `Launcher`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import warnings

import psutil
import pytest

from specedge.launcher import Launcher

REPO = pathlib.Path(__file__).resolve().parents[1]
SPECEDGE = [sys.executable, "-m", "specedge.cli"]


@pytest.fixture(scope="session")
def servers():
    with Launcher() as launcher:
        nats = launcher.start_nats()
        redis = launcher.start_redis()
        yield {"nats_url": nats.url, "redis_url": redis.url, "launcher": launcher}


@pytest.fixture(scope="session")
def nats_url(servers) -> str:
    return servers["nats_url"]


@pytest.fixture(scope="session")
def redis_url(servers) -> str:
    return servers["redis_url"]


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A test that fails half-way must not leave its services running for the next ones."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    for proc in me.children(recursive=True):
        if proc.pid not in before:
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    warnings.warn(f"killing leftover process {proc.pid}: {' '.join(proc.cmdline())}", stacklevel=1)
                    proc.kill()


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: no SPECEDGE_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def secured():
    """A nats-server of its own (so a test may reload it) with alice's and bob's edge accounts."""
    from specedge import bus
    from specedge.nats_auth import edge_identity

    with Launcher() as launcher:
        auth = launcher.nats_auth
        alice = auth.add(edge_identity("alice-laptop", user="alice"))
        bob = auth.add(edge_identity("bob-laptop", user="bob"))
        server = launcher.start_nats()
        yield {"launcher": launcher, "auth": auth, "server": server, "url": bus.without_login(server.url),
               "admin": server.url, "alice": alice, "bob": bob}
