"""Drawing the target's token at a position: greedy, or seeded sampling that repeats exactly.

Sampling must give the same token for the same (seed, absolute position) whichever mode
produced the logits — target alone, or a verification tree of any shape — so the random
source is counter-based: `uniform(seed, position)` hashes the pair (SplitMix64) instead of
advancing a generator whose state would depend on how many draws came before. The token
is then the inverse CDF of the filtered distribution at that uniform:

    p = softmax(logits / temperature), restricted to the top-k, then to the top-p nucleus
    token = min { t : sum_{i <= t} p_i > u }   (token-id order)

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


def filtered_probs(logits: torch.Tensor, params: SamplingSpec) -> torch.Tensor:
    """[N, V] logits -> [N, V] float64 probabilities after temperature, top-k and top-p."""
    n = logits.shape[0]
    return filtered_probs_rows(logits, *_row_params([params] * n, logits.device))


def _row_params(params: list[SamplingSpec], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-row temperature, top-k and top-p as device tensors (host -> device only)."""
    return (torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device))


def filtered_probs_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> torch.Tensor:
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
    return probs / probs.sum(-1, keepdim=True)


def sample_rows(logits: torch.Tensor, params: list[SamplingSpec], positions: list[int]) -> torch.Tensor:
    """One token per row of `logits` [N, V] (on its device): row i is drawn with `params[i]`
    for absolute position `positions[i]`. Greedy rows take the argmax; the others the
    inverse CDF of their filtered distribution at `uniform(seed, position)`. No transfer to
    the host: the uniforms are computed on the host and sent."""
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


def sample(logits: torch.Tensor, params: SamplingSpec, positions: list[int]) -> torch.Tensor:
    """One token per row of `logits` [N, V]; row i is drawn for absolute position positions[i]."""
    return sample_rows(logits, [params] * logits.shape[0], positions)
