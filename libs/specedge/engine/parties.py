"""The two parties of speculative decoding: the drafter (edge) and the verifier (server).

`Verifier` holds the target model and per-session caches: it prefills a prompt, verifies
a batch of draft trees from many sessions in one forward pass, applies the acceptance
rule and keeps only the accepted path's cache entries. `Drafter` holds the draft model:
it grows draft trees, and while a tree is out for verification it drafts the next one
proactively from its best guess of the result — pass by pass, so the work can be
abandoned at any moment — reusing it on a hit and dropping it on a miss.

They exchange only `protocol.DraftTreeMsg` and `protocol.VerifyResult`: token ids and
parent indices one way, accepted token ids and the bonus token the other. Neither knows
how the messages travel (in process, with a simulated delay, or over NATS).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from specedge.engine.acceptance import accept_batch
from specedge.engine.backends import DEFAULT_ATTENTION, make_runner
from specedge.engine.grammar import Constraint, GrammarVocab, compile_for
from specedge.engine.runner import CacheFullError, ForwardRequest, SessionTooLongError
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import DraftTree, TreeJob, TreeParams, grow_trees
from specedge.protocol import MAX_TREES_AHEAD, DraftTreeMsg, Reason, TokenLogprob, VerifyResult

log = logging.getLogger(__name__)


class StaleMessageError(ValueError):
    """A tree or result for another cycle or committed length than the session's current one."""


@dataclass
class _TargetSession:
    committed: list[int]
    params: SamplingSpec
    cycle: int = 0
    prompt_len: int = 0  # where the output starts in `committed` (penalties look at it)
    to_prefill: list[int] = dataclasses.field(default_factory=list)  # prompt tokens not in the cache yet
    constraint: Constraint | None = None  # its structured output's grammar, after the committed output
    prompt_logprobs: list[TokenLogprob] | None = None  # while asked for: the prompt's, as far as prefilled


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int, ranks: bool = False) -> list[TokenLogprob]:
    """Raw log-probabilities (log-softmax of the logits, in float32) of `tokens`, one per row
    of `logits`, each with its row's `top` most likely tokens and, with `ranks`, its rank
    (vLLM's: the tokens at least as likely, itself included)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs[torch.arange(len(tokens), device=logits.device), torch.tensor(tokens, device=logits.device)]
    rank = (logprobs >= chosen[:, None]).sum(dim=-1).tolist() if ranks else [None] * len(tokens)
    values, ids = logprobs.topk(top, dim=-1) if top else (None, None)
    tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)] if top \
        else [[] for _ in tokens]
    return [TokenLogprob(t, c, a, r) for t, c, a, r in zip(tokens, chosen.tolist(), tops, rank, strict=True)]


def verifier_runner(model: PreTrainedModel, max_sessions: int, max_len: int, max_tree_nodes: int, attention: str,
                    kv_tokens: int | None):
    """The target's runner for sessions of up to `max_len` committed tokens and trees of
    `max_tree_nodes` (room for the tree beyond `max_len`)."""
    scratch = max(max_tree_nodes + 1, 256)
    return make_runner(model, attention=attention, max_sessions=max_sessions, max_len=max_len + scratch,
                       max_scratch=scratch, kv_tokens=kv_tokens)


def follow_verifier(model: PreTrainedModel, max_sessions: int = 8, max_len: int = 4096, max_tree_nodes: int = 256,
                    attention: str = DEFAULT_ATTENTION, kv_tokens: int | None = None) -> int:
    """A rank other than 0 of a tensor-parallel verifier: the same runner, sharded, making
    every call rank 0's `Verifier` makes, until it stops (`Verifier.stop_followers`)."""
    from specedge.engine import tensor_parallel as tp  # noqa: PLC0415

    runner = verifier_runner(model, max_sessions, max_len, max_tree_nodes, attention, kv_tokens)
    tp.parallelize(runner, model)
    return tp.follow(runner)


class Verifier:
    """Target-side: prefill, batched tree verification, acceptance, cache compaction.

    A prompt is prefilled in chunks that ride along with verification passes (`step`):
    `begin` admits a session without a forward pass, and each pass carries up to
    `prefill_budget` prompt tokens of sessions still prefilling, so a long prompt never
    holds up other sessions' verifications by more than one chunk."""

    def __init__(self, model: PreTrainedModel, max_sessions: int = 8, max_len: int = 4096,
                 max_tree_nodes: int = 256, attention: str = DEFAULT_ATTENTION, kv_tokens: int | None = None,
                 tensor_parallel: bool = False, grammar_vocab: GrammarVocab | None = None) -> None:
        """`max_len`: the most committed tokens (prompt + output) a session may reach;
        `attention` and `kv_tokens`: the runner (`backends.make_runner`). `tensor_parallel`:
        this is rank 0 of a `torch.distributed` group whose other ranks run
        `follow_verifier` with the same arguments (`tensor_parallel`). `grammar_vocab`: the
        target's tokenizer for structured outputs (`grammar.grammar_vocab`; without it a
        session with a grammar is refused)."""
        self.runner = verifier_runner(model, max_sessions, max_len, max_tree_nodes, attention, kv_tokens)
        if tensor_parallel:
            from specedge.engine import tensor_parallel as tp  # noqa: PLC0415

            tp.parallelize(self.runner, model)
            self.runner = tp.LeaderRunner(self.runner)
        self.vocab_size = model.config.vocab_size
        self.grammar_vocab = grammar_vocab
        self.max_tree_nodes = max_tree_nodes
        self.prefill_chunk = self.runner.prefill_chunk
        self.sessions: dict[str, _TargetSession] = {}
        self.forward_passes = 0
        self.busy_s = 0.0  # time spent in passes that verify trees

    def begin(self, session_id: str, prompt: list[int], params: SamplingSpec, cycle: int = 0,
              prompt_len: int | None = None) -> None:
        """Admit a session: its cache is reserved and its prompt (all tokens but the last,
        which becomes the first tree's root) queued for prefill by later passes. To resume
        a session elsewhere, `prompt` is every committed token and `cycle` its cycle."""
        if not prompt:
            raise ValueError("the prompt must have at least one token")
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open")
        if len(prompt) + self.max_tree_nodes + 1 > self.runner.max_len:
            raise SessionTooLongError(f"a prompt of {len(prompt)} tokens is longer than a session may be")
        if not self.runner.can_hold(len(prompt)):
            raise CacheFullError(f"no room for a session of {len(prompt)} tokens")
        prompt_len = len(prompt) if prompt_len is None else prompt_len
        constraint = compile_for(self.grammar_vocab, params.grammar, params.end_ids, self.vocab_size)
        if constraint is not None:
            constraint.advance(prompt[prompt_len:])  # a session resumed here: its output so far
        self.runner.open(session_id)
        self.runner.reserve(session_id, len(prompt))
        self.sessions[session_id] = _TargetSession(list(prompt), params, cycle, to_prefill=list(prompt[:-1]),
                                                   prompt_len=prompt_len, constraint=constraint)
        if params.prompt_logprobs >= 0 and cycle == 0:  # the first token has none: nothing comes before it
            self.sessions[session_id].prompt_logprobs = [TokenLogprob(prompt[0], None)]

    def take_prompt_logprobs(self, session_id: str) -> list[TokenLogprob] | None:
        """A prefilled session's prompt logprobs (`SamplingSpec.prompt_logprobs`), once: one
        per prompt token (the first's None), or None (not asked, not prefilled yet, taken)."""
        session = self.sessions.get(session_id)
        if session is None or session.to_prefill or session.prompt_logprobs is None:
            return None
        entries, session.prompt_logprobs = session.prompt_logprobs, None
        return entries

    def prefilling(self, session_id: str) -> bool:
        """Whether a session still has prompt tokens to prefill."""
        session = self.sessions.get(session_id)
        return session is not None and bool(session.to_prefill)

    def open(self, session_id: str, prompt: list[int], params: SamplingSpec, cycle: int = 0,
             prompt_len: int | None = None) -> None:
        """`begin`, then prefill the whole prompt now, chunk by chunk. To resume a session,
        `prompt` is every committed token and `prompt_len` where its output starts."""
        self.begin(session_id, prompt, params, cycle, prompt_len)
        try:
            while self.prefilling(session_id):
                self.step([], prefill_budget=self.prefill_chunk)
        except Exception:
            self.close(session_id)
            raise

    def close(self, session_id: str) -> None:
        self.runner.evict(session_id)
        self.sessions.pop(session_id, None)

    def stop_followers(self) -> None:
        """Tensor parallel: let the other ranks' `follow_verifier` return."""
        if hasattr(self.runner, "stop_followers"):
            self.runner.stop_followers()

    @property
    def free_tokens(self) -> int:
        """Tokens the cache can still take for new sessions (what the verifier announces)."""
        return self.runner.free_tokens

    def problem(self, tree: DraftTreeMsg) -> str | None:
        """Why this tree cannot be verified now (a short reason), or None."""
        session = self.sessions.get(tree.session_id)
        if session is None:
            return Reason.UNKNOWN_SESSION
        if session.to_prefill:
            return Reason.PREFILLING
        if (tree.cycle, tree.committed_len) != (session.cycle, len(session.committed)):
            return Reason.STALE_CYCLE
        return tree.problem(self.vocab_size, self.max_tree_nodes)

    def verify(self, trees: list[DraftTreeMsg]) -> list[VerifyResult]:
        """Verify the trees of several sessions in one target forward pass (all must be valid)."""
        return self.step(trees)

    def step(self, trees: list[DraftTreeMsg], prefill_budget: int = 0) -> list[VerifyResult]:
        """One pass: verify `trees` (all must be valid) and prefill up to `prefill_budget`
        prompt tokens of sessions still prefilling (oldest first, a chunk at most each)."""
        if len({t.session_id for t in trees}) != len(trees):
            raise ValueError("one tree per session per batch")
        for tree in trees:
            if (reason := self.problem(tree)) == Reason.STALE_CYCLE:
                raise StaleMessageError(f"tree for cycle {tree.cycle} at length {tree.committed_len} is stale")
            if reason is not None:
                raise ValueError(f"malformed tree: {reason}")
        requests = [
            ForwardRequest(t.session_id, [self.sessions[t.session_id].committed[-1], *t.tokens],
                           [-1, *(p + 1 for p in t.parents)])
            for t in trees
        ]
        chunks, verified = [], {t.session_id for t in trees}
        for session_id, session in self.sessions.items():
            if prefill_budget <= 0:
                break
            if session.to_prefill and session_id not in verified:
                chunk = session.to_prefill[: min(prefill_budget, self.prefill_chunk)]
                chunks.append(ForwardRequest(session_id, chunk, list(range(-1, len(chunk) - 1))))
                prefill_budget -= len(chunk)
        if not requests and not chunks:
            return []
        started = time.perf_counter()
        scored = any(self.sessions[c.session_id].prompt_logprobs is not None for c in chunks)
        logits = self.runner.forward(requests + chunks, packed=True, logits_of=None if scored else len(requests))
        self.forward_passes += 1
        row = sum(len(r.tokens) for r in requests)
        for chunk in chunks:
            self.runner.commit(chunk.session_id, list(range(len(chunk.tokens))))
            session = self.sessions[chunk.session_id]
            session.to_prefill = session.to_prefill[len(chunk.tokens) :]
            if session.prompt_logprobs is not None:  # each row scores the prompt token after it
                done = len(session.prompt_logprobs)
                session.prompt_logprobs += token_logprobs(logits[row : row + len(chunk.tokens)],
                                                          session.committed[done : done + len(chunk.tokens)],
                                                          session.params.prompt_logprobs, ranks=True)
            row += len(chunk.tokens)
        logits = logits[: sum(len(r.tokens) for r in requests)]
        if not requests:
            return []
        sessions = [self.sessions[t.session_id] for t in trees]
        outcomes = accept_batch([(t.tokens, t.parents) for t in trees], logits, [s.params for s in sessions],
                                [len(s.committed) - 1 for s in sessions],
                                [(s.committed[:s.prompt_len], s.committed[s.prompt_len:]) if s.params.adjusts else None
                                 for s in sessions], _grammar_masks(trees, sessions, logits))
        results, first_row = [], 0
        for tree, session, (path, bonus) in zip(trees, sessions, outcomes, strict=True):
            self.runner.commit(tree.session_id, [0, *(i + 1 for i in path)])  # scratch: the root, then the nodes
            accepted = [tree.tokens[i] for i in path]
            logprobs = []
            if session.params.logprobs >= 0:  # each token was drawn from its parent's row: the root's, then the path's
                rows = [first_row, *(first_row + i + 1 for i in path)]
                logprobs = token_logprobs(logits[rows], [*accepted, bonus], session.params.logprobs)
            first_row += 1 + len(tree.tokens)
            results.append(VerifyResult(session_id=tree.session_id, cycle=tree.cycle,
                                        committed_len=len(session.committed), accepted=accepted, bonus=bonus,
                                        logprobs=logprobs))
            session.committed += [*accepted, bonus]
            session.cycle += 1
            if session.constraint is not None:
                session.constraint.advance([*accepted, bonus])
        self.busy_s += time.perf_counter() - started
        return results


def _grammar_masks(trees: list[DraftTreeMsg], sessions: list[_TargetSession], logits: torch.Tensor
                   ) -> torch.Tensor | None:
    """What each row of a pass may draw (`grammar.tree_masks`), or None when no session has a grammar."""
    if all(s.constraint is None for s in sessions):
        return None
    vocab = logits.shape[-1]
    return torch.cat([s.constraint.tree_masks(t.tokens, t.parents) if s.constraint is not None
                      else torch.ones(1 + len(t.tokens), vocab, dtype=torch.bool)
                      for t, s in zip(trees, sessions, strict=True)]).to(logits.device)


@dataclass
class BuiltTree:
    """A draft tree with where its nodes sit in the drafter's scratch cache."""

    tree: DraftTree
    root_scratch: int
    node_scratch: list[int]


@dataclass
class _Proactive:
    """A tree being drafted ahead, from a guessed result of the tree before it."""

    assumed: list[int]      # the guessed result of the tree before it: accepted tokens and bonus
    cycle: int              # the cycle this tree is for, and the committed length it extends
    committed_len: int
    job: TreeJob
    steps: Iterator[int]
    done: bool = False
    sent: bool = False  # sent ahead of the result it guesses (`tree_ahead`)


@dataclass
class _DraftSession:
    committed: list[int]
    params: TreeParams
    cycle: int = 0
    current: BuiltTree | None = None
    # Trees drafted ahead, each from a guess of the previous one's result (the first: of
    # `current`'s); a tree joins the chain only once the one before it was sent.
    ahead: list[_Proactive] = dataclasses.field(default_factory=list)
    current_sent: bool = False  # `current` already went out (sent ahead, and its guess was right)
    hit_rate: float = 0.5  # recent proactive hits (exponentially weighted), for backing off
    # how often the target's token was the draft's first choice (exponentially weighted over
    # cycles), for scoring trees below temperature 1 only where that pays
    first_choice_rate: float = 0.75
    constraint: Constraint | None = None  # its structured output: trees hold only what the grammar allows


@dataclass
class DrafterStats:
    """Counters since the drafter started (draft passes include proactive ones)."""

    forward_passes: int = 0
    busy_s: float = 0.0  # time in draft forward passes (proactive included)
    proactive_hits: int = 0
    proactive_attempts: int = 0


class Drafter:
    """Edge-side: draft trees with the draft model, and proactive drafting while waiting."""

    def __init__(self, model: PreTrainedModel, params: TreeParams, max_sessions: int = 8,
                 max_len: int = 4096, max_ahead: int = MAX_TREES_AHEAD, attention: str = DEFAULT_ATTENTION,
                 grammar_vocab: GrammarVocab | None = None) -> None:
        """`max_len`: the most committed tokens (prompt + output) a session may reach;
        `max_ahead`: how many trees a session drafts ahead of its tree out for verification
        (beyond the first only when each is sent ahead: `tree_ahead`); `grammar_vocab`: the
        draft's tokenizer, to draft structured outputs by their grammar (without it they
        are drafted freely: still exact, less often accepted)."""
        self.max_ahead = max(1, max_ahead)
        scratch = max((1 + self.max_ahead) * (params.depth * params.beams + 2), 256)  # the tree out + those ahead
        self.runner = make_runner(model, attention=attention, max_sessions=max_sessions, max_len=max_len + scratch,
                                  max_scratch=scratch)
        self.params = params
        self.grammar_vocab = grammar_vocab
        self.vocab_size = model.config.vocab_size
        self.sessions: dict[str, _DraftSession] = {}
        self.stats = DrafterStats()

    def open(self, session_id: str, prompt: list[int], params: TreeParams | None = None, cycle: int = 0,
             grammar: str = "", end_ids: list[int] | None = None, prompt_len: int | None = None) -> None:
        """Prefill the prompt but its last token; `params` (default: the drafter's) shape this session's trees;
        `cycle`: the session's next cycle (more than 0 when it moves here from another drafter);
        `grammar` and `end_ids`: its structured output, with its output so far from `prompt_len` on."""
        params = params or self.params
        if params.depth * params.beams > self.params.depth * self.params.beams:
            raise ValueError("tree parameters beyond what this drafter's cache was sized for")
        constraint = None
        if grammar and self.grammar_vocab is not None:
            try:
                constraint = compile_for(self.grammar_vocab, grammar, end_ids or [], self.vocab_size)
                constraint.advance(prompt[len(prompt) if prompt_len is None else prompt_len :])
            except ValueError as exc:  # drafts unmasked: still exact (the verifier masks), less often accepted
                log.warning("session %s drafts without its grammar: %s", session_id[:16], exc)
                constraint = None
        self.runner.open(session_id)
        self.runner.prefill(session_id, prompt[:-1])
        self.sessions[session_id] = _DraftSession(list(prompt), params, cycle=cycle, constraint=constraint)

    def close(self, session_id: str) -> None:
        self.runner.evict(session_id)
        self.sessions.pop(session_id, None)

    def reshape(self, session_id: str, budget: int, depth: int) -> None:
        """Shape this session's next fresh trees (the scheduler's choice), within the cache
        this drafter was sized for; a tree already drafted ahead keeps its shape."""
        session = self.sessions[session_id]
        depth = max(1, min(depth, self.params.depth * self.params.beams // max(1, session.params.beams)))
        session.params = dataclasses.replace(session.params, budget=max(0, budget), depth=depth)

    SHARPEN_MIN_FIRST_CHOICE = 0.6  # below this a session's trees are scored at temperature 1

    def tree_params(self, session_id: str) -> TreeParams:
        """The shape of this session's next tree: its params, but scored at temperature 1
        (not sharper) while the target takes the draft's first choice less often than
        `SHARPEN_MIN_FIRST_CHOICE` — there deeper chains of first choices do not pay (measured
        on the bundled pair: ≥ 0.7 on the short Spec-Bench categories, ≤ 0.5 on the long
        out-of-domain ones)."""
        session = self.sessions[session_id]
        if session.params.temperature < 1 and session.first_choice_rate < self.SHARPEN_MIN_FIRST_CHOICE:
            return dataclasses.replace(session.params, temperature=1.0)
        return session.params

    def _job(self, session_id: str, root: int, root_parent: int, assumed: list[int] = (),
             temperature: float | None = None) -> TreeJob:
        """A tree to grow below `root`, past the committed tokens and then `assumed` ones."""
        constraint = self.sessions[session_id].constraint
        return TreeJob(session_id, root, root_parent, temperature=temperature, constraint=constraint,
                       root_state=constraint.after_path(list(assumed)) if constraint is not None else None)

    def _grow(self, session_id: str, root: int, root_parent: int,
              assumed: list[int]) -> tuple[TreeJob, Iterator[int]]:
        job = self._job(session_id, root, root_parent, assumed)
        return job, grow_trees(self.runner, [job], self.tree_params(session_id))

    def _counted(self, steps: Iterator[int]) -> Iterator[int]:
        while True:
            started = time.perf_counter()
            step = next(steps, None)
            self.stats.busy_s += time.perf_counter() - started
            if step is None:
                return
            self.stats.forward_passes += 1
            yield step

    @staticmethod
    def _built(job: TreeJob) -> BuiltTree:
        tree = job.tree()
        return BuiltTree(tree, job.root_scratch, [job.scratch_index(g) for g in tree.grown_index])

    def draft(self, session_id: str) -> DraftTreeMsg:
        """The tree to send now: the proactive one if it was a hit, else a fresh one."""
        return self.draft_many([session_id])[0]

    def draft_many(self, session_ids: list[str]) -> list[DraftTreeMsg]:
        """`draft` for several sessions; fresh trees of the same shape grow together, one
        batched draft pass per level (how a server-side drafter serves a batch)."""
        by_shape: dict[TreeParams, list[TreeJob]] = {}
        for session_id in session_ids:
            session = self.sessions[session_id]
            if session.current is None:
                params = self.tree_params(session_id)  # sessions of one shape share passes, whatever their temperature
                job = self._job(session_id, session.committed[-1], -1, temperature=params.temperature)
                by_shape.setdefault(dataclasses.replace(params, temperature=1.0), []).append(job)
        for params, jobs in by_shape.items():
            for _ in self._counted(grow_trees(self.runner, jobs, params)):
                pass
            for job in jobs:
                self.sessions[job.session_id].current = self._built(job)
        trees = []
        for session_id in session_ids:
            session = self.sessions[session_id]
            tree = session.current.tree
            trees.append(DraftTreeMsg(session_id=session_id, cycle=session.cycle,
                                      committed_len=len(session.committed), tokens=list(tree.tokens),
                                      parents=list(tree.parents)))
        return trees

    PROACTIVE_MIN_HIT_RATE = 0.1  # below this a session drafts ahead only every PROACTIVE_PROBE-th cycle
    PROACTIVE_PROBE = 4
    CHAIN_MIN_HIT_RATE = 0.5  # below this a session drafts one tree ahead, not a chain

    def start_proactive(self, session_id: str) -> bool:
        """Begin drafting the next tree from the guessed result of the last tree there is
        (the current one, or the last drafted ahead once it was sent) — unless the chain is
        full, its last tree is unfinished or unsent, or this session's guesses keep missing
        (the draft tracks the target poorly here): then only every `PROACTIVE_PROBE`-th
        cycle, to notice when they start hitting again; a chain (a tree after a tree
        ahead) only while they hit at least `CHAIN_MIN_HIT_RATE` of the time. The work saved is the edge's (its
        power, or a CPU it shares), never the output's. Returns whether a tree was begun."""
        session = self.sessions[session_id]
        if session.current is None or len(session.ahead) >= self.max_ahead:
            return False
        if session.ahead and not (session.ahead[-1].done and session.ahead[-1].sent):
            return False
        if session.hit_rate < self.PROACTIVE_MIN_HIT_RATE and session.cycle % self.PROACTIVE_PROBE:
            return False
        if session.ahead and session.hit_rate < self.CHAIN_MIN_HIT_RATE:
            return False  # a second tree ahead is used only if two guesses in a row hit
        if session.ahead:
            last = session.ahead[-1]
            built, cycle, committed_len = self._built(last.job), last.cycle, last.committed_len
        else:
            built, cycle, committed_len = session.current, session.cycle, len(session.committed)
        path, bonus = built.tree.guess_next_root()
        if bonus < 0:
            return False
        leaf_scratch = built.node_scratch[path[-1]] if path else built.root_scratch
        assumed = [*(built.tree.tokens[i] for i in path), bonus]
        job, steps = self._grow(session_id, bonus, leaf_scratch,
                                [*(t for later in session.ahead for t in later.assumed), *assumed])
        session.ahead.append(_Proactive(assumed, cycle + 1, committed_len + len(assumed), job, self._counted(steps)))
        self.stats.proactive_attempts += 1
        return True

    def proactive_step(self, session_id: str) -> bool:
        """Run one more pass of the tree being drafted ahead; False when there is none to run."""
        ahead = self.sessions[session_id].ahead
        if not ahead or ahead[-1].done:
            return False
        proactive = ahead[-1]
        if next(proactive.steps, None) is None:
            proactive.done = True
        return not proactive.done

    def tree_ahead(self, session_id: str) -> DraftTreeMsg | None:
        """The last tree drafted ahead, finished, as a message to send before the result it
        guesses arrives — naming the outcome it assumes — or None (not finished, already
        sent, or none). The scheduler verifies it only if the guess comes true, and then
        `on_result` does not ask for it again (`current_sent`)."""
        ahead = self.sessions[session_id].ahead
        if not ahead or not ahead[-1].done or ahead[-1].sent:
            return None
        proactive = ahead[-1]
        proactive.sent = True
        tree = proactive.job.tree()
        return DraftTreeMsg(session_id=session_id, cycle=proactive.cycle, committed_len=proactive.committed_len,
                            tokens=list(tree.tokens), parents=list(tree.parents), assumed=list(proactive.assumed))

    def on_result(self, result: VerifyResult) -> bool:
        """Apply a verification result; returns whether the first tree drafted ahead guessed
        it. On a hit that tree becomes current and the rest of the chain stays (its scratch
        nodes renumbered); on a miss the whole chain is dropped."""
        session = self.sessions[result.session_id]
        if (result.cycle, result.committed_len) != (session.cycle, len(session.committed)):
            raise StaleMessageError(f"result for cycle {result.cycle}; session is at cycle {session.cycle}")
        built = session.current
        path = _walk(built.tree, result.accepted)
        scratch_path = [built.root_scratch, *(built.node_scratch[i] for i in path)]
        session.first_choice_rate = 0.75 * session.first_choice_rate + 0.25 * _first_choices(
            built.tree, path, result.bonus)
        chain, session.ahead = session.ahead, []
        proactive = chain[0] if chain else None
        hit = proactive is not None and proactive.assumed == [*result.accepted, result.bonus]  # tokens name the path
        if proactive is not None:
            session.hit_rate = 0.8 * session.hit_rate + 0.2 * hit
        session.committed += [*result.accepted, result.bonus]
        session.cycle += 1
        if session.constraint is not None:
            try:
                session.constraint.advance([*result.accepted, result.bonus])
            except ValueError:  # the target's tokens break the grammar as this drafter reads it: draft freely
                session.constraint = None
        if not hit:
            self.runner.commit(result.session_id, scratch_path)
            session.current, session.current_sent = None, False
            return False
        for _ in proactive.steps:  # finish the tree if the result came before it was done
            pass
        nxt = self._built(proactive.job)
        keep = [nxt.root_scratch, *nxt.node_scratch]
        # Later trees of the chain keep every node they grew (a tree still growing appends
        # after its last one); one not begun yet hangs below a node about to move: dropped.
        rest, offsets = list(itertools.takewhile(lambda later: later.job.growth is not None, chain[1:])), []
        for later in rest:
            offsets.append(len(keep))
            keep += range(later.job.root_scratch, later.job.root_scratch + 1 + len(later.job.growth.tree))
        self.runner.commit(result.session_id, scratch_path, keep)
        for later, offset in zip(rest, offsets, strict=True):
            later.job.root_scratch = offset
        session.current = BuiltTree(nxt.tree, 0, list(range(1, len(nxt.node_scratch) + 1)))
        session.current_sent = proactive.sent
        session.ahead = rest
        self.stats.proactive_hits += 1
        return True


def _first_choices(tree: DraftTree, path: list[int], bonus: int) -> float:
    """The share of a cycle's target tokens (the accepted path, then the bonus) that were the
    draft's first choice where they were drawn."""
    firsts = [tree.root_next_token, *(tree.next_tokens[node] for node in path)]
    drawn = [*(tree.tokens[node] for node in path), bonus]
    return sum(f == d for f, d in zip(firsts, drawn, strict=True)) / len(drawn)


def _walk(tree: DraftTree, accepted: list[int]) -> list[int]:
    """The drafted node indices whose tokens are `accepted`, from the root down."""
    children = {}
    for i in range(len(tree) - 1, -1, -1):
        children[(tree.parents[i], tree.tokens[i])] = i
    path, node = [], -1
    for token in accepted:
        node = children.get((node, token))
        if node is None:
            raise ValueError("the result accepts tokens that are not a path of the tree")
        path.append(node)
    return path
