"""Load a Hugging Face causal LM and its tokenizer from a local path or a hub id.

Picks CUDA when present, else CPU; dtype selectable ("auto" = the checkpoint's dtype on
CUDA, float32 on CPU). With `HF_HUB_OFFLINE=1` nothing is fetched; a missing model is
a clear error, not a download.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import logging as hf_logging

from specedge.models import model_id, tokenizer_fingerprint
from specedge.service import StartupError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be found, or is of an unsupported family."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None for a built-in shape with random weights
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer_fingerprint(self) -> str:
        if self.tokenizer is None:  # a built-in shape with random weights pairs with nothing
            return f"random:{self.source}"
        return tokenizer_fingerprint(self.tokenizer)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def registry_details(self) -> dict[str, str]:
        """What a service announces about its model on the bus."""
        return {"model": model_id(self.source), "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


async def load_for_service(source: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load off the event loop; a model that cannot be loaded is a one-line `StartupError`."""
    try:
        return await asyncio.to_thread(load_causal_lm, source, device, dtype)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_causal_lm(source: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load model and tokenizer; refuse model families the engine does not support. A
    built-in shape (`qwen3-14b`, …) or a config.json gives random weights and no tokenizer
    (timing and memory runs: `specedge.engine.shapes`)."""
    from specedge.engine.shapes import is_shape, random_model  # noqa: PLC0415

    if is_shape(source):
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev, torch.bfloat16)
        model = random_model(source, dt, dev)
        log.info("built %s with random weights on %s as %s", source, dev, dt)
        return LoadedModel(model, None, source, dev, dt)
    if source.startswith((".", "/")) and not pathlib.Path(source).exists():
        raise ModelLoadError(f"model path {source!r} does not exist")
    hf_logging.disable_progress_bar()  # one log line per model, not a progress bar
    try:
        config = AutoConfig.from_pretrained(source)
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source!r} is a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        dev = pick_device(device)
        config_dtype = getattr(config, "dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = DTYPES.get(config_dtype)
        dt = pick_dtype(dtype, dev, config_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        # straight to the device in its dtype (accelerate's device_map): no full copy in host memory
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, device_map=str(dev)).eval()
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc
    log.info("loaded %s (%s, %.1fM params) on %s as %s", source, model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, dev, dt)
    return LoadedModel(model, tokenizer, source, dev, dt)
