"""Where models come from, without importing torch.

Owns the location of the bundled tiny models (`models/` at the repository root, or
`$SPECEDGE_MODELS_DIR`) and the tokenizer fingerprint that lets a verifier refuse an
edge whose draft tokenizer differs from the target's. Loading weights is
`specedge.engine.loading`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

BUNDLED_TARGET = "specedge-tiny-target"
BUNDLED_DRAFT = "specedge-tiny-draft"


def models_dir() -> pathlib.Path:
    """`$SPECEDGE_MODELS_DIR`, else the repository's `models/` (libs/specedge/../../models)."""
    env = os.environ.get("SPECEDGE_MODELS_DIR")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2] / "models"


def bundled(name: str) -> str:
    """Path of a bundled model as a string (what `--target`/`--draft` default to)."""
    return str(models_dir() / name)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary and special tokens of a (Hugging Face) tokenizer.

    Two models can share drafts only if their tokenizers map the same strings to the
    same ids; this is that check in 16 hex characters.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as one user turn in the model's chat template, ready to generate."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False)
    return tokenizer(templated, add_special_tokens=False)["input_ids"]


def model_id(source: str) -> str:
    """The name a model is served under: a local path's folder name, or the hub id as is."""
    path = pathlib.Path(source)
    return path.name if path.exists() else source
