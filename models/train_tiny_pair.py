"""Train the bundled tiny target/draft pair from scratch on the Python standard library.

This script owns the bundled models in ``models/specedge-tiny-target`` and
``models/specedge-tiny-draft``: their tokenizer, their architecture (Qwen3), their
training data, the training itself and the model cards with measured quality. It is not
part of CI; run it by hand (``make models``) and commit the result.

Data: text every Python installation has — the standard library's modules (tests
excluded), the bundled documentation text (``pydoc_data/topics.py``, ``*.txt``) and
chat-formatted samples built from it (a function's docstring as the user turn, the
function as the assistant turn), so that the chat endpoint gives on-topic answers.
Files are split into train and held-out sets by a hash of their relative path.

Training: a byte-level BPE tokenizer shared by both models; the target is trained with
next-token cross-entropy; the draft is distilled from the target (KL to the target's
next-token distribution plus a little cross-entropy), as a real draft/target pair is.

Aligning the draft (on-policy distillation, as DistillSpec does): the target answers chat
prompts built from English prose — the standard library's docstrings and documentation
text and the installed (pinned) packages' descriptions, passages of 60 to 1,300 tokens
with an instruction before or after — greedily and by sampling, and the draft is trained
on the target's own replies (KL to the target's distribution at every reply position),
interleaved with batches of the stdlib stream so that it keeps what it had. Speculation
only ever asks the draft to predict the target's replies, and the first stage never shows
it replies to long prose, where the tiny target drifts into patterns of its own. No
benchmark prompt is used. ``--align-only`` runs this stage alone on the bundled pair.

Determinism: every random choice is seeded. On the same Python (stdlib) version, torch
version and thread count the run repeats; across CPUs, float rounding can differ.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import logging
import math
import pathlib
import random
import re
import sysconfig
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from specedge_bench.agreement import agreement

log = logging.getLogger("train_tiny_pair")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VOCAB_SIZE = 4096
SEQ_LEN = 256
TARGET_ARCH = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
)
DRAFT_ARCH = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64,
)


# ----------------------------------------------------------------------------- data


def stdlib_files() -> list[pathlib.Path]:
    """Standard-library sources and documentation text, tests and site-packages excluded."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [
        f for f in root.rglob("*")
        if f.suffix in (".py", ".txt") and f.is_file() and not skip & set(f.relative_to(root).parts)
    ]
    return sorted(files, key=lambda f: str(f.relative_to(root)))


def is_held_out(path: pathlib.Path) -> bool:
    """About 4% of files, chosen by a hash of the file name (stable across machines)."""
    return hashlib.sha256(path.name.encode()).digest()[0] < 10


def chat_samples(source: str) -> list[str]:
    """Docstring -> function chat pairs from one module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        code = ast.get_source_segment(source, node)
        if not doc or not code or len(code) > 3000 or len(doc) < 20:
            continue
        out.append(
            f"<|im_start|>user\n{doc.strip()}<|im_end|>\n"
            f"<|im_start|>assistant\n{code.strip()}<|im_end|>\n<|endoftext|>"
        )
    return out


def documents(path: pathlib.Path) -> list[str]:
    """The training documents one file yields: its text, plus chat samples for a module."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [text + "<|endoftext|>"] + (chat_samples(text) if path.suffix == ".py" else [])


def load_corpus() -> tuple[list[str], list[str]]:
    """(train documents, held-out documents)."""
    train, held = [], []
    for f in stdlib_files():
        (held if is_held_out(f) else train).extend(documents(f))
    return train, held


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_stream(tok: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- models


def make_config(tok: PreTrainedTokenizerFast, arch: dict) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        **arch,
    )


def batches(stream: torch.Tensor, steps: int, batch: int, gen: torch.Generator):
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch,), generator=gen)
        yield torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])


def lr_at(step: int, steps: int, peak: float, warmup: int = 30) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) + peak * 0.05


def train(model, stream, steps, batch, peak_lr, gen, teacher=None):
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    t0 = time.monotonic()
    for step, x in enumerate(batches(stream, steps, batch, gen)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        logits = model(input_ids=x).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1))
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=x).logits[:, :-1].float(), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), t_logp, log_target=True, reduction="batchmean") / x.shape[1]
            loss = 0.8 * kl + 0.2 * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            log.info("step %d/%d ce %.3f loss %.3f (%.0fs)",
                     step + 1, steps, ce.item(), loss.item(), time.monotonic() - t0)
    model.eval()


# --------------------------------------------------------------- aligning the draft

ALIGN_INSTRUCTIONS = (
    "Summarize the following text.", "What is this text about?", "Explain the main points below.",
    "Read the passage and answer the question at the end.", "Write a short summary.",
    "Rewrite this in simple words.",
)
ALIGN_PASSAGE_TOKENS = (60, 200, 500, 900, 1300)
ALIGN_MAX_PROMPT = 1600
ALIGN_REPLY_TOKENS = 96
ALIGN_HELD_OUT = 80  # replies kept out of training, to measure agreement on


def package_key(name: str) -> str:
    """A distribution's name as both the lock and a ``*.dist-info`` folder can spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def locked_packages() -> set[str]:
    """The distributions pinned in ``requirements.txt`` (SpecEdge's own are not in it)."""
    lock = pathlib.Path(__file__).resolve().parent.parent / "requirements.txt"
    lines = (line.strip() for line in lock.read_text().splitlines())
    return {package_key(re.split(r"[=<>~!@ ;\[]", line)[0]) for line in lines if line and not line.startswith("#")}


def prose_paragraphs() -> list[str]:
    """English paragraphs: stdlib docstrings and documentation text, installed packages' descriptions.

    Only the packages pinned in the lock (``requirements.txt``) are read, so the list is the
    same wherever the lock is installed, whatever else the environment holds.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paragraphs: list[str] = []
    for f in stdlib_files():
        if f.suffix != ".py":
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    paragraphs.extend(p for p in doc.split("\n\n") if len(p) > 80)
    topics = (root / "pydoc_data" / "topics.py").read_text(encoding="utf-8", errors="replace")
    paragraphs.extend(p for p in topics.replace("\\n", "\n").split("\n\n") if len(p) > 80)
    site = sysconfig.get_paths()["purelib"]
    locked = locked_packages()
    for meta in sorted(glob.glob(f"{site}/*.dist-info/METADATA")):
        if package_key(pathlib.Path(meta).parent.name.split("-")[0]) not in locked:
            continue
        body = pathlib.Path(meta).read_text(encoding="utf-8", errors="replace").split("\n\n", 1)[-1]
        paragraphs.extend(p for p in body.split("\n\n") if len(p) > 80 and not p.startswith("    "))
    return paragraphs


def align_prompt(tok: PreTrainedTokenizerFast, paragraphs: list[str], rng: random.Random) -> list[int]:
    """One chat prompt: a passage of consecutive paragraphs with an instruction before or after."""
    chars = rng.choice(ALIGN_PASSAGE_TOKENS) * 4
    i = rng.randrange(len(paragraphs))
    text = ""
    while len(text) < chars and i < len(paragraphs):
        text += paragraphs[i] + "\n\n"
        i += 1
    instruction = rng.choice(ALIGN_INSTRUCTIONS)
    body = f"{instruction}\n\n{text.strip()}" if rng.random() < 0.5 else f"{text.strip()}\n{instruction}"
    text = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"][-ALIGN_MAX_PROMPT:]


@torch.no_grad()
def target_replies(target, tok, n: int, seed: int) -> list[tuple[int, list[int]]]:
    """(prompt length, prompt + the target's reply) for n prompts; every third reply sampled (T = 0.8)."""
    rng = random.Random(seed)
    paragraphs = prose_paragraphs()
    log.info("aligning: %d prose paragraphs", len(paragraphs))
    out, t0 = [], time.monotonic()
    for k in range(n):
        prompt = align_prompt(tok, paragraphs, rng)
        sampled = k % 3 == 2
        torch.manual_seed(seed + k)
        reply = target.generate(
            torch.tensor([prompt]), max_new_tokens=ALIGN_REPLY_TOKENS, do_sample=sampled,
            temperature=0.8 if sampled else None, top_k=0 if sampled else None,
        )
        out.append((len(prompt), reply[0].tolist()))
        if k % 50 == 0 or k == n - 1:
            log.info("target replies %d/%d (%.0fs)", k + 1, n, time.monotonic() - t0)
    return out


def align_draft(draft, target, samples, stream: torch.Tensor, epochs: int, peak_lr: float,
                gen: torch.Generator, per_step: int = 4) -> None:
    """Train the draft on the target's replies (KL at reply positions) plus a stdlib batch a step."""
    def teacher(prompt_len: int, seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = target(input_ids=torch.tensor([seq])).logits[0, prompt_len - 1 : -1]
        return F.log_softmax(logits.float(), -1).half()

    t0 = time.monotonic()
    teachers = [teacher(*s) for s in samples]
    log.info("aligning: target distributions at %d replies (%.0fs)", len(samples), time.monotonic() - t0)
    steps = max(1, epochs * (len(samples) // per_step))
    opt = torch.optim.AdamW(draft.parameters(), lr=peak_lr, weight_decay=0.0, betas=(0.9, 0.95))
    draft.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(samples), generator=gen).tolist()
        for first in range(0, len(order) - per_step + 1, per_step):
            for g in opt.param_groups:
                g["lr"] = peak_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            replies = 0.0
            for i in order[first : first + per_step]:
                prompt_len, seq = samples[i]
                logits = draft(input_ids=torch.tensor([seq])).logits[0, prompt_len - 1 : -1].float()
                replies = replies + F.kl_div(F.log_softmax(logits, -1), teachers[i].float(),
                                             log_target=True, reduction="batchmean")
            x = next(batches(stream, 1, per_step, gen))
            logits = draft(input_ids=x).logits[:, :-1].float().reshape(-1, VOCAB_SIZE)
            with torch.no_grad():
                t_logp = F.log_softmax(target(input_ids=x).logits[:, :-1].float(), -1).reshape(-1, VOCAB_SIZE)
            kept = F.kl_div(F.log_softmax(logits, -1), t_logp, log_target=True, reduction="batchmean")
            loss = replies / per_step + kept
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == steps:
                log.info("align step %d/%d replies KL %.3f stdlib KL %.3f (%.0fs)", step, steps,
                         replies.item() / per_step, kept.item(), time.monotonic() - t0)
    draft.eval()


@torch.no_grad()
def evaluate(target, draft, stream: torch.Tensor, n_seq: int = 48) -> dict:
    """Held-out loss of each model and greedy next-token agreement draft vs target."""
    seqs = stream[: n_seq * SEQ_LEN].view(n_seq, SEQ_LEN)
    out = {"held_out_tokens": int(seqs[:, 1:].numel())}
    argmax = {}
    for name, model in (("target", target), ("draft", draft)):
        losses = []
        preds = []
        for chunk in seqs.split(8):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            targets = chunk[:, 1:].reshape(-1)
            losses.append(F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets, reduction="sum"))
            preds.append(logits.argmax(-1))
        out[f"{name}_held_out_loss"] = round((sum(losses) / out["held_out_tokens"]).item(), 4)
        argmax[name] = torch.cat(preds)
    out["greedy_agreement"] = round((argmax["target"] == argmax["draft"]).float().mean().item(), 4)
    return out


# ------------------------------------------------------------------------- writing


def write_model(model, tok, out_dir: pathlib.Path, card: str, save_tokenizer: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    if save_tokenizer:
        tok.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card)


def model_card(name: str, role: str, model, metrics: dict, args) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return f"""# {name}

The bundled {role} model of SpecEdge: a tiny Qwen3-architecture causal LM trained from
scratch on the Python standard library (sources, docstrings, bundled documentation text
and docstring→function chat samples). It exists so that SpecEdge runs, tests and
benchmarks with nothing downloaded; it is not a useful general-purpose model.

- Architecture: Qwen3, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, \
{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV heads, head dim {cfg.head_dim}), \
MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size}, tied embeddings, float32.
- Parameters: {n_params:,}
- Tokenizer: byte-level BPE, shared with the other model of the pair; ChatML chat template
  (`<|im_start|>role ... <|im_end|>`), end of turn `<|im_end|>`.
- Trained by `models/train_tiny_pair.py` (seed {args.seed}, {args.target_steps} target steps,
  {args.draft_steps} draft distillation steps, batch {args.batch} × {SEQ_LEN} tokens) in
  {metrics['train_minutes']:.1f} minutes on 2 CPU cores; then the draft was aligned to the target's own
  replies ({args.align_replies} chat prompts built from English prose, {args.align_epochs} epochs) in
  {metrics['align_minutes']:.1f} minutes. Command: `make models`.

## Measured quality (held-out stdlib files, {metrics['held_out_tokens']:,} positions)

| metric | value |
|---|---|
| target held-out loss (nats/token) | {metrics['target_held_out_loss']} |
| draft held-out loss (nats/token) | {metrics['draft_held_out_loss']} |
| draft greedy next token == target greedy next token | {metrics['greedy_agreement'] * 100:.1f}% |
| the same on {metrics['held_out_replies']} held-out target replies to prose prompts \
(passages from the training pool; before alignment) | {metrics['reply_agreement'] * 100:.1f}% \
({metrics['reply_agreement_before_alignment'] * 100:.1f}%) |
| target params / draft params | {metrics['param_ratio']:.2f}× |
| both models on disk | {metrics['disk_mb']:.1f} MB |
"""


def align(target, draft, tok, train_stream: torch.Tensor, args) -> dict:
    """The alignment stage; returns the draft's agreement on held-out target replies before and after."""
    samples = target_replies(target, tok, args.align_replies, args.seed + 2)
    n_held = min(ALIGN_HELD_OUT, len(samples) // 4)  # fewer only in a short trial run
    held, train_set = samples[:n_held], samples[n_held:]
    before = agreement(draft, held)["top1"]
    torch.manual_seed(args.seed + 3)
    align_draft(draft, target, train_set, train_stream, args.align_epochs, 1e-3,
                torch.Generator().manual_seed(args.seed + 3))
    after = agreement(draft, held)["top1"]
    log.info("draft agreement on held-out target replies: %.3f -> %.3f", before, after)
    return {"reply_agreement_before_alignment": round(before, 4), "reply_agreement": round(after, 4),
            "held_out_replies": len(held)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--target-steps", type=int, default=600)
    parser.add_argument("--draft-steps", type=int, default=350)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--align-replies", type=int, default=1200)
    parser.add_argument("--align-epochs", type=int, default=3)
    parser.add_argument("--align-only", action="store_true",
                        help="load the pair from --out and run only the draft's alignment stage")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    dirs = {"target": args.out / "specedge-tiny-target", "draft": args.out / "specedge-tiny-draft"}

    train_docs, held_docs = load_corpus()
    log.info("corpus: %d train docs, %d held-out docs", len(train_docs), len(held_docs))
    if args.align_only:
        tok = AutoTokenizer.from_pretrained(dirs["target"])
        target = AutoModelForCausalLM.from_pretrained(dirs["target"]).eval()
        draft = AutoModelForCausalLM.from_pretrained(dirs["draft"]).eval()
        train_minutes = json.loads((args.out / "quality.json").read_text())["train_minutes"]
    else:
        tok = train_tokenizer(train_docs)
    train_stream = token_stream(tok, train_docs)
    held_stream = token_stream(tok, held_docs)
    log.info("tokens: %d train, %d held out", len(train_stream), len(held_stream))

    if not args.align_only:
        target = Qwen3ForCausalLM(make_config(tok, TARGET_ARCH))
        train(target, train_stream, args.target_steps, args.batch, 2e-3, torch.Generator().manual_seed(args.seed))
        torch.manual_seed(args.seed + 1)
        draft = Qwen3ForCausalLM(make_config(tok, DRAFT_ARCH))
        train(draft, train_stream, args.draft_steps, args.batch, 3e-3,
              torch.Generator().manual_seed(args.seed + 1), teacher=target)
        train_minutes = round((time.monotonic() - t_start) / 60, 1)
    t_align = time.monotonic()
    alignment = align(target, draft, tok, train_stream, args)

    metrics = evaluate(target, draft, held_stream)
    metrics.update(alignment)
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in draft.parameters())
    metrics["param_ratio"] = n_t / n_d
    metrics["train_minutes"] = train_minutes
    metrics["align_minutes"] = round((time.monotonic() - t_align) / 60, 1)
    for role, model in (("target", target), ("draft", draft)):
        if role == "draft" or not args.align_only:  # --align-only: the tokenizer files stay as they are
            write_model(model, tok, dirs[role], "", save_tokenizer=not args.align_only)
    metrics["disk_mb"] = sum(f.stat().st_size for d in dirs.values() for f in d.iterdir()) / 1e6
    for role, model in (("target", target), ("draft", draft)):
        (dirs[role] / "README.md").write_text(model_card(dirs[role].name, role, model, metrics, args))
    (args.out / "quality.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("done in %.0fs: %s", time.monotonic() - t_start, metrics)


if __name__ == "__main__":
    main()
