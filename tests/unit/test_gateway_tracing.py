"""The gateway's request span records each fill of lost token events from Redis."""

import asyncio
import types

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from specedge.protocol import SessionOpen
from specedge_gateway.sessions import _Resync


class Store:
    def __init__(self, output):
        self.output = output

    async def load(self, session_id):
        return None if self.output is None else types.SimpleNamespace(output=self.output)


def test_fills_from_redis_are_events_on_the_request_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("test").start_span("chat m")
    request = SessionOpen(session_id="s", tokens=[1], max_new_tokens=4, eos_ids=[9])
    resync = _Resync(Store([5, 6, 7]), "s", request, span)

    event = asyncio.run(resync.after(1, gap=True))
    assert event.index == 1 and event.tokens == [6, 7] and not event.finished
    assert asyncio.run(resync.after(3, gap=False)) is None  # nothing new: no event
    assert asyncio.run(_Resync(Store([5]), "s", request).after(0, gap=False)).tokens == [5]  # no span: fine
    span.end()

    (chat,) = exporter.get_finished_spans()
    (fill,) = chat.events
    assert fill.name == "resync" and dict(fill.attributes) == {
        "specedge.resync.from": 1, "specedge.resync.tokens": 2, "specedge.resync.gap": True}
    provider.shutdown()
