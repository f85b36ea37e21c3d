"""Shared fixtures: real nats-server and redis-server on free ports, from the project's launcher.

The servers are started once per test session by `specedge.launcher` — the same code
`specedge up` uses — and stopped at the end. Tests that need a pristine server (for
example to restart it) start their own `Launcher`.
"""

from __future__ import annotations

import os
import pathlib
import sys

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


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: no SPECEDGE_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env
