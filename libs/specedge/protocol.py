"""Every message that crosses the bus, typed, versioned and validated on decode.

Messages are `msgspec.Struct`s encoded as MessagePack. `decode()` is the only way bytes
from the bus become objects: it checks the size before parsing and the schema while
parsing, and raises `ProtocolError` with a reason that is safe to log and to count.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from typing import Literal, TypeVar, get_args

import msgspec

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # what a message anyone may send (an edge's draft, say) may weigh
# A session's own messages, which only services send (`SessionOpen`, `PrefillRequest`,
# `DraftAssign`): a prompt of `--max-context` tokens and a grammar; the NATS server's
# max_payload bounds them too (the gateway checks at startup).
MAX_SESSION_MESSAGE_BYTES = 8 * 2**20

Role = Literal["gateway", "scheduler", "verifier", "edge-agent"]
Mode = Literal["autoregressive", "server-only", "specedge"]
"""How a session is drafted: not at all, by a drafter on the server side, or on a user's edge."""
MODES: tuple[Mode, ...] = get_args(Mode)
ROLES: tuple[Role, ...] = ("gateway", "scheduler", "verifier", "edge-agent")


class Reason(enum.StrEnum):
    """Why something is refused: a bounded vocabulary, safe to log, used as counter labels
    and sent on the bus (`Rejection.reason`, `PrefillReply.error`, `EdgeRefused.reason`)."""

    MALFORMED = "malformed"
    INVALID = "invalid"
    OVERSIZED = "oversized"
    VERSION = "version"
    IDENTITY_MISMATCH = "identity_mismatch"
    TREE_TOO_LARGE = "tree_too_large"
    TREE_SHAPE = "tree_shape"
    TOKEN_OUT_OF_VOCAB = "token_out_of_vocab"
    PARENT_NOT_BEFORE_CHILD = "parent_not_before_child"
    UNKNOWN_SESSION = "unknown_session"
    STALE_CYCLE = "stale_cycle"
    DUPLICATE_DRAFT = "duplicate_draft"
    DUPLICATE_SESSION = "duplicate_session"
    NOT_THE_SESSIONS_EDGE = "not_the_sessions_edge"
    AHEAD_UNUSED = "ahead_unused"
    PREFILLING = "prefilling"
    NO_CAPACITY = "no_capacity"
    PROMPT_TOO_LONG = "prompt_too_long"
    BAD_PROMPT = "bad_prompt"
    BAD_GRAMMAR = "bad_grammar"
    STATE_UNAVAILABLE = "state_unavailable"
    CUT_OFF = "cut_off"
    TOKENIZER_MISMATCH = "tokenizer_mismatch"
    BAD_ANNOUNCEMENT = "bad_announcement"
    BAD_LEAVE = "bad_leave"
    CANNOT_OPEN = "cannot_open"
    STALE_OR_BAD_RESULT = "stale_or_bad_result"


class ProtocolError(ValueError):
    """A message could not be decoded; `reason` is a short, bounded label for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base of every bus message; `v` is the protocol version of the sender."""

    v: int = PROTOCOL_VERSION


class ServiceAnnouncement(Message, frozen=True, kw_only=True):
    """A service's presence on the bus: sent on start, at each heartbeat and on discovery."""

    role: Role
    instance_id: str
    name: str
    version: str
    heartbeat_s: float
    details: dict[str, str] = {}


class EdgeIdentity(Message, frozen=True, kw_only=True):
    """What an edge that joined with a key is bound to (the auth callout's answer to it)."""

    edge_id: str
    pool: str  # "user" (drafts for `user` only) or "shared"
    user: str = ""


class ServiceLeave(Message, frozen=True, kw_only=True):
    """A service is leaving cleanly (drain on shutdown)."""

    role: Role
    instance_id: str


TREE_BUDGET, TREE_DEPTH, TREE_BRANCH, TREE_BEAMS = 32, 4, 16, 32
"""The default draft tree: nodes at most, levels below the root, candidates per expanded
node, nodes added per draft pass (the scheduler asks edges for a shape; `engine.tree` grows it)."""
MAX_TREES_AHEAD = 2  # trees an edge may send ahead of a session's tree out (the scheduler holds no more)


def tree_depths(parents: list[int]) -> list[int]:
    """The level of each drafted node of a tree (`DraftTreeMsg`'s convention: `parents[i]` is
    -1 for a child of the root, else an earlier index): the root's children are at level 1.
    The one place a tree's depth is computed."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


class DraftTreeMsg(Message, frozen=True, kw_only=True):
    """A draft tree from an edge: drafted tokens below the root and their parents.

    `parents[i]` is -1 (the root: the session's last committed token) or an earlier index.
    `committed_len` is the committed length the tree extends; `cycle` counts verifications.
    No masks, no floats: the receiver rebuilds the attention mask from `parents`.
    A tree *sent ahead* — drafted proactively and sent before the previous cycle's result
    reached the edge — names in `assumed` what it guessed that cycle commits (accepted path
    and bonus); the scheduler verifies it only if the guess was right. An edge may send up
    to `MAX_TREES_AHEAD` such trees in a chain, each guessing the result of the one before.
    """

    session_id: str
    cycle: int
    committed_len: int
    tokens: list[int]
    parents: list[int]
    draft_ms: float = 0.0  # the edge's own time spent drafting this tree (its clock; a duration)
    assumed: list[int] = []  # a tree sent ahead: the tokens it assumes the previous cycle commits

    def problem(self, vocab_size: int, max_nodes: int) -> str | None:
        """Why this tree must be refused (a short reason for counters), or None if well formed."""
        if len(self.tokens) != len(self.parents):
            return Reason.TREE_SHAPE
        if len(self.tokens) > max_nodes or len(self.assumed) > max_nodes + 1:
            return Reason.TREE_TOO_LARGE
        if any(not 0 <= t < vocab_size for t in self.tokens):
            return Reason.TOKEN_OUT_OF_VOCAB
        if any(not -1 <= p < i for i, p in enumerate(self.parents)):
            return Reason.PARENT_NOT_BEFORE_CHILD
        return None


MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default limit)
MAX_GRAMMAR_CHARS = 65536  # a structured output's grammar (the JSON schema, regex or grammar it came from)


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """The target's own log-probability of a committed token — raw: the log-softmax of its
    logits, before temperature or any filter — and of its `top` alternatives, best first.
    `logprob` is None where it is not known (tokens read back from Redis after a lost event).
    `rank` (prompt tokens only: vLLM's `prompt_logprobs` reports it): how many tokens of the
    vocabulary are at least as likely, itself included (1: the most likely)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = []
    rank: int | None = None


class VerifyResult(Message, frozen=True, kw_only=True):
    """The target's verdict on one tree: the accepted drafted tokens, in order, and the bonus
    (and, when the session asks, each one's `TokenLogprob`)."""

    session_id: str
    cycle: int
    committed_len: int  # before this result
    accepted: list[int]
    bonus: int
    logprobs: list[TokenLogprob] = []  # accepted, then bonus (empty unless `SamplingSpec.logprobs` >= 0)
    verify_ms: float = 0.0  # the verifier's forward pass for the batch this tree was in
    next_budget: int = 0  # the scheduler's shape for the next tree (0: keep the current one)
    next_depth: int = 0


GREEDY_BELOW = 1e-5  # a sampling temperature below this decodes greedily (dividing by it would overflow)
GREEDY_TREE_TEMPERATURE = 0.5  # scores draft trees for greedy targets (measured: docs/benchmarks.md)


def tree_temperature(sampling_temperature: float) -> float:
    """The temperature a draft tree's candidates are scored at, for a target sampling at
    `sampling_temperature`: the same (the draft's distribution tempered alike estimates the
    target's draws) within [`GREEDY_TREE_TEMPERATURE`, 1]. Greedy gets the low end: a greedy
    target takes the draft's first choice more often than the draft's own probability of
    it says, so deeper chains of first choices pay (tokens per verification +28% at 32
    nodes on the bundled pair). Only speed depends on it, never the output."""
    return min(1.0, max(GREEDY_TREE_TEMPERATURE, sampling_temperature))


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How the target draws tokens — on the bus and in the engine (`engine.sampling`): a
    temperature below `GREEDY_BELOW` (0, say) is greedy; top_k 0 and top_p 1 disable those
    filters. Out-of-range values are refused when built or decoded."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int = -1  # -1: none; k >= 0: each committed token's logprob and its top k alternatives
    prompt_logprobs: int = -1  # the same for the prompt's tokens, with ranks (completions' `echo`, vLLM's
    # `prompt_logprobs`), kept in Redis for the gateway
    min_p: float = 0.0  # drop tokens less likely than this × the most likely one
    # vLLM's penalties, over each tree node's own path: presence and frequency over the output,
    # repetition over prompt and output (`engine.sampling.adjust_rows`); added to chosen logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    min_tokens: int = 0  # until the output holds this many tokens, `end_ids` cannot be drawn
    end_ids: list[int] = []  # the tokens that would end the output (end of turn, stop_token_ids)
    # structured outputs: an llguidance grammar definition (JSON) every drawn token must follow
    # (`engine.grammar`), with `end_ids` drawable once it is complete; "" for none
    grammar: str = ""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (-1 <= self.logprobs <= MAX_LOGPROBS and -1 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [-1, {MAX_LOGPROBS}]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence and frequency penalties must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if len(self.logit_bias) > 300 or any(not -100 <= b <= 100 or t < 0 for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias: at most 300 token ids, each biased within [-100, 100]")
        if self.min_tokens < 0 or len(self.end_ids) > 64 or any(t < 0 for t in self.end_ids):
            raise ValueError("min_tokens must be >= 0, with at most 64 end ids")
        if len(self.grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"a grammar may be at most {MAX_GRAMMAR_CHARS} characters")

    @property
    def adjusts(self) -> bool:
        """Whether a row's logits change with its path (penalties) or by a bias before drawing."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or (self.min_tokens and self.end_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def tree_temperature(self) -> float:
        return tree_temperature(self.temperature)


class PrefillRequest(Message, frozen=True, kw_only=True):
    """Open a session on a verifier: its prompt (every token committed so far) and sampling."""

    session_id: str
    tokens: list[int]
    sampling: SamplingSpec = SamplingSpec()


class PrefillReply(Message, frozen=True, kw_only=True):
    session_id: str
    committed_len: int = 0
    error: str | None = None  # a short reason when the session could not be opened


class VerifyBatchRequest(Message, frozen=True, kw_only=True):
    """Trees of several sessions for one forward pass."""

    batch_id: str
    trees: list[DraftTreeMsg]


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    reason: str  # bounded vocabulary, used as a counter label


class VerifyBatchReply(Message, frozen=True, kw_only=True):
    batch_id: str
    results: list[VerifyResult] = []
    rejected: list[Rejection] = []
    forward_ms: float = 0.0


class DraftAssign(Message, frozen=True, kw_only=True):
    """Draft for a session: all its committed tokens and the tree shape to grow."""

    session_id: str
    tokens: list[int]
    scheduler: str  # the scheduler instance that collects this session's drafts
    budget: int = TREE_BUDGET
    depth: int = TREE_DEPTH
    branch: int = TREE_BRANCH
    beams: int = TREE_BEAMS
    temperature: float = 1.0  # candidates scored at this temperature (`tree_temperature`)
    cycle: int = 0  # the session's next cycle (0 for a new session; more when it moves to this edge)
    grammar: str = ""  # the session's structured output (`SamplingSpec.grammar`): drafts follow it too
    end_ids: list[int] = []  # with a grammar: the tokens that end the output
    prompt_len: int | None = None  # where the output starts in `tokens` (None: all of them are prompt)


class SessionOpen(Message, frozen=True, kw_only=True):
    """A new generation: prompt tokens, sampling and when to stop."""

    session_id: str
    tokens: list[int]
    sampling: SamplingSpec = SamplingSpec()
    max_new_tokens: int
    eos_ids: list[int] = []
    mode: Mode = "specedge"
    user: str = ""  # the API key's user: their own edge drafts for them first


class SessionOpened(Message, frozen=True, kw_only=True):
    session_id: str
    verifier: str = ""
    edge: str | None = None
    error: str | None = None
    engine: str = ""  # the verifier's attention backend and dtype, e.g. "exact-bfloat16" ("" if unknown)


def cut_output(tokens: list[int], eos_ids: set[int] | list[int], max_tokens: int) -> tuple[list[int], str | None]:
    """What a caller gets of newly committed `tokens` — up to the first end-of-turn, at most
    `max_tokens` (what is left of the request's) — and the finish reason if that ends the
    output. The scheduler cuts its events so; the gateway cuts what it reads back from Redis."""
    keep: list[int] = []
    for token in tokens:
        keep.append(token)
        if token in eos_ids:
            return keep, "stop"
        if len(keep) >= max_tokens:
            return keep, "length"
    return keep, None


class TokenEvent(Message, frozen=True, kw_only=True):
    """Newly committed output tokens; `index` is the output position of the first one.

    An event with tokens is one verification: `drafted` tree nodes were checked (0: a
    server step, one autoregressive token) and the target accepted `accepted` of them
    (`tokens` may be fewer than accepted + 1 when the generation stops inside the cycle).
    """

    session_id: str
    index: int
    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end of turn), "length", or "error" (then `error` says why)
    error: str | None = None
    drafted: int = 0
    accepted: int = 0
    logprobs: list[TokenLogprob] = []  # one per token of `tokens` when the session asked for them


class EdgeRefused(Message, frozen=True, kw_only=True):
    """To one edge agent: it will get no sessions, and why (e.g. its tokenizer differs)."""

    reason: str  # bounded vocabulary
    message: str


class StatsRequest(Message, frozen=True, kw_only=True):
    """Ask a service for its counters, and its forward-pass spans that started after `since`
    (the replier's monotonic clock) or, with `window_s`, in its last `window_s` seconds."""

    since: float = 0.0
    window_s: float = 0.0  # > 0: only spans that started within this many seconds before the reply

    def cutoff(self, now: float) -> float:
        """The earliest span start to report, on the replier's clock (`now`)."""
        return max(self.since, now - self.window_s) if self.window_s > 0 else self.since


MAX_SPANS = 2000  # spans per stats reply: keeps it well under the message size limit


def spans_since(spans, since: float) -> list[list[float]]:
    """The most recent `MAX_SPANS` spans that started after `since`."""
    return [s for s in spans if s[0] >= since][-MAX_SPANS:]


def union_s(spans: list[list[float]]) -> float:
    """Time covered by [start, end] spans, overlaps counted once (a service's busy time)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class ServiceStats(Message, frozen=True, kw_only=True):
    """A service's counters since it started (reply to a stats request): busy seconds in
    forward passes, passes, proactive hits, … — names are the service's own."""

    instance_id: str
    counters: dict[str, float] = {}
    spans: list[list[float]] = []  # recent forward passes: [start, end] on the host's monotonic clock
    now: float = 0.0  # the host's monotonic clock when it replied: aligns `spans` with another host's clock


class CloseSession(Message, frozen=True, kw_only=True):
    session_id: str


M = TypeVar("M", bound=Message)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[M], max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Bytes from the bus -> a validated message of type `kind`, or `ProtocolError`."""
    if len(data) > max_bytes:
        raise ProtocolError(Reason.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        message = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(Reason.INVALID, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(Reason.MALFORMED, str(exc)) from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(Reason.VERSION, f"got v{message.v}, speak v{PROTOCOL_VERSION}")
    return message


class Rejections:
    """Refused messages, counted by reason and logged without their contents."""

    def __init__(self, logger: logging.Logger, on_reject: Callable[[str], None] | None = None) -> None:
        """`on_reject(reason)`: also count it elsewhere (a metric)."""
        self.counts: Counter[str] = Counter()
        self._log = logger
        self._on_reject = on_reject

    def __call__(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        if self._on_reject is not None:
            self._on_reject(reason)
        self._log.warning("rejected %s: %s (%d so far)", what, reason, self.counts[reason])

    def decode(self, data: bytes, kind: type[M], what: str) -> M | None:
        """`decode()`, counting and logging a refusal instead of raising (None then)."""
        try:
            return decode(data, kind)
        except ProtocolError as exc:
            self(exc.reason, what)
            return None
