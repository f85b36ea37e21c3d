"""Generation in one process, in the three modes — the same engine and acceptance rule:

- `autoregressive`: the target alone (every verification is of an empty tree);
- `server-only`: draft and target side by side, one after the other (the paper's baseline);
- `specedge`: drafter and verifier as two parties on two threads that exchange only
  encoded `DraftTreeMsg`/`VerifyResult` bytes over a link with an optional simulated
  one-way delay, with proactive drafting while a tree is being verified.

It owns the decode loop (stop on end-of-turn or `max_new_tokens`) and the statistics;
the services reuse the parties, not this loop.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from specedge import protocol
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.protocol import MODES, DraftTreeMsg, Mode, VerifyResult, cut_output

__all__ = ["MODES", "GenerationResult", "Mode", "generate"]


@dataclass
class GenerationResult:
    mode: Mode
    token_ids: list[int]                                   # generated ids only
    tokens_per_verify: list[int] = field(default_factory=list)  # accepted + bonus, per verification
    target_forward_passes: int = 0                          # decode passes (prefill excluded)
    draft_forward_passes: int = 0
    proactive_hits: int = 0
    proactive_attempts: int = 0
    wire_bytes_to_verifier: int = 0
    wire_bytes_to_edge: int = 0
    verify_busy_s: float = 0.0                              # target time in verification
    draft_busy_s: float = 0.0                               # draft time (proactive included)
    elapsed_s: float = 0.0

    @property
    def server_busy_s(self) -> float:
        """Server-side work: verification, plus drafting when the draft runs on the server."""
        return self.verify_busy_s + (self.draft_busy_s if self.mode == "server-only" else 0.0)

    @property
    def num_verifies(self) -> int:
        return len(self.tokens_per_verify)

    @property
    def mean_tokens_per_verify(self) -> float:
        return sum(self.tokens_per_verify) / max(1, len(self.tokens_per_verify))

    @property
    def proactive_hit_rate(self) -> float | None:
        return self.proactive_hits / self.proactive_attempts if self.proactive_attempts else None


class _Output:
    """Collects committed tokens; knows when to stop and trims past the stop point."""

    def __init__(self, max_new_tokens: int, eos_ids: set[int]) -> None:
        self.tokens: list[int] = []
        self.max_new_tokens, self.eos_ids = max_new_tokens, eos_ids
        self.done = max_new_tokens <= 0

    def add(self, result: VerifyResult) -> None:
        if self.done:
            return
        keep, reason = cut_output([*result.accepted, result.bonus], self.eos_ids,
                                  self.max_new_tokens - len(self.tokens))
        self.tokens += keep
        self.done = reason is not None


def generate(mode: Mode, verifier: Verifier, drafter: Drafter | None, prompt: list[int],
             params: SamplingSpec, max_new_tokens: int, eos_ids: set[int],
             one_way_delay_s: float = 0.0, session_id: str = "s0") -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` in `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "autoregressive" and drafter is None:
        raise ValueError(f"mode {mode!r} needs a drafter")
    start = time.perf_counter()
    draft_passes0 = drafter.stats.forward_passes if drafter else 0
    out = _Output(max_new_tokens, eos_ids)
    stats = GenerationResult(mode=mode, token_ids=out.tokens)
    busy0, draft_busy0 = verifier.busy_s, drafter.stats.busy_s if drafter else 0.0
    verifier.open(session_id, prompt, params)
    passes0 = verifier.forward_passes  # exclude prefill
    try:
        if mode == "specedge":
            drafter.open(session_id, prompt, grammar=params.grammar, end_ids=params.end_ids)
            _run_two_parties(verifier, drafter, session_id, out, stats, one_way_delay_s)
        else:
            if drafter is not None and mode == "server-only":
                drafter.open(session_id, prompt, grammar=params.grammar, end_ids=params.end_ids)
            while not out.done:
                if mode == "autoregressive":
                    tree = DraftTreeMsg(session_id=session_id, cycle=stats.num_verifies,
                                        committed_len=len(prompt) + len(out.tokens), tokens=[], parents=[])
                else:
                    tree = drafter.draft(session_id)
                result = verifier.verify([tree])[0]
                if mode == "server-only":
                    drafter.on_result(result)
                stats.tokens_per_verify.append(len(result.accepted) + 1)
                out.add(result)
    finally:
        verifier.close(session_id)
        if drafter is not None:
            drafter.close(session_id)
    stats.target_forward_passes = verifier.forward_passes - passes0
    stats.verify_busy_s = verifier.busy_s - busy0
    if drafter is not None:
        stats.draft_forward_passes = drafter.stats.forward_passes - draft_passes0
        stats.draft_busy_s = drafter.stats.busy_s - draft_busy0
    stats.elapsed_s = time.perf_counter() - start
    return stats


class _Link:
    """One direction of the network: bytes arrive after `delay_s` (in order)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        self.bytes_sent = 0

    def send(self, data: bytes | None) -> None:
        if data is not None:
            self.bytes_sent += len(data)
        if self.delay_s > 0:
            timer = threading.Timer(self.delay_s, self.inbox.put, args=(data,))
            timer.daemon = True
            timer.start()
        else:
            self.inbox.put(data)


def _run_two_parties(verifier: Verifier, drafter: Drafter, session_id: str, out: _Output,
                     stats: GenerationResult, delay_s: float) -> None:
    to_verifier, to_edge = _Link(delay_s), _Link(delay_s)
    failure: list[BaseException] = []

    def serve() -> None:  # the verifier party
        try:
            while (data := to_verifier.inbox.get()) is not None:
                tree = protocol.decode(data, DraftTreeMsg)
                to_edge.send(protocol.encode(verifier.verify([tree])[0]))
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)
            to_edge.send(None)

    server = threading.Thread(target=serve, name="verifier", daemon=True)
    server.start()
    try:
        hits0, attempts0 = drafter.stats.proactive_hits, drafter.stats.proactive_attempts
        while not out.done:
            to_verifier.send(protocol.encode(drafter.draft(session_id)))
            drafter.start_proactive(session_id)
            data = _await_result(to_edge.inbox, lambda: drafter.proactive_step(session_id))
            if data is None:
                raise failure[0] if failure else RuntimeError("verifier stopped")
            result = protocol.decode(data, VerifyResult)
            drafter.on_result(result)
            stats.tokens_per_verify.append(len(result.accepted) + 1)
            out.add(result)
        stats.proactive_hits = drafter.stats.proactive_hits - hits0
        stats.proactive_attempts = drafter.stats.proactive_attempts - attempts0
    finally:
        to_verifier.send(None)
        server.join(timeout=30)
        stats.wire_bytes_to_verifier, stats.wire_bytes_to_edge = to_verifier.bytes_sent, to_edge.bytes_sent


def _await_result(inbox: queue.Queue, step) -> bytes | None:
    """Wait for the result, doing one proactive draft pass at a time while none has arrived."""
    while True:
        try:
            return inbox.get_nowait()
        except queue.Empty:
            if not step():
                return inbox.get()
