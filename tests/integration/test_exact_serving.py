"""Exact end to end, in bfloat16: 20 Spec-Bench prompts × greedy and seeded sampling × every
mode, served by real processes over NATS (a verifier, a good edge, a server-side drafter, a
scheduler) with 1, 4 and 16 sessions in flight and a hostile edge drafting beside them.
Every output is identical, token for token, to the engine's own `autoregressive` output
computed alone in this process — the definition of exact the README states."""

import asyncio
import logging
import signal
import time
import uuid

import msgspec
import nats
import pytest
from transformers import AutoTokenizer

from specedge import subjects
from specedge.engine.generate import MODES, generate
from specedge.engine.loading import load_causal_lm
from specedge.engine.parties import Verifier
from specedge.models import BUNDLED_DRAFT, BUNDLED_TARGET, bundled, chat_prompt_ids, tokenizer_fingerprint
from specedge.protocol import SamplingSpec, SessionOpen
from tests.helpers import registered, schedulers_know, start_cli, wait_for
from tests.integration.test_equivalence import sample_prompts
from tests.integration.test_hostile_edge import hostile_edge
from tests.sessions import collect, open_session

logger = logging.getLogger(__name__)
NEW_TOKENS = 16
SAMPLINGS = {"greedy": SamplingSpec(), "seeded": SamplingSpec(temperature=0.8, top_p=0.95, top_k=50)}


@pytest.fixture(scope="module")
def references():
    """(prompt ids, sampling, autoregressive output) for every prompt and sampling: the engine
    alone, one token per pass, one session at a time."""
    target = load_causal_lm(bundled(BUNDLED_TARGET), "cpu", "bfloat16")
    verifier = Verifier(target.model, max_sessions=1, max_len=4096)
    eos = set(target.model.generation_config.eos_token_id)
    cases = []
    for i, text in enumerate(sample_prompts()):
        ids = chat_prompt_ids(target.tokenizer, text)
        for name, spec in SAMPLINGS.items():
            spec = msgspec.structs.replace(spec, seed=1000 + i)
            out = generate("autoregressive", verifier, None, ids, spec, NEW_TOKENS, eos).token_ids
            cases.append((f"{i}-{name}", ids, spec, out, sorted(eos)))
    return cases


async def test_every_mode_at_every_load_equals_the_autoregressive_output(references, nats_url, redis_url, cli_env,
                                                                        tmp_path):
    engine = ["--dtype", "bfloat16"]
    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-sessions", "16",
                               *engine], cli_env, tmp_path / "verifier.log"),
        # fewer slots than the hostile edge announces: the scheduler gives the hostile edge sessions too
        "edge-agent": start_cli(["edge-agent", "--nats-url", nats_url, "--max-sessions", "4", *engine], cli_env,
                                tmp_path / "edge.log"),
        "server-drafter": start_cli(["edge-agent", "--nats-url", nats_url, "--server-side", "--max-sessions", "16",
                                     *engine], cli_env, tmp_path / "drafter.log"),
        "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url], cli_env,
                               tmp_path / "scheduler.log"),
    }
    stop = asyncio.Event()
    try:
        for key, proc in procs.items():
            role = "edge-agent" if key == "server-drafter" else key
            await asyncio.to_thread(wait_for, lambda r=role, p=proc: registered(nats_url, r, p.pid), 120, key)
        nc = await nats.connect(nats_url)
        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(bundled(BUNDLED_DRAFT)))
        evil = await hostile_edge(nc, fingerprint, stop, {})
        await schedulers_know(nc, edges=3)  # the good edge, the server-side drafter and the hostile one

        async def run(case, mode: str) -> tuple[str, str, list[int], list[int], str | None]:
            name, ids, spec, expected, eos = case
            sid = uuid.uuid4().hex
            sub = await nc.subscribe(subjects.session_tokens(sid))
            opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, sampling=spec, mode=mode,
                                                        max_new_tokens=NEW_TOKENS, eos_ids=eos))
            assert opened.error is None, opened.error
            assert opened.engine == "exact-bfloat16"
            tokens, _ = await collect(sub)
            await sub.unsubscribe()
            return name, mode, tokens, expected, opened.edge

        edges_used = set()
        async def limited(gate, case, mode):
            async with gate:
                return await run(case, mode)

        for in_flight in (1, 4, 16):
            gate, started = asyncio.Semaphore(in_flight), time.monotonic()
            results = await asyncio.gather(*(limited(gate, case, mode) for case in references for mode in MODES))
            logger.warning("%d sessions, %d in flight: %.1f s", len(results), in_flight, time.monotonic() - started)
            wrong = [(name, mode, got, want) for name, mode, got, want, _ in results if got != want]
            assert not wrong, (in_flight, len(wrong), wrong[:2])
            edges_used |= {edge for *_, edge in results}
        assert evil in edges_used  # the hostile edge drafted for some of them
        assert all(p.poll() is None for p in procs.values())
        await nc.close()
    finally:
        stop.set()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()
