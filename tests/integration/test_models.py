"""The bundled tiny models: real files, loadable by transformers, one shared tokenizer,
and the quality their model cards claim — re-measured here on held-out text."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge.engine.loading import ModelLoadError, load_causal_lm
from specedge.models import (
    BUNDLED_DRAFT,
    BUNDLED_TARGET,
    bundled,
    chat_prompt_ids,
    model_id,
    models_dir,
    tokenizer_fingerprint,
)
from specedge_bench.agreement import agreement, greedy_replies
from tests.conftest import REPO

TARGET, DRAFT = bundled(BUNDLED_TARGET), bundled(BUNDLED_DRAFT)
QUALITY = json.loads((models_dir() / "quality.json").read_text())


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_tiny_pair", REPO / "models" / "train_tiny_pair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair():
    target = AutoModelForCausalLM.from_pretrained(TARGET).eval()
    draft = AutoModelForCausalLM.from_pretrained(DRAFT).eval()
    return target, draft, AutoTokenizer.from_pretrained(TARGET), AutoTokenizer.from_pretrained(DRAFT)


def test_both_load_through_transformers_as_qwen3(pair):
    target, draft, _, _ = pair
    assert type(target).__name__ == type(draft).__name__ == "Qwen3ForCausalLM"
    assert target.config.vocab_size == draft.config.vocab_size


def test_they_share_one_tokenizer(pair):
    _, _, tt, dt = pair
    assert (models_dir() / BUNDLED_TARGET / "tokenizer.json").read_bytes() == \
        (models_dir() / BUNDLED_DRAFT / "tokenizer.json").read_bytes()
    assert tokenizer_fingerprint(tt) == tokenizer_fingerprint(dt)
    text = "def parse(path):\n    return open(path).read()  # ünïcödé"
    assert tt(text)["input_ids"] == dt(text)["input_ids"]
    assert tt.decode(tt(text)["input_ids"]) == text


def test_chat_template_and_end_of_turn(pair):
    _, _, tok, _ = pair
    prompt = tok.apply_chat_template([{"role": "user", "content": "Return the sum of a list."}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nReturn the sum of a list.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_size_and_parameter_ratio(pair):
    target, draft, _, _ = pair
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert n_target >= 4 * n_draft
    on_disk = sum(f.stat().st_size for name in (BUNDLED_TARGET, BUNDLED_DRAFT)
                  for f in (models_dir() / name).iterdir())
    assert on_disk <= 30e6


def test_quality_on_held_out_text_matches_the_cards(pair):
    target, draft, tok, _ = pair
    train = load_training_script()
    held = [doc for f in train.stdlib_files() if train.is_held_out(f) for doc in train.documents(f)]
    stream = train.token_stream(tok, held)
    # re-measured here without the training script's `evaluate` (which wrote quality.json):
    # transformers' own shifted loss per window, and the two models' argmaxes compared
    windows = stream[: 48 * train.SEQ_LEN].view(48, train.SEQ_LEN)
    measured, argmax = {}, {}
    with torch.no_grad():
        for name, model in (("target", target), ("draft", draft)):
            out = [model(input_ids=w[None], labels=w[None]) for w in windows]
            measured[f"{name}_held_out_loss"] = sum(o.loss.item() for o in out) / len(out)
            argmax[name] = torch.cat([o.logits[0, :-1].argmax(-1) for o in out])
    measured["greedy_agreement"] = (argmax["target"] == argmax["draft"]).float().mean().item()
    assert measured["target_held_out_loss"] < measured["draft_held_out_loss"] - 0.1
    assert measured["greedy_agreement"] >= 0.60
    for key in ("target_held_out_loss", "draft_held_out_loss", "greedy_agreement"):
        assert measured[key] == pytest.approx(QUALITY[key], abs=0.02), key
    for name in (BUNDLED_TARGET, BUNDLED_DRAFT):
        card = (models_dir() / name / "README.md").read_text()
        assert f"{QUALITY['greedy_agreement'] * 100:.1f}%" in card
        assert str(QUALITY["target_held_out_loss"]) in card


def test_the_draft_is_aligned_to_the_targets_own_replies(pair):
    """The first held-out replies of the alignment stage, regenerated: the aligned draft predicts
    them far better than the draft did before the stage (the card's figures)."""
    target, draft, tok, _ = pair
    train = load_training_script()
    replies = train.target_replies(target, tok, 16, seed=1234 + 2)
    assert all(len(seq) > prompt_len for prompt_len, seq in replies)
    assert max(prompt_len for prompt_len, _ in replies) > 500  # long prose passages among them
    assert agreement(draft, replies)["top1"] >= QUALITY["reply_agreement_before_alignment"] + 0.1
    card = (models_dir() / BUNDLED_DRAFT / "README.md").read_text()
    assert f"{QUALITY['reply_agreement'] * 100:.1f}%" in card


def test_agreement_benchmark_measures_the_draft_against_the_targets_replies(pair):
    target, draft, tok, _ = pair
    replies = greedy_replies(target, [chat_prompt_ids(tok, "Summarize: the quick brown fox jumps over the lazy dog.")],
                             max_tokens=12)
    itself = agreement(target, replies)
    assert itself["top1"] == itself["top4"] == 1.0 and itself["positions"] > 0
    measured = agreement(draft, replies)
    assert 0.0 <= measured["top1"] <= measured["top4"] <= 1.0


def test_engine_loader_picks_cpu_float32_and_fingerprints():
    loaded = load_causal_lm(TARGET)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(DRAFT))
    assert model_id(TARGET) == "specedge-tiny-target"
    assert load_causal_lm(DRAFT, dtype="bfloat16").model.dtype == torch.bfloat16


def test_engine_loader_refuses_clearly(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="supported: qwen3, qwen2, llama"):
        load_causal_lm(str(tmp_path / "gpt2"))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_causal_lm(TARGET, dtype="float8")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_causal_lm("specedge/not-a-cached-model")
