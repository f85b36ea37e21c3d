"""The acceptance rule: which drafted tokens the target keeps, plus its own bonus token.

Sample-and-walk (lossless by construction). At the root, draw the target's token for the
next position; if a child of the current node carries that token, move to it and repeat;
otherwise stop. The accepted path and the last drawn token (the *bonus*) are committed:
1 to depth + 1 new tokens per verification.

Every draw is `sampling.sample` at the drawn token's absolute position, exactly as target-only
decoding draws it, so for greedy decoding and for a given seed the output is identical to
the target's own, whatever the draft proposed: a bad draft can only cost speed. Draft
probabilities are never needed.

`accept_batch` applies the same rule to every tree of a verification pass at once, on the
logits' device, with one device→host transfer for the whole pass; `accept` is the same
rule for one tree, written plainly (the reference the batched one is tested against).

Vocabulary: the *tree* is node 0 (the root: the last committed token) plus the drafted
nodes; `parents[i] < i` for every drafted node. *Accepted* nodes are drafted nodes on the
path the walk took; the *bonus* is the final draw.
"""

from __future__ import annotations

import torch

from specedge.engine.sampling import SamplingSpec, sample, sample_rows


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
    params: SamplingSpec,
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


def accept_batch(
    trees: list[tuple[list[int], list[int]]],  # per tree: (tokens, parents) as in `accept`
    logits: torch.Tensor,                       # [sum of tree sizes, V] target logits, trees in order
    params: list[SamplingSpec],               # per tree
    root_positions: list[int],                  # per tree
) -> list[tuple[list[int], int]]:
    """`accept` for every tree of a pass; draws and the walk run on the logits' device and
    only the outcome (which nodes were accepted, and the draws) comes back, in one transfer."""
    tokens, parent_rows, positions, row_params, depth_of = [], [], [], [], []
    offset = 0
    for (tree_tokens, parents), p, root in zip(trees, params, root_positions, strict=True):
        depths = tree_depths(parents)
        seen: set[tuple[int, int]] = set()
        for i, (token, parent) in enumerate(zip(tree_tokens, parents, strict=True)):
            first = i == 0 or (parent, token) not in seen  # first child wins if a (hostile) tree repeats a token
            seen.add((parent, token))
            tokens.append(token if first else -1)  # a repeat never matches a draw
            parent_rows.append(offset + parent if i else offset + i)
        positions += [root + d + 1 for d in depths]
        row_params += [p] * len(parents)
        depth_of += depths
        offset += len(parents)
    dev = logits.device
    drawn = sample_rows(logits, row_params, positions)
    parent_t = torch.tensor(parent_rows, device=dev)
    match = torch.tensor(tokens, device=dev) == drawn[parent_t]
    roots = torch.tensor([d == 0 for d in depth_of], device=dev)
    ok = roots.clone()
    for _ in range(max(depth_of, default=0)):  # a node is accepted when it and its parent's chain match
        ok = roots | (match & ok[parent_t])
    outcome = torch.stack([ok.long(), drawn]).tolist()  # the pass's one device->host transfer
    results, offset = [], 0
    for tree_tokens, _ in trees:
        n = len(tree_tokens)
        accepted, draws = outcome[0][offset : offset + n], outcome[1][offset : offset + n]
        path = sorted((i for i in range(1, n) if accepted[i]), key=lambda i: depth_of[offset + i])
        results.append((path, draws[path[-1] if path else 0]))
        offset += n
    return results
