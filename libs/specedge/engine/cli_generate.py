"""`specedge generate`: load the models, run one generation in a mode, format the outcome."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from specedge.engine.backends import DEFAULT_ATTENTION
from specedge.engine.generate import generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Drafter, Verifier
from specedge.engine.sampling import SamplingSpec
from specedge.engine.tree import TreeParams
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled
from specedge.protocol import Mode, tree_temperature


class GenerateSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1)
    mode: Mode = "specedge"
    chat: bool = False
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int = 0
    target: str | None = None
    draft: str | None = None
    budget: int = Field(32, ge=0)
    depth: int = Field(4, ge=0)
    branch: int = Field(16, ge=1)
    beams: int = Field(32, ge=1)
    rtt_ms: float = Field(0.0, ge=0)
    device: str = "auto"
    dtype: str = "auto"
    attention: str = Field(DEFAULT_ATTENTION, pattern="^(exact|flex|reference)$")


def run_generate(s: GenerateSettings, as_json: bool) -> str:
    target = load_causal_lm(s.target or bundled(BUNDLED_TARGET), s.device, s.dtype)
    tok = target.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": s.prompt}], add_generation_prompt=True,
                                   tokenize=False) if s.chat else s.prompt
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    max_len = len(prompt) + s.max_tokens + s.depth + 2  # a last verification may overshoot
    verifier = Verifier(target.model, max_sessions=1, max_len=max_len, max_tree_nodes=max(s.budget, 1),
                        attention=s.attention)
    drafter = None
    if s.mode != "autoregressive":
        draft = load_causal_lm(s.draft or bundled(BUNDLED_DRAFT), s.device, s.dtype)
        if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
            raise SystemExit("the draft model's tokenizer differs from the target's; they cannot be paired")
        tree = TreeParams(budget=s.budget, depth=s.depth, branch=s.branch, beams=s.beams,
                          temperature=tree_temperature(s.temperature))
        drafter = Drafter(draft.model, tree, max_sessions=1, max_len=max_len, attention=s.attention)
    eos = target.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    params = SamplingSpec(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
    out = generate(s.mode, verifier, drafter, prompt, params, s.max_tokens, eos_ids,
                   one_way_delay_s=s.rtt_ms / 2000)
    text_out = tok.decode(out.token_ids, skip_special_tokens=True)
    if not as_json:
        return text_out
    return json.dumps({
        "mode": s.mode,
        "engine": f"{s.attention}-{str(target.dtype).removeprefix('torch.')}",
        "text": text_out,
        "token_ids": out.token_ids,
        "prompt_tokens": len(prompt),
        "tokens_per_verify": round(out.mean_tokens_per_verify, 4),
        "num_verifies": out.num_verifies,
        "target_forward_passes": out.target_forward_passes,
        "target_passes_per_token": round(out.target_forward_passes / max(1, len(out.token_ids)), 4),
        "draft_forward_passes": out.draft_forward_passes,
        "proactive_hit_rate": None if out.proactive_hit_rate is None else round(out.proactive_hit_rate, 4),
        "wire_bytes_per_verify": round(out.wire_bytes_to_verifier / max(1, out.num_verifies), 1)
        if s.mode == "specedge" else None,
        "elapsed_s": round(out.elapsed_s, 4),
    })
