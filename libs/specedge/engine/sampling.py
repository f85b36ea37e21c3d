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

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 11) * 2.0**-53


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float64 probabilities after temperature, top-k and top-p."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        keep_sorted = before < params.top_p * sorted_p.sum(-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: SamplingParams, positions: list[int]) -> torch.Tensor:
    """One token per row of `logits` [N, V]; row i is drawn for absolute position positions[i]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, params)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.tensor([uniform(params.seed, p) for p in positions], dtype=torch.float64, device=cdf.device)
    tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    return tokens.clamp_(max=logits.shape[-1] - 1)
