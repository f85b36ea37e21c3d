"""The acceptance rule: which drafted tokens the target keeps, plus its own bonus token.

Sample-and-walk (lossless by construction). At the root, draw the target's token for the
next position; if a child of the current node carries that token, move to it and repeat;
otherwise stop. The accepted path and the last drawn token (the *bonus*) are committed:
1 to depth + 1 new tokens per verification.

Every draw is `sampling.sample` at the drawn token's absolute position, exactly as target-only
decoding draws it, so for greedy decoding and for a given seed the output is identical to
the target's own, whatever the draft proposed: a bad draft can only cost speed. Draft
probabilities are never needed.

Vocabulary: the *tree* is node 0 (the root: the last committed token) plus the drafted
nodes; `parents[i] < i` for every drafted node. *Accepted* nodes are drafted nodes on the
path the walk took; the *bonus* is the final draw.
"""

from __future__ import annotations

import torch

from specedge.engine.sampling import SamplingParams, sample


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each node (root 0); `parents[0]` is ignored, others must point earlier."""
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    return depths


def accept(
    tokens: list[int],      # [N] node tokens; tokens[0] is the root (last committed token)
    parents: list[int],     # [N] parent of each node; parents[0] = -1
    logits: torch.Tensor,   # [N, V] target logits at each node (predicting the next token)
    params: SamplingParams,
    root_position: int,     # absolute position of the root token
) -> tuple[list[int], int]:
    """Returns (accepted drafted node indices in path order, bonus token)."""
    depths = tree_depths(parents)
    drawn = sample(logits, params, [root_position + d + 1 for d in depths]).tolist()
    children: dict[tuple[int, int], int] = {}
    for i in range(len(tokens) - 1, 0, -1):  # first child wins if a (hostile) tree repeats a token
        children[(parents[i], tokens[i])] = i
    path, node = [], 0
    while (child := children.get((node, drawn[node]))) is not None:
        path.append(child)
        node = child
    return path, drawn[node]
