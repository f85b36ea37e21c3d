"""A WAN link on an edge agent's bus, for benchmarks: `python -m specedge_bench.wan RTT_MS
ARGS…` runs `specedge ARGS…` (an edge agent) whose NATS client delivers every message it
publishes, and every message for its subscriptions, RTT_MS / 2 later — without holding up
the messages behind it. The product's edge agent knows nothing of it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from specedge import bus


class DelayedClient:
    """A NATS client whose link to the server is `one_way_s` long each way."""

    def __init__(self, nc: Any, one_way_s: float) -> None:
        self._nc, self.one_way_s = nc, one_way_s
        self._tasks: set[asyncio.Task] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    def _later(self, arrival: Awaitable[Any]) -> None:
        async def after() -> None:
            await asyncio.sleep(self.one_way_s)
            await arrival

        task = asyncio.create_task(after())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: dict | None = None) -> None:
        self._later(self._nc.publish(subject, payload, reply=reply, headers=headers))

    async def subscribe(self, subject: str, queue: str = "", cb=None, **kwargs: Any):
        if cb is None:
            return await self._nc.subscribe(subject, queue=queue, **kwargs)

        async def arrive(msg) -> None:
            self._later(cb(msg))

        return await self._nc.subscribe(subject, queue=queue, cb=arrive, **kwargs)


def on_a_wan(rtt_ms: float) -> None:
    """From now on, every `specedge.bus.connect` in this process yields a `DelayedClient`."""
    connect = bus.connect

    @contextlib.asynccontextmanager
    async def delayed_connect(*args: Any, **kwargs: Any) -> AsyncIterator[DelayedClient]:
        async with connect(*args, **kwargs) as nc:
            yield DelayedClient(nc, rtt_ms / 2000)

    bus.connect = delayed_connect


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].replace(".", "", 1).isdigit():
        raise SystemExit("usage: python -m specedge_bench.wan RTT_MS edge-agent [OPTIONS]")
    on_a_wan(float(argv[0]))
    from specedge.cli import app  # noqa: PLC0415 - after the patch

    app(args=argv[1:], prog_name="specedge")


if __name__ == "__main__":
    main()
