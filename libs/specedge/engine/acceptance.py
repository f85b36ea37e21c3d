"""The acceptance rule: which drafted tokens the target keeps, plus its own bonus token.

Sample-and-walk (lossless by construction). At the root, draw the target's token for the
next position; if a child of the current node carries that token, move to it and repeat;
otherwise stop. The accepted path and the last drawn token (the *bonus*) are committed:
1 to depth + 1 new tokens per verification.

Every draw is `sampling.sample` at the drawn token's absolute position — with penalties and
a grammar's mask taken along the row's own path (`row_histories`, `grammar.tree_masks`) —
exactly as target-only decoding draws it, so for greedy decoding and for a given seed the output is identical to
the target's own, whatever the draft proposed: a bad draft can only cost speed. Draft
probabilities are never needed.

`accept_batch` applies the same rule to every tree of a verification pass at once, on the
logits' device, with one device→host transfer for the whole pass; `accept` is the same
rule for one tree, written plainly (the reference the batched one is tested against).

Vocabulary: a *tree* is the drafted nodes below the *root* (the last committed token) in
the wire's form (`protocol.DraftTreeMsg`): `tokens[i]`, and `parents[i]` = -1 for a child of
the root, else an earlier index. The target's logits come one row for the root, then one
per drafted node. *Accepted* nodes are drafted nodes (their indices) on the path the walk
took; the *bonus* is the final draw.
"""

from __future__ import annotations

import torch

from specedge.engine.sampling import SamplingSpec, sample, sample_rows
from specedge.protocol import tree_depths


def positions(parents: list[int], root_position: int) -> list[int]:
    """The absolute position of the token each logits row predicts: the root's row, then each node's."""
    return [root_position + 1, *(root_position + d + 1 for d in tree_depths(parents))]


History = tuple[list[int], list[int]]  # (prompt, output so far): what penalties look at


def row_histories(tokens: list[int], parents: list[int], history: History | None) -> list[History | None]:
    """Each row's history: the root's is the session's; a node's adds the drafted tokens of
    its own path, itself included (the output it would follow)."""
    if history is None:
        return [None] * (1 + len(tokens))
    prompt, output = history
    paths: list[list[int]] = []
    for token, parent in zip(tokens, parents, strict=True):
        paths.append((paths[parent] if parent >= 0 else []) + [token])
    return [history, *((prompt, output + path) for path in paths)]


def accept(
    tokens: list[int],      # [N] drafted tokens
    parents: list[int],     # [N] parent of each: -1 the root, else an earlier index
    logits: torch.Tensor,   # [1 + N, V] target logits at the root, then at each node (predicting the next token)
    params: SamplingSpec,
    root_position: int,     # absolute position of the root token
    history: History | None = None,  # the session's (prompt, output): for penalties
    masks: torch.Tensor | None = None,  # [1 + N, V] bool: what each row's grammar state allows
) -> tuple[list[int], int]:
    """Returns (accepted drafted node indices in path order, bonus token)."""
    histories = row_histories(tokens, parents, history) if params.adjusts else None
    drawn = sample(logits, params, positions(parents, root_position), histories, masks).tolist()
    children: dict[tuple[int, int], int] = {}
    for i in range(len(tokens) - 1, -1, -1):  # first child wins if a (hostile) tree repeats a token
        children[(parents[i], tokens[i])] = i
    path, node = [], -1
    while (child := children.get((node, drawn[node + 1]))) is not None:
        path.append(child)
        node = child
    return path, drawn[node + 1]


def accept_batch(
    trees: list[tuple[list[int], list[int]]],  # per tree: (tokens, parents) as in `accept`
    logits: torch.Tensor,                       # [sum of (1 + tree size), V] target logits, trees in order
    params: list[SamplingSpec],               # per tree
    root_positions: list[int],                  # per tree
    histories: list[History | None] | None = None,  # per tree: the session's (prompt, output), for penalties
    masks: torch.Tensor | None = None,          # [rows, V] bool as `logits`: what each row's grammar state allows
) -> list[tuple[list[int], int]]:
    """`accept` for every tree of a pass; draws and the walk run on the logits' device and
    only the outcome (which nodes were accepted, and the draws) comes back, in one transfer."""
    tokens, parent_rows, row_positions, row_params, depth_of, rows_history = [], [], [], [], [], []
    offset = 0
    histories = histories or [None] * len(trees)
    for (tree_tokens, parents), p, root, history in zip(trees, params, root_positions, histories, strict=True):
        rows_history += row_histories(tree_tokens, parents, history if p.adjusts else None)
        seen: set[tuple[int, int]] = set()
        tokens.append(-1)  # the root's row: never a match
        parent_rows.append(offset)
        for token, parent in zip(tree_tokens, parents, strict=True):
            first = (parent, token) not in seen  # first child wins if a (hostile) tree repeats a token
            seen.add((parent, token))
            tokens.append(token if first else -1)  # a repeat never matches a draw
            parent_rows.append(offset + parent + 1)
        row_positions += positions(parents, root)
        row_params += [p] * (1 + len(parents))
        depth_of += [0, *tree_depths(parents)]
        offset += 1 + len(parents)
    dev = logits.device
    drawn = sample_rows(logits, row_params, row_positions,
                        rows_history if any(h is not None for h in rows_history) else None, masks)
    parent_t = torch.tensor(parent_rows, device=dev)
    match = torch.tensor(tokens, device=dev) == drawn[parent_t]
    roots = torch.tensor([d == 0 for d in depth_of], device=dev)
    ok = roots.clone()
    for _ in range(max(depth_of, default=0)):  # a node is accepted when it and its parent's chain match
        ok = roots | (match & ok[parent_t])
    outcome = torch.stack([ok.long(), drawn]).tolist()  # the pass's one device->host transfer
    results, offset = [], 0
    for tree_tokens, _ in trees:
        n = 1 + len(tree_tokens)
        accepted, draws = outcome[0][offset : offset + n], outcome[1][offset : offset + n]
        path = sorted((i - 1 for i in range(1, n) if accepted[i]), key=lambda i: depth_of[offset + i + 1])
        results.append((path, draws[path[-1] + 1 if path else 0]))
        offset += n
    return results
