"""Driving sessions on the bus as a gateway would, and the reference they must match."""

import asyncio
import time
import uuid

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specedge import protocol, subjects
from specedge.models import BUNDLED_TARGET, bundled, chat_prompt_ids
from specedge.protocol import SessionOpen, SessionOpened, TokenEvent


def prompt_and_reference(text: str, new_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """The chat-templated prompt's ids, the target's own greedy continuation, its end-of-turn ids."""
    tok = AutoTokenizer.from_pretrained(bundled(BUNDLED_TARGET))
    target = AutoModelForCausalLM.from_pretrained(bundled(BUNDLED_TARGET)).eval()
    ids = chat_prompt_ids(tok, text)
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens)[0, len(ids):]
    return ids, out.tolist(), list(target.generation_config.eos_token_id)


async def open_session(nc, request: SessionOpen) -> SessionOpened:
    for _ in range(40):  # the scheduler learns of verifiers and edges from their heartbeats
        reply = protocol.decode((await nc.request(subjects.SESSIONS_OPEN, protocol.encode(request),
                                                  timeout=30)).data, SessionOpened)
        if reply.error is None or "no verifier" not in reply.error:
            return reply
        await asyncio.sleep(0.25)
    return reply


async def one_session(nats_url: str, question: str, new_tokens: int, **fields) -> tuple[SessionOpened, list[int],
                                                                                      list[int]]:
    """Open a session for `question` as a gateway would (a `SessionOpen` with `fields`), and
    collect its tokens: (the reply, the tokens, the target's own greedy reference)."""
    import nats

    ids, reference, eos = prompt_and_reference(question, new_tokens)
    nc = await nats.connect(nats_url)
    try:
        sid = uuid.uuid4().hex
        sub = await nc.subscribe(subjects.session_tokens(sid))
        opened = await open_session(nc, SessionOpen(session_id=sid, tokens=ids, max_new_tokens=new_tokens,
                                                    eos_ids=eos, **fields))
        tokens = (await collect(sub))[0] if opened.error is None else []
        return opened, tokens, reference
    finally:
        await nc.close()


async def collect(sub, on_first=None, arrivals: list[float] | None = None) -> tuple[list[int], list[TokenEvent]]:
    """A session's token events until it finishes (checking none is lost or repeated);
    `on_first` runs after the first, and each arrival time goes into `arrivals`."""
    tokens, events = [], []
    while True:
        event = protocol.decode((await sub.next_msg(timeout=60)).data, TokenEvent)
        if arrivals is not None:
            arrivals.append(time.monotonic())
        assert event.index == len(tokens)  # nothing lost, nothing repeated
        tokens += event.tokens
        events.append(event)
        if len(events) == 1 and on_first:
            on_first()
        if event.finished:
            return tokens, events
