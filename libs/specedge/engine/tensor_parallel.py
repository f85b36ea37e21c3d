"""Tensor parallelism over the GPUs of one machine (`torch.distributed`): one target, several ranks.

Every linear layer of the decoder and the lm_head keeps only its rank's slice of output
rows (`shard`): with `w` ranks, rank `r` computes output columns `[r·n/w, (r+1)·n/w)` of
every product, over the whole input, and the slices are all-gathered (`Kernels` of
`parallel_kernels`). Each output value is then one dot product computed whole on one rank,
by the same batch-invariant kernel over the same reduction as on a single rank — so every
logit is bit for bit a single rank's (`tests/integration/test_tensor_parallel.py`).
Weights are split `w` ways; embeddings, norms, attention and the KV cache are replicated
(attention is a small share of a pass's work at these context lengths, and the cache
plan leaves room for it). Only the exact engine (`--attention exact`) runs in parallel.

Rank 0 runs the verifier — NATS, sessions, acceptance — with a `LeaderRunner`: every call
that changes the cache or runs a pass is first broadcast (`broadcast_object_list`), and the
other ranks (`follow`) make the same call on their own runner, taking part in the same
collectives in the same order. `Verifier.shutdown` (None broadcast) ends the followers.
Gloo on CPU (the tests), NCCL on GPUs (rank `r` on `cuda:r`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from specedge.engine.invariant import Kernels, linear, silu

log = logging.getLogger(__name__)

# Runner calls that change state or run a pass: made on every rank, in the same order.
BROADCAST = ("open", "evict", "reserve", "forward", "commit", "rollback_scratch", "prefill", "warm_up")


def init(rank: int, world: int, address: str, device: str) -> None:
    """Join the group of `world` ranks rendezvousing at `address` (`tcp://host:port`)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world)


def shard(model: PreTrainedModel, rank: int, world: int) -> None:
    """Keep only this rank's rows of every linear weight (and bias) of the decoder and the lm_head."""
    def keep(module: torch.nn.Linear) -> None:
        rows = module.weight.shape[0]
        if rows % world:
            raise ValueError(f"{rows} output features do not split over {world} ranks")
        part = slice(rank * rows // world, (rank + 1) * rows // world)
        module.weight = torch.nn.Parameter(module.weight.data[part].clone(), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.data[part].clone(), requires_grad=False)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj):
            keep(module)
    keep(model.lm_head)  # (a new Parameter: a tied embedding keeps its full table)


def parallel_kernels(base: Kernels, world: int) -> Kernels:
    """`base` (the exact engine's kernels) with every product computed on this rank's slice
    of output columns and all-gathered."""
    def gathered(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        local = linear(x, weight, bias).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)

    def mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = module.gate_proj, module.up_proj, module.down_proj
        hidden = silu(gathered(x, gate.weight, gate.bias)) * gathered(x, up.weight, up.bias)
        return gathered(hidden, down.weight, down.bias)

    return Kernels(linear=gathered, mlp=mlp, rotary=base.rotary, reserve=base.reserve)


def parallelize(runner: Any, model: PreTrainedModel) -> None:
    """Make an exact runner this rank's part of a tensor-parallel one (its model sharded)."""
    if getattr(runner, "attention", "") != "exact":
        raise ValueError("tensor parallelism runs the exact engine only (--attention exact)")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard(model, rank, world)
    runner.kernels = parallel_kernels(runner.kernels, world)


def _broadcast(op: tuple[str, tuple, dict] | None) -> tuple[str, tuple, dict] | None:
    box = [op]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LeaderRunner:
    """Rank 0's runner: each call in `BROADCAST` goes to every rank first; reads stay local."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._runner, name)
        if name not in BROADCAST:
            return attr

        def everywhere(*args: Any, **kwargs: Any) -> Any:
            _broadcast((name, args, kwargs))
            return attr(*args, **kwargs)

        return everywhere

    def stop_followers(self) -> None:
        _broadcast(None)


def follow(runner: Any) -> int:
    """A follower rank: make every call rank 0 broadcasts, until it says stop; returns how many.
    A call that fails here failed on rank 0 too (the same state, the same arguments)."""
    calls = 0
    while (op := _broadcast(None)) is not None:
        name, args, kwargs = op
        try:
            getattr(runner, name)(*args, **kwargs)
        except Exception as exc:  # e.g. a full cache: rank 0 reports it
            log.debug("rank %d: %s failed as on rank 0: %r", dist.get_rank(), name, exc)
        calls += 1
    return calls
