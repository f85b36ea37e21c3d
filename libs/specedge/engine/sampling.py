"""Drawing the target's token at a position: greedy, or seeded sampling that repeats exactly.

Sampling must give the same token for the same (seed, absolute position) whichever mode
produced the logits — target alone, or a verification tree of any shape — so the random
source is counter-based: `uniform(seed, position)` hashes the pair (SplitMix64) instead of
advancing a generator whose state would depend on how many draws came before. The token
is then the inverse CDF of the filtered distribution at that uniform:

    logits' = logits masked by the row's grammar state (-inf where it forbids), + logit_bias,
              then vLLM's penalties over the row's own history (`adjust_rows`)
    p = softmax(logits' / temperature), restricted to the top-k, the top-p nucleus, then min-p
    token = min { t : sum_{i <= t} p_i > u }   (token-id order)

A greedy row takes the argmax of logits'.

All pure: tensors and numbers in, tensors out.
"""

from __future__ import annotations

import torch

from specedge.protocol import SamplingSpec

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 11) * 2.0**-53


def adjust_rows(logits: torch.Tensor, params: list[SamplingSpec],
                histories: list[tuple[list[int], list[int]] | None]) -> torch.Tensor:
    """The logits each row is drawn from, given its (prompt, output) history — a tree node's
    own path: `logit_bias` added; `repetition_penalty` r on every token of prompt and output
    (a positive logit divided by r, a negative one multiplied); then, for each token the
    output holds c times, `frequency_penalty` × c + `presence_penalty` subtracted (vLLM's
    rules); while the output is shorter than `min_tokens`, the `end_ids` cannot be drawn.
    Rows that ask for none of it are left as they are (and nothing is copied when no row
    asks)."""
    rows = [i for i, p in enumerate(params) if p.adjusts]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        p, (prompt, output) = params[i], histories[i]
        row = out[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=row.device)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
        if p.repetition_penalty != 1 and (prompt or output):
            seen = torch.tensor(sorted({*prompt, *output}), device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and output:
            ids, counts = torch.unique(torch.tensor(output, device=row.device), return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
        if len(output) < p.min_tokens and p.end_ids:
            row[torch.tensor(p.end_ids, device=row.device)] = float("-inf")
    return out


def filtered_probs(logits: torch.Tensor, params: SamplingSpec) -> torch.Tensor:
    """[N, V] logits -> [N, V] float64 probabilities after temperature, top-k, top-p and min-p."""
    n = logits.shape[0]
    return filtered_probs_rows(logits, *_row_params([params] * n, logits.device))


def _row_params(params: list[SamplingSpec], device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """Per-row temperature, top-k, top-p and min-p as device tensors (host -> device only)."""
    return (torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device),
            torch.tensor([p.min_p for p in params], dtype=torch.float64, device=device)
            if any(p.min_p for p in params) else None)  # (decided on the host: no sync)


def filtered_probs_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """`filtered_probs` with each row's own parameters ([N] tensors; temperature > 0), on the
    device, without a transfer to the host. A row's result depends only on that row."""
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.double() / temperature[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    use_k = (top_k > 0) & (top_k < vocab)
    kth = sorted_p.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])
    probs = torch.where(~use_k[:, None] | (probs >= kth), probs, 0.0)
    use_p = top_p < 1
    sorted_p = torch.where(~use_k[:, None] | (sorted_p >= kth), sorted_p, 0.0)  # the same filter, sorted
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p[:, None] * sorted_p.sum(-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = torch.where(~use_p[:, None] | keep, probs, 0.0)
    if min_p is not None:  # (the most likely token always stays)
        probs = torch.where(probs >= min_p[:, None] * probs.amax(-1, keepdim=True), probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_rows(logits: torch.Tensor, params: list[SamplingSpec], positions: list[int],
                histories: list[tuple[list[int], list[int]] | None] | None = None,
                masks: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, V] (on its device): row i is drawn with `params[i]`
    for absolute position `positions[i]`, only among the tokens `masks[i]` allows (a
    grammar's: `engine.grammar`), its logits adjusted for `histories[i]` (its prompt and
    output: `adjust_rows`). Greedy rows take the argmax; the others the inverse CDF of
    their filtered distribution at `uniform(seed, position)`. No transfer to the host: the
    uniforms are computed on the host and sent."""
    if masks is not None:
        logits = logits.masked_fill(~masks, float("-inf"))
    if histories is not None:
        logits = adjust_rows(logits, params, histories)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    dev = logits.device
    rows = torch.tensor(sampled, device=dev)
    chosen = [params[i] for i in sampled]
    probs = filtered_probs_rows(logits[rows], *_row_params(chosen, dev))
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.tensor([uniform(p.seed, positions[i]) for p, i in zip(chosen, sampled, strict=True)],
                     dtype=torch.float64, device=dev)
    drawn = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    return tokens.index_copy(0, rows, drawn.clamp_(max=logits.shape[-1] - 1))


def sample(logits: torch.Tensor, params: SamplingSpec, positions: list[int],
           histories: list[tuple[list[int], list[int]] | None] | None = None,
           masks: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, V]; row i is drawn for absolute position positions[i]."""
    return sample_rows(logits, [params] * logits.shape[0], positions, histories, masks)
