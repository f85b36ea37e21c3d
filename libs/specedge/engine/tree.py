"""Budgeted best-first draft trees (SpecExec style), grown one draft forward pass at a time.

Start at the root (the last committed token). Every node that has been through the draft
model offers its top-`branch` next tokens as candidates, scored by cumulative draft
log-probability at the tree's `temperature` (below 1 the draft's first choices weigh more
and trees grow deeper: `protocol.tree_temperature`). Each pass takes the best `beams`
candidates (never deeper than `depth`, and none that can no longer make the best
`budget`), runs them through the draft model in one forward pass — which computes their
KV entries and their own candidates — and repeats, at most `depth` passes after the
root's. The tree is then the best `budget` nodes by score; scores only fall along a
path, so that set contains every kept node's ancestors. Every kept node has its draft KV
computed, the last level included, so nothing is missing whichever path the target
accepts; and the last level's logits give proactive drafting its next token.

With a structured output, a node is drafted only if the session's grammar allows it along
its path (`grammar.Constraint`): the target would never draw anything else.

Candidate selection is the pure `TreeGrowth` class; `grow_trees` drives it with a
`ModelRunner` for any number of sessions at once (one batched forward per pass).
The output is compact: drafted token ids and parent indices (-1 = the root), parents first.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from specedge.engine.grammar import Constraint, State
from specedge.engine.runner import ForwardRequest, ModelRunner
from specedge.protocol import TREE_BEAMS, TREE_BRANCH, TREE_BUDGET, TREE_DEPTH, tree_depths


@dataclass(frozen=True)
class TreeParams:
    budget: int = TREE_BUDGET  # drafted nodes at most
    depth: int = TREE_DEPTH  # levels below the root at most (= draft passes after the root's)
    branch: int = TREE_BRANCH  # candidates per expanded node (top-k)
    beams: int = TREE_BEAMS  # nodes added per pass at most
    temperature: float = 1.0  # candidates scored by log-softmax(logits / temperature); < 1 deepens

    def __post_init__(self) -> None:
        if min(self.budget, self.depth, self.branch, self.beams) < 0:
            raise ValueError("tree parameters must be >= 0")
        if not 0.05 <= self.temperature <= 4:
            raise ValueError("tree temperature must be in [0.05, 4]")


@dataclass
class DraftTree:
    """Drafted nodes below a root: tokens, parents (-1 = root, else an earlier index), scores."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)  # draft argmax after each node
    root_next_token: int = -1
    grown_index: list[int] = field(default_factory=list)   # index in the growth (scratch order)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        return tree_depths(self.parents)

    def likely_path(self) -> list[int]:
        """The draft's best guess at what the target accepts: follow the best-scored child."""
        best_child: dict[int, int] = {}
        for i, p in enumerate(self.parents):
            if p not in best_child or self.scores[i] > self.scores[best_child[p]]:
                best_child[p] = i
        path, node = [], -1
        while node in best_child:
            node = best_child[node]
            path.append(node)
        return path

    def guess_next_root(self) -> tuple[list[int], int]:
        """(guessed accepted path, guessed bonus token) for proactive drafting."""
        path = self.likely_path()
        return path, (self.next_tokens[path[-1]] if path else self.root_next_token)


class TreeGrowth:
    """Pure candidate bookkeeping for one tree: which nodes to add next."""

    def __init__(self, params: TreeParams) -> None:
        self.params = params
        self.tree = DraftTree()
        self._heap: list[tuple[float, int, int, int]] = []  # (-score, tiebreak, parent, token)
        self._depth: list[int] = []
        self._counter = 0

    def offer(self, parent: int, logprobs: torch.Tensor) -> None:
        """Record the candidates after `parent` (-1 = root) from its draft log-probs [V]."""
        top = torch.topk(logprobs, min(self.params.branch, logprobs.shape[-1]))
        self.offer_top(parent, top.values.tolist(), top.indices.tolist())

    def offer_top(self, parent: int, values: list[float], tokens: list[int]) -> None:
        """`offer` with the top-`branch` log-probs and their tokens already on the host (a
        candidate of log-prob -inf, one a grammar forbids, is not offered)."""
        parent_depth = self._depth[parent] if parent >= 0 else 0
        if parent >= 0:
            self.tree.next_tokens[parent] = tokens[0]
        else:
            self.tree.root_next_token = tokens[0] if tokens else -1
        if parent_depth >= self.params.depth:
            return
        base = self.tree.scores[parent] if parent >= 0 else 0.0
        for lp, token in zip(values, tokens, strict=True):
            if lp == float("-inf"):
                continue
            self._counter += 1
            heapq.heappush(self._heap, (-(base + lp), self._counter, parent, token))

    def take(self) -> list[int]:
        """Add the best candidates for the next pass; returns the new node indices."""
        budget = self.params.budget
        scores = self.tree.scores
        threshold = sorted(scores, reverse=True)[budget - 1] if budget and len(scores) >= budget else None
        added = []
        while self._heap and len(added) < self.params.beams and budget:
            if threshold is not None and -self._heap[0][0] <= threshold:
                break  # nothing left can make the best `budget`
            neg_score, _, parent, token = heapq.heappop(self._heap)
            self.tree.tokens.append(token)
            self.tree.parents.append(parent)
            self.tree.scores.append(-neg_score)
            self.tree.next_tokens.append(-1)
            self._depth.append(self._depth[parent] + 1 if parent >= 0 else 1)
            added.append(len(self.tree) - 1)
        return added

    def result(self) -> DraftTree:
        """The best `budget` nodes grown so far, parents first, as a compact tree."""
        grown = self.tree
        order = sorted(range(len(grown)), key=lambda i: (-grown.scores[i], i))[: self.params.budget]
        keep = sorted(order)
        new_index = {old: new for new, old in enumerate(keep)}
        return DraftTree(
            tokens=[grown.tokens[i] for i in keep],
            parents=[new_index[grown.parents[i]] if grown.parents[i] >= 0 else -1 for i in keep],
            scores=[grown.scores[i] for i in keep],
            next_tokens=[grown.next_tokens[i] for i in keep],
            root_next_token=grown.root_next_token,
            grown_index=keep,
        )


@dataclass
class TreeJob:
    """One session's tree being grown. The root sits at scratch index `root_scratch`."""

    session_id: str
    root_token: int
    root_parent: int = -1  # scratch index the root hangs below (-1 = prefix end)
    temperature: float | None = None  # its scoring temperature (None: the params')
    constraint: Constraint | None = None  # the session's grammar: only tokens it allows are drafted
    root_state: State = None  # the grammar's state at the root (after the committed and assumed tokens)
    growth: TreeGrowth | None = None
    root_scratch: int = -1
    states: list[State] = field(default_factory=list)  # the grammar's state after each grown node

    def allowed(self, rows: list[State], vocab: int) -> torch.Tensor:
        """[len(rows), vocab] bool: what rows in these states may draft (all, without a grammar)."""
        if self.constraint is None:
            return torch.ones(len(rows), vocab, dtype=torch.bool)
        return self.constraint.allowed(rows)

    def scratch_index(self, grown: int) -> int:
        """Scratch index of a node by its growth index (`DraftTree.grown_index`)."""
        return self.root_scratch + 1 + grown

    def tree(self) -> DraftTree:
        return self.growth.result()


def grow_trees(runner: ModelRunner, jobs: list[TreeJob], params: TreeParams) -> Iterator[int]:
    """Grow one tree per job, one batched draft forward pass per step; yields the pass number.
    Jobs share the shape in `params`; each may score at a temperature of its own.

    A generator, so a caller can stop between passes (proactive drafting is abandoned
    this way); the trees grown so far are valid at every yield.
    """
    for job in jobs:
        job.growth = TreeGrowth(params)
        job.root_scratch = runner.sessions[job.session_id].n_scratch
        if job.temperature is None:
            job.temperature = params.temperature
    logits = runner.forward([ForwardRequest(j.session_id, [j.root_token], [j.root_parent]) for j in jobs], packed=True)
    masks = _masks([(job, [job.root_state]) for job in jobs], logits)
    for job, (values, tokens) in zip(jobs, _candidates(logits, [j.temperature for j in jobs], params.branch, masks),
                                     strict=True):
        job.growth.offer_top(-1, values, tokens)
    yield 0
    for step in range(1, params.depth + 1):
        work = [(job, job.growth.take()) for job in jobs]
        work = [(job, added) for job, added in work if added]
        if not work:
            return
        requests = []
        for job, added in work:
            tree = job.growth.tree
            if job.constraint is not None:
                job.states += [job.constraint.after(job.states[p] if p >= 0 else job.root_state, tree.tokens[i])
                               for i, p in ((i, tree.parents[i]) for i in added)]
            parents = [job.scratch_index(tree.parents[i]) if tree.parents[i] >= 0 else job.root_scratch
                       for i in added]
            requests.append(ForwardRequest(job.session_id, [tree.tokens[i] for i in added], parents))
        logits = runner.forward(requests, packed=True)
        masks = _masks([(job, [job.states[i] for i in added] if job.constraint else [None] * len(added))
                        for job, added in work], logits)
        candidates = iter(_candidates(logits, [job.temperature for job, added in work for _ in added], params.branch,
                                      masks))
        for job, added in work:
            for node in added:
                job.growth.offer_top(node, *next(candidates))
        yield step


def _masks(rows: list[tuple[TreeJob, list[State]]], logits: torch.Tensor) -> torch.Tensor | None:
    """What each row of a pass may draft (the jobs' rows in order), or None when no job has a grammar."""
    if all(job.constraint is None for job, _ in rows):
        return None
    return torch.cat([job.allowed(states, logits.shape[-1]) for job, states in rows]).to(logits.device)


def _candidates(logits: torch.Tensor, temperatures: list[float], branch: int,
                masks: torch.Tensor | None = None) -> list[tuple[list[float], list[int]]]:
    """Each row's top-`branch` draft log-probs (at its temperature; -inf where `masks`
    forbids) and tokens, brought to the host in one transfer for the whole pass."""
    if masks is not None:
        logits = logits.masked_fill(~masks, float("-inf"))
    logprobs = torch.log_softmax(logits / torch.tensor(temperatures, device=logits.device)[:, None], -1)
    top = torch.topk(logprobs, min(branch, logits.shape[-1]))
    k = top.values.shape[-1]
    rows = torch.cat([top.values.double(), top.indices.double()], dim=1).tolist()  # exact: ids < 2**53
    return [(row[:k], [int(t) for t in row[k:]]) for row in rows]
