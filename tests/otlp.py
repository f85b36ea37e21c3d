"""A tiny OTLP/HTTP trace receiver: accepts `POST /v1/traces` (protobuf, plain or gzip),
decodes each `ExportTraceServiceRequest` with opentelemetry-proto and keeps the spans.

Tests start one in-process and point the services' `OTEL_EXPORTER_OTLP_ENDPOINT` at it.
`python -m tests.otlp --port N` runs one as a throwaway sink that decodes nothing (it
prints what it got on exit), e.g. for measuring tracing overhead with `specedge bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.server
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    status_code: int = 0


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(Span(
                    service=resource.get("service.name", ""), name=s.name, trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(), kind=s.kind,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes={**{f"resource.{k}": v for k, v in resource.items()},
                                **{a.key: _value(a.value) for a in s.attributes}},
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    status_code=s.status.code))
    return spans


def render(spans: list[Span], trace_id: str) -> str:
    """One trace as an indented tree: offset and duration in ms, service, name, project attributes."""
    mine = sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns)
    if not mine:
        return ""
    ids, origin = {s.span_id for s in mine}, mine[0].start_ns
    lines = []

    def walk(parent: str, depth: int) -> None:
        for s in (s for s in mine if (s.parent_id if s.parent_id in ids else "") == parent):
            attrs = " ".join(f"{k.removeprefix('specedge.')}={v}" for k, v in s.attributes.items()
                             if k.startswith(("specedge.", "gen_ai.")) and k != "specedge.session.id")
            lines.append(f"{(s.start_ns - origin) / 1e6:8.1f} {(s.end_ns - s.start_ns) / 1e6:7.1f} ms  "
                         f"{'  ' * depth}{s.name} [{s.service.removeprefix('specedge-')}] {attrs}".rstrip())
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


class Receiver:
    """An OTLP/HTTP receiver on a loopback port; `spans` holds everything received (with
    `keep=False` nothing is decoded or kept, and `count` is bytes instead of spans)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True) -> None:
        self.spans: list[Span] = []
        self.requests = self.count = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                spans = decode(body) if keep else []  # a sink only counts what it is sent
                with receiver._lock:
                    receiver.requests += 1
                    receiver.count += len(body) if not keep else len(spans)
                    receiver.spans += spans
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Receiver(port=args.port, keep=False) as receiver:
        print(f"OTLP/HTTP receiver at {receiver.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        print(f"received {receiver.requests} export requests, {receiver.count} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
