"""OpenTelemetry tracing for one SpecEdge process: set up once, flush and stop on exit.

Owns the SDK's configuration. A service enters `tracing(role, instance_id)` first in its
exit stack, so the provider outlives the connections and is flushed last. Configuration
is the standard `OTEL_*` environment only:

- `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: off.
- `OTEL_TRACES_EXPORTER=otlp` (the default): OTLP over HTTP/protobuf to
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`
  (headers, timeout, compression, certificates: the exporter's own `OTEL_EXPORTER_OTLP_*`).
  With neither endpoint set, tracing is off.
- `OTEL_TRACES_EXPORTER=console`: spans as JSON on stdout (debugging).
- Sampling (`OTEL_TRACES_SAMPLER`), batching (`OTEL_BSP_*`) and extra resource
  attributes (`OTEL_RESOURCE_ATTRIBUTES`) as the SDK reads them.

The resource names the service: `service.name` = `specedge-<role>` (this wins over
`OTEL_SERVICE_NAME`, which one shared environment would set alike for every service),
`service.namespace` = `specedge`, `service.instance.id` = its instance id on the bus.

Off means no provider is installed: the API's no-op tracer answers and `enabled()` is
False, so hot paths skip building spans at all. Spans are the callers'; carrying trace
context in NATS headers is `specedge.bus`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context

from specedge import __version__

log = logging.getLogger(__name__)

tracer = trace.get_tracer("specedge", __version__)
"""The tracer every SpecEdge module uses (a no-op until `setup` installs a provider)."""

_provider: Any = None  # the SDK's TracerProvider while tracing is on


def exporters(env: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment (default: this process's) asks for; empty: tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    if "none" in names:
        return []
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    chosen = []
    for name in names:
        if name == "otlp" and not endpoint:
            continue  # nowhere to send: off, at no cost
        if name not in ("otlp", "console"):
            log.warning("tracing: unsupported OTEL_TRACES_EXPORTER %r ignored (use otlp, console or none)", name)
            continue
        chosen.append(name)
    return chosen


def enabled() -> bool:
    """Whether this process records spans."""
    return _provider is not None


def setup(role: str, instance_id: str, redis: bool = False) -> bool:
    """Install the tracer provider for this process (once); returns whether tracing is on.

    `redis`: also trace this process's Redis commands (the Redis instrumentation)."""
    global _provider
    if _provider is not None:
        return True
    names = exporters()
    if not names:
        return False
    # The SDK loads only when tracing is on.
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    resource = Resource.create({"service.name": f"specedge-{role}", "service.namespace": "specedge",
                                "service.instance.id": instance_id, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

            wire = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            if wire != "http/protobuf":
                log.warning("tracing: OTLP protocol %r is not supported; sending http/protobuf", wire)
            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    if redis:
        from opentelemetry.instrumentation.redis import RedisInstrumentor  # noqa: PLC0415

        RedisInstrumentor().instrument(tracer_provider=provider)
    log.info("tracing: on (%s) as specedge-%s", ", ".join(names), role)
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is buffered (waiting at most `timeout_s`) and stop recording."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    if not provider.force_flush(int(timeout_s * 1000)):
        log.warning("tracing: some spans were not exported within %.0fs", timeout_s)
    provider.shutdown()


@contextlib.contextmanager
def tracing(role: str, instance_id: str, redis: bool = False) -> Iterator[bool]:
    """Tracing on for the block (if the environment asks for it); flushed on the way out."""
    on = setup(role, instance_id, redis)
    try:
        yield on
    finally:
        shutdown()


def span(name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
         attributes: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[trace.Span | None]:
    """`tracer.start_as_current_span` while tracing is on; else a context that yields None and costs nothing."""
    if _provider is None:
        return contextlib.nullcontext()
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def context_of(span: trace.Span | None) -> Context | None:
    """A context whose current span is `span` (None for None: the caller's current context applies)."""
    return None if span is None else trace.set_span_in_context(span)


def tree_depth(parents: list[int]) -> int:
    """Depth of a draft tree given as parent indices (-1 = the root; parents come first)."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 + (depth[p] if p >= 0 else 0))
    return max(depth, default=0)
