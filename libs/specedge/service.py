"""The lifecycle every long-running SpecEdge process shares.

Owns logging setup, signals and running a service coroutine. A service is
`async def serve(settings, life: Lifecycle)`: it starts up inside an `AsyncExitStack`
that owns its connections, then `await life.serve_until_stopped()`. The first
SIGTERM/SIGINT ends that wait so the stack drains; if it arrives during startup (a
server still unreachable, a model still loading) startup is cancelled at once; a second
signal exits immediately. Once a service has stopped cleanly the process exits without the
interpreter's teardown (`exit_now`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A service cannot start (bad model, unreachable server); reported in one line, exit 2."""


class Lifecycle:
    """Stop signal and readiness of one service process."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.ready = False

    async def serve_until_stopped(self) -> None:
        self.ready = True
        await self.stop.wait()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s",
        force=True,
    )


def run(service: Callable[[Lifecycle], Coroutine[Any, Any, None]], log_level: str = "info",
        grace_s: float = 15.0) -> None:
    """Run a service until it returns or is stopped; exit 2 with a one-line reason if it cannot start."""
    setup_logging(log_level)
    try:
        asyncio.run(_supervise(service, grace_s))
    except (ConnectionError, StartupError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    exit_now(0)


def exit_now(code: int) -> None:
    """Exit once every connection is closed: exit handlers run (exporters flush), output is
    flushed, and the interpreter's module teardown — most of a second in a process that
    imported torch, on every stop of `specedge up` and every rolling restart — is skipped."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _supervise(service: Callable[[Lifecycle], Coroutine[Any, Any, None]], grace_s: float) -> None:
    life = Lifecycle()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if life.stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        life.stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    task = asyncio.create_task(service(life))
    stopping = asyncio.create_task(life.stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if task.done():
        return task.result()
    if not life.ready:
        log.info("stopped during startup")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    try:
        await asyncio.wait_for(task, grace_s)  # drains inside the service's exit stack
    except TimeoutError:
        log.warning("shutdown took longer than %.0fs; abandoned", grace_s)
    return None
