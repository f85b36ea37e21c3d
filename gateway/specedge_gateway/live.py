"""What the gateway saw of recent requests, for the live view (`/dashboard`), and one
request's speculative stats, for the `specedge` extension field of a non-streaming reply.

Both are fed from the `TokenEvent`s the gateway receives: each event with tokens is one
verification, carrying the tree nodes drafted for it and how many the target accepted.
`LiveStats` keeps the last `horizon_s` seconds of cycles and latencies in memory (bounded
deques) and summarizes them on request; it covers the requests of this gateway only.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

MAX_SAMPLES = 20_000  # per kind: bounds memory whatever the load


@dataclass
class RequestStats:
    """One request's speculation: verifications, what was drafted for them, what was accepted."""

    mode: str = "specedge"
    verifications: int = 0
    drafts: int = 0  # verifications of a drafted tree (edge or server drafter)
    server_steps: int = 0  # verifications of an empty tree: one autoregressive token (no drafter, or a fallback)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    engine: str = ""  # the verifier's, when the session opened: "exact-bfloat16", "flex-float32", …
    seed: int | None = None  # the sampling seed (drawn fresh when the request gave none): reproduces the reply

    @property
    def system_fingerprint(self) -> str | None:
        """OpenAI's field for the backend configuration: which engine (exact or not) and dtype."""
        return f"specedge-{self.engine}" if self.engine else None

    def cycle(self, drafted: int, accepted: int) -> None:
        self.verifications += 1
        if drafted:
            self.drafts += 1
        else:
            self.server_steps += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted

    def as_dict(self) -> dict:
        """The extension field: counts, and the ratios (None when nothing was drafted)."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            "engine": self.engine or None,
            "exact": self.engine.startswith("exact-") if self.engine else None,
            "verifications": self.verifications,
            "drafts": self.drafts,
            "server_steps": self.server_steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else None,
            "mean_accepted_length": round(self.accepted_tokens / self.drafts, 4) if self.drafts else None,
            "tokens_per_verification": (round(1 + self.accepted_tokens / self.verifications, 4)
                                        if self.verifications else None),
        }


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LiveStats:
    """Recent cycles (accepted length, tokens) and latencies (TTFT, ITL) of this gateway."""

    def __init__(self, horizon_s: float = 60.0) -> None:
        self.horizon_s = horizon_s
        self.cycles: deque[tuple[float, int, int, int]] = deque(maxlen=MAX_SAMPLES)  # (t, tokens, drafted, accepted)
        self.ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (t, seconds)
        self.itl: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (t, seconds per token of a cycle)
        self.running = 0

    def cycle(self, now: float, tokens: int, drafted: int, accepted: int) -> None:
        self.cycles.append((now, tokens, drafted, accepted))

    def first_token(self, now: float, seconds: float) -> None:
        self.ttft.append((now, seconds))

    def inter_token(self, now: float, seconds: float) -> None:
        self.itl.append((now, seconds))

    def summary(self, now: float | None = None, bins: int = 60) -> dict:
        """The last `horizon_s` seconds: tokens/s per second (oldest first), the accepted-length
        histogram of drafted cycles, and TTFT/ITL quantiles in milliseconds."""
        now = time.monotonic() if now is None else now
        start = now - self.horizon_s
        cycles = [c for c in self.cycles if c[0] >= start]
        width = self.horizon_s / bins
        series = [0.0] * bins
        for t, tokens, _, _ in cycles:
            series[min(bins - 1, int((t - start) / width))] += tokens / width
        drafted = [c for c in cycles if c[2] > 0]
        depth = max((c[3] for c in drafted), default=0)
        histogram = [0] * (depth + 1)
        for c in drafted:
            histogram[c[3]] += 1
        draft_tokens = sum(c[2] for c in drafted)
        accepted = sum(c[3] for c in drafted)
        recent = now - 10.0
        ttft = [1000 * s for t, s in self.ttft if t >= start]
        itl = [1000 * s for t, s in self.itl if t >= start]
        return {
            "horizon_s": self.horizon_s,
            "running": self.running,
            "throughput": {
                "tokens_per_s_10s": sum(c[1] for c in cycles if c[0] >= recent) / 10.0,
                "series": [round(v, 2) for v in series],
                "bin_s": width,
                "tokens": sum(c[1] for c in cycles),
            },
            "acceptance": {
                "histogram": histogram,  # drafted cycles by accepted length 0..max
                "cycles": len(cycles),
                "server_steps": len(cycles) - len(drafted),
                "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
                "mean_accepted_length": accepted / len(drafted) if drafted else None,
            },
            "latency_ms": {
                "ttft": {"p50": quantile(ttft, 0.5), "p95": quantile(ttft, 0.95), "n": len(ttft)},
                "itl": {"p50": quantile(itl, 0.5), "p95": quantile(itl, 0.95), "n": len(itl)},
                "ttft_points": [[round(t - now, 3), round(1000 * s, 2)] for t, s in self.ttft if t >= start][-500:],
                "itl_points": [[round(t - now, 3), round(1000 * s, 2)] for t, s in self.itl if t >= start][-500:],
            },
        }
