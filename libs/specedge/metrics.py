"""Prometheus metrics, named like vLLM's (`vllm:…` → `specedge:…`) so dashboards carry over.

Each server-side service builds its own set on its own registry (`GatewayMetrics`,
`SchedulerMetrics`, `VerifierMetrics`) in its `main()`; the gateway serves it at
`/metrics`, the scheduler and verifier on `--metrics-port` (0: off). Labels have bounded
values only (a position up to the tree depth, a reason from a fixed vocabulary) — never a
session, user or edge id. The edge agent does not import this module.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "specedge:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve `/metrics` on a small HTTP port in a background thread (0: do not)."""
        if port:
            start_http_server(port, host, registry=self.registry)


class GatewayMetrics(_Metrics):
    """What callers see: latency, tokens in and out, requests in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.time_to_first_token = self.histogram(
            "time_to_first_token_seconds", "From request received to the first generated token.", LATENCY_BUCKETS)
        self.inter_token_latency = self.histogram(
            "inter_token_latency_seconds", "Between generated tokens of a request (a cycle's time per token).",
            LATENCY_BUCKETS)
        self.e2e_request_latency = self.histogram(
            "e2e_request_latency_seconds", "From request received to its last token.", REQUEST_BUCKETS)
        self.prompt_tokens = self.counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = self.counter("generation_tokens", "Generated tokens returned to callers.")
        self.requests = self.counter("request_success", "Finished requests, by finish reason.", ("finished_reason",))
        self.running = self.gauge("num_requests_running", "Requests generating now.")


class SchedulerMetrics(_Metrics):
    """Speculative decoding as the scheduler sees it: drafts, acceptance, edges, fallbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.drafts = self.counter("spec_decode_num_drafts", "Draft trees verified (server steps included).")
        self.draft_tokens = self.counter("spec_decode_num_draft_tokens", "Drafted tokens (tree nodes) verified.")
        self.accepted_tokens = self.counter("spec_decode_num_accepted_tokens", "Drafted tokens the target accepted.")
        self.accepted_per_pos = self.counter("spec_decode_num_accepted_tokens_per_pos",
                                             "Accepted drafted tokens by depth in the tree.", ("position",))
        self.running = self.gauge("num_requests_running", "Sessions open on this scheduler.")
        self.waiting = self.gauge("num_requests_waiting", "Trees queued for a verifier.")
        self.edge_round_trip = self.histogram(
            "edge_round_trip_seconds", "Result sent to an edge → its next draft received (scheduler's clock).",
            LATENCY_BUCKETS)
        self.edge_drafting = self.histogram("edge_drafting_seconds", "Drafting time edges report per tree.",
                                            LATENCY_BUCKETS)
        self.batch_size = self.histogram("verify_batch_size", "Trees per verification batch.",
                                         (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.rejected = self.counter("rejected_messages", "Messages refused, by reason.", ("reason",))
        self.drafts_ahead = self.counter("drafts_sent_ahead", "Trees edges sent ahead of the previous cycle's "
                                         "result, by outcome: used (the guess was right) or missed.", ("outcome",))
        self.fallbacks = self.counter("server_side_fallbacks", "Sessions moved to server steps, by cause.",
                                      ("cause",))
        self.edges_cut_off = self.counter("edges_cut_off", "Edges cut off for refused messages (suspended).")
        self.drafter_moves = self.counter("drafter_moves", "Sessions moved from one drafter to another, by cause.",
                                          ("cause",))


class VerifierMetrics(_Metrics):
    """The target model's work."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = self.counter("verifier_busy_seconds", "Time in verification forward passes.")
        self.busy_fraction = self.gauge("verifier_busy_fraction", "Share of the last minute spent verifying.")
        self.forward_passes = self.counter("verifier_forward_passes", "Verification forward passes.")
        self.reprefills = self.counter("verifier_reprefills", "Sessions re-prefilled from committed tokens.")
        self.rejected = self.counter("rejected_messages", "Messages refused, by reason.", ("reason",))
