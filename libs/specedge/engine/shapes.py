"""Real model shapes without downloads: the Qwen3 configs the paper serves, built in, with
random weights for timing and memory runs; and the KV memory plan of a model.

`qwen3-0.6b` … `qwen3-32b` are the public configs' shapes (vocabulary 151,936, head_dim
128, RoPE θ 1e6); a `config.json` path works too. Random weights are created directly on
the device in the requested dtype — acceptance is meaningless with them, but the time and
memory of a pass depend only on shapes.
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from specedge.engine.kv_pool import GIB, KVPlan, plan

# name: (layers, hidden, heads, kv heads, MLP, tied embeddings)
QWEN3_SHAPES = {
    "qwen3-0.6b": (28, 1024, 16, 8, 3072, True),
    "qwen3-1.7b": (28, 2048, 16, 8, 6144, True),
    "qwen3-8b": (36, 4096, 32, 8, 12288, False),
    "qwen3-14b": (40, 5120, 40, 8, 17408, False),
    "qwen3-32b": (64, 5120, 64, 8, 25600, False),
}


def is_shape(source: str) -> bool:
    """Whether `source` names a built-in shape or a bare config.json (no weights)."""
    return source.lower() in QWEN3_SHAPES or (source.endswith(".json") and pathlib.Path(source).is_file())


def shape_config(source: str) -> PretrainedConfig:
    """The config of a built-in shape, a config.json, or a model folder."""
    name = source.lower()
    if name in QWEN3_SHAPES:
        layers, hidden, heads, kv_heads, mlp, tied = QWEN3_SHAPES[name]
        return AutoConfig.for_model("qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=mlp,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, head_dim=128, rope_theta=1e6,
                                    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    path = pathlib.Path(source)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoConfig.from_pretrained(source)


def parameter_count(config: PretrainedConfig) -> int:
    """Parameters of the model `config` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def random_model(source: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A model of `source`'s shape with random weights, made on `device` in `dtype`."""
    config = shape_config(source)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device, or of this machine for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    import os  # noqa: PLC0415

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_for(model: PreTrainedModel, kv_cache_memory: float, memory_bytes: int | None = None) -> KVPlan:
    """The KV plan of a loaded model on its device."""
    param = next(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    return plan(model.config, model=getattr(model.config, "_name_or_path", "") or model.config.model_type,
                dtype=dtype, weights_bytes=weights, kv_cache_memory=kv_cache_memory,
                device_memory_bytes=memory_bytes or device_memory(param.device))


def print_plan(source: str, *, dtype: str, device: str, kv_cache_memory: float, memory_gib: float | None) -> int:
    """`specedge verifier --plan`: the plan as one JSON line, nothing allocated."""
    from specedge.engine.loading import pick_device  # noqa: PLC0415

    config = shape_config(source)
    dtype = "bfloat16" if dtype == "auto" else dtype
    memory = int(memory_gib * GIB) if memory_gib else device_memory(pick_device(device))
    weights = parameter_count(config) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    sys.stdout.write(plan(config, model=source, dtype=dtype, weights_bytes=weights, kv_cache_memory=kv_cache_memory,
               device_memory_bytes=memory).json() + "\n")
    return 0
