"""Load: concurrent streaming clients against `specedge up` for a while — zero errors, every
output exact, nothing leaked afterwards, memory flat.

`SPECEDGE_SOAK_CLIENTS` official `openai` async clients (default 8) stream chat completions
back to back for `SPECEDGE_SOAK_SECONDS` (default 20) against `specedge up` with the
bundled models, on loopback. Each answer must be the target's own greedy output
(precomputed with `transformers`), no request may fail, and afterwards no session may be
left anywhere: no `specedge:session:*` key and no concurrency count in Redis, no session
in the scheduler, the verifier's cache slots and the edges' all free. The resident memory
of every service process after the run must be within `GROWTH` of what it was after the
warm-up. `make soak` runs the full variant (64 clients, 5 minutes) and writes the numbers
to `SPECEDGE_SOAK_REPORT` (docs/benchmarks.md records them).
"""

import asyncio
import json
import os
import pathlib
import statistics
import time

import nats
import openai
import psutil
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge import protocol, subjects
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import ServiceStats
from tests.helpers import discover, specedge_up, wait_for

pytestmark = pytest.mark.e2e
MODEL = "specedge-tiny-target"
CLIENTS = int(os.environ.get("SPECEDGE_SOAK_CLIENTS", "8"))
SECONDS = float(os.environ.get("SPECEDGE_SOAK_SECONDS", "20"))
EDGES = int(os.environ.get("SPECEDGE_SOAK_EDGES", "2"))
REPORT = os.environ.get("SPECEDGE_SOAK_REPORT")
MAX_TOKENS = 48
GROWTH = (1.15, 48 * 2**20)  # allowed RSS after / after warm-up: at most ×1.15 + 48 MiB per process
KEY = "sk-specedge-soak-test-key-0000"
QUESTIONS = [f"Write a function that {task}." for task in (
    "reverses a string", "sums a list", "checks for a palindrome", "merges two sorted lists",
    "counts words in a text", "finds the largest number", "parses a date", "removes duplicates",
    "flattens a nested list", "computes a factorial", "converts Celsius to Fahrenheit", "sorts a dictionary")]


def references() -> list[str]:
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    model = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    texts = []
    for question in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS)[0, len(ids):]
        texts.append(tok.decode(out, skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def up():
    # Room for every client at once: verifier and edge slots, and the per-key limit.
    env = {"SPECEDGE_MAX_SESSIONS": str(max(8, CLIENTS)), "SPECEDGE_MAX_LEN": "512",
            "SPECEDGE_MAX_CONTEXT": "512", "SPECEDGE_MAX_CONCURRENT_PER_KEY": str(CLIENTS), "SPECEDGE_LOG_LEVEL":
            "warning"}
    with specedge_up("--edges", str(EDGES), "--api-key", KEY, env=env) as stack:
        yield {"url": stack.url, "nats_url": stack.nats_url, "redis_url": stack.redis_url, "pid": stack.pid}


def service_rss(pid: int) -> dict[str, int]:
    """Resident memory of each process `specedge up` started, by its role (and pid)."""
    found = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
            role = next((a for a in argv if a in ("verifier", "scheduler", "gateway", "edge-agent")),
                        pathlib.Path(argv[0]).name)
            found[f"{role}-{child.pid}"] = child.memory_info().rss
        except psutil.Error:
            continue
    return found


class Load:
    """The clients and what they saw."""

    def __init__(self, url: str, expected: list[str]) -> None:
        self.url, self.expected = url, expected
        self.errors, self.wrong, self.done = [], [], []  # done: (ttft s, total s, tokens, chunk gaps)

    async def run(self, seconds: float, record: bool = True) -> None:
        end = time.monotonic() + seconds
        await asyncio.gather(*(self.client(i, end, record) for i in range(CLIENTS)))

    async def client(self, i: int, end: float, record: bool) -> None:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=180)
        j = 0
        while time.monotonic() < end:
            n = (i + j) % len(QUESTIONS)
            j += 1
            started, arrivals, parts, usage = time.monotonic(), [], [], None
            try:
                stream = await client.chat.completions.create(
                    model=MODEL, temperature=0, max_tokens=MAX_TOKENS, stream=True,
                    stream_options={"include_usage": True}, messages=[{"role": "user", "content": QUESTIONS[n]}])
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
                        arrivals.append(time.monotonic())
            except openai.OpenAIError as exc:
                self.errors.append(f"client {i}: {exc!r}")
                continue
            if "".join(parts) != self.expected[n]:
                self.wrong.append((n, "".join(parts)))
            elif record and arrivals:
                gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
                self.done.append((arrivals[0] - started, arrivals[-1] - started, usage or 0, gaps))
        await client.close()


async def all_stats(nats_url: str) -> dict[str, dict[str, float]]:
    found = await asyncio.to_thread(discover, nats_url)
    nc = await nats.connect(nats_url)
    try:
        out = {}
        for a in found:
            if a.role in ("verifier", "scheduler", "edge-agent"):
                reply = await nc.request(subjects.stats(a.role, a.instance_id), b"", timeout=10)
                out[a.name] = protocol.decode(reply.data, ServiceStats).counters | {"role": a.role}
        return out
    finally:
        await nc.close()


def leftovers(redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return sorted(k.decode() for k in client.scan_iter(match="specedge:*")
                      if k.startswith(b"specedge:session:") or k.endswith(b":active"))
    finally:
        client.close()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@pytest.mark.timeout(SECONDS + 900)
async def test_concurrent_streaming_clients_all_exact_nothing_leaked_memory_flat(up):
    expected = await asyncio.to_thread(references)
    load = Load(up["url"], expected)
    await load.run(min(15.0, SECONDS / 4), record=False)  # warm-up: caches, allocator, JIT paths
    assert not load.errors and not load.wrong, (load.errors[:5], load.wrong[:2])
    rss_before = service_rss(up["pid"])
    started = time.monotonic()
    await load.run(SECONDS)
    elapsed = time.monotonic() - started
    assert load.errors == [], load.errors[:10]
    assert load.wrong == [], load.wrong[:3]
    assert len(load.done) >= CLIENTS

    # Nothing left behind: Redis, the scheduler, the verifier's slots, the edges' sessions.
    await asyncio.to_thread(wait_for, lambda: not leftovers(up["redis_url"]), 15, "Redis session keys to go")
    stats = await all_stats(up["nats_url"])
    for name, counters in stats.items():
        busy = {k: counters.get(k, 0) for k in ("sessions", "in_flight", "queued")}
        assert busy == dict.fromkeys(busy, 0), (name, counters)
    assert {c["role"] for c in stats.values()} == {"verifier", "scheduler", "edge-agent"}

    # Memory flat: every service's RSS within GROWTH of its value after the warm-up.
    rss_after = service_rss(up["pid"])
    grown = {p: (rss_before[p], rss_after[p]) for p in rss_before
             if p in rss_after and rss_after[p] > rss_before[p] * GROWTH[0] + GROWTH[1]}
    assert not grown, grown

    ttft = [d[0] for d in load.done]
    total = [d[1] for d in load.done]
    itl = [g for d in load.done for g in d[3]]
    tokens = sum(d[2] for d in load.done)
    report = {
        "clients": CLIENTS, "seconds": round(elapsed, 1), "edges": EDGES, "requests": len(load.done),
        "errors": len(load.errors), "wrong": len(load.wrong), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1), "requests_per_s": round(len(load.done) / elapsed, 2),
        "ttft_s": {f"p{q}": round(pct(ttft, q), 3) for q in (50, 90, 99)},
        "latency_s": {f"p{q}": round(pct(total, q), 3) for q in (50, 90, 99)},
        "chunk_gap_s": {f"p{q}": round(pct(itl, q), 3) for q in (50, 90, 99)} if len(itl) > 1 else {},
        "rss_mib": {p: [round(rss_before[p] / 2**20), round(rss_after.get(p, 0) / 2**20)] for p in rss_before},
    }
    print(json.dumps(report, indent=1))
    if REPORT:
        await asyncio.to_thread(pathlib.Path(REPORT).write_text, json.dumps(report, indent=1) + "\n")
