"""The gateway's side of lost and repeated token events, against real NATS and Redis.

A stand-in scheduler on the bus opens the session as the real one does (its Redis record
with the committed tokens) and then sends token events with a gap (as when the bus
restarted and swallowed one), a re-send from index 0 (as a scheduler that took the
session over does), or no end at all. The gateway's `generate` must give every token
once, in order — the gap filled from Redis — or fail with a clear error.
"""

import asyncio

import nats
import pytest

from specedge import protocol, subjects
from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import SamplingSpec, SessionOpen, SessionOpened, TokenEvent
from specedge.state import SessionStore, connect_redis
from specedge_gateway.openai_api import GenerationSpec, OpenAIError
from specedge_gateway.sessions import generate
from specedge_gateway.text import TextCodec

OUTPUT = list(range(1000, 1012))  # twelve ordinary token ids


def spec() -> GenerationSpec:
    return GenerationSpec(model="m", messages=None, prompt="x", max_tokens=len(OUTPUT), temperature=0, top_p=1,
                          seed=0, stop=[], stream=True, include_usage=False, mode="specedge")


async def run(nats_url: str, redis_url: str, events, commit: bool = True, end_record: bool = False):
    """Serve one session with `events(sid)` (TokenEvents to send) and return what `generate` gave."""
    codec = TextCodec(bundled(BUNDLED_TARGET))
    async with connect_redis(redis_url) as client:
        store = SessionStore(client)
        nc = await nats.connect(nats_url)
        opened: list[str] = []

        async def on_open(msg):
            request = protocol.decode(msg.data, SessionOpen)
            sid = request.session_id
            opened.append(sid)
            await store.create(sid, request.tokens, SamplingSpec(), scheduler="stand-in",
                               max_new_tokens=request.max_new_tokens, eos_ids=request.eos_ids)
            if commit:  # what the verifier commits before the scheduler publishes
                await store.commit(sid, 0, len(request.tokens), OUTPUT)
            await msg.respond(protocol.encode(SessionOpened(session_id=sid, verifier="v")))
            for event in events(sid):
                await nc.publish(subjects.session_tokens(sid), protocol.encode(event))
            if end_record:
                await store.end(sid)

        sub = await nc.subscribe(subjects.SESSIONS_OPEN, cb=on_open)
        gateway_nc = await nats.connect(nats_url)
        try:
            pieces = [p async for p in generate(gateway_nc, codec, spec(), [1, 2, 3], len(OUTPUT), store=store,
                                                resync_s=0.3, token_timeout_s=5)]
        finally:
            await sub.unsubscribe()
            await gateway_nc.close()
            await nc.close()
            for sid in opened:  # no record left behind: a later test's scheduler would adopt it as orphaned
                await store.end(sid)
    return codec, pieces


def event(sid: str, start: int, end: int, finished: bool = False) -> TokenEvent:
    return TokenEvent(session_id=sid, index=start, tokens=OUTPUT[start:end], finished=finished,
                      finish_reason="length" if finished else None)


def text_of(codec: TextCodec, tokens: list[int]) -> str:
    return codec.tokenizer.decode(tokens, skip_special_tokens=True)


async def test_a_lost_event_is_filled_from_the_committed_tokens(nats_url, redis_url):
    codec, pieces = await run(nats_url, redis_url, lambda sid: [event(sid, 0, 3), event(sid, 7, 12, True)])
    assert "".join(p.text for p in pieces) == text_of(codec, OUTPUT)  # tokens 3..6 came from Redis
    assert pieces[-1].completion_tokens == len(OUTPUT) and pieces[-1].finish_reason == "length"


async def test_a_re_sent_part_is_skipped(nats_url, redis_url):
    codec, pieces = await run(nats_url, redis_url, lambda sid: [
        event(sid, 0, 5), event(sid, 0, 8), event(sid, 2, 4), event(sid, 8, 12, True)])
    assert "".join(p.text for p in pieces) == text_of(codec, OUTPUT)
    assert pieces[-1].completion_tokens == len(OUTPUT)


async def test_a_lost_end_is_read_from_redis_while_the_record_is_there(nats_url, redis_url):
    codec, pieces = await run(nats_url, redis_url, lambda sid: [event(sid, 0, 4)])
    assert "".join(p.text for p in pieces) == text_of(codec, OUTPUT)
    assert pieces[-1].finish_reason == "length"


async def test_a_lost_end_with_the_record_gone_is_a_clear_error(nats_url, redis_url):
    with pytest.raises(OpenAIError) as err:
        await asyncio.wait_for(run(nats_url, redis_url, lambda sid: [event(sid, 0, 4)], end_record=True), 30)
    assert err.value.status == 503 and "did not arrive" in err.value.message


async def test_a_gap_that_redis_cannot_fill_is_a_clear_error(nats_url, redis_url):
    with pytest.raises(OpenAIError) as err:
        await run(nats_url, redis_url, lambda sid: [event(sid, 0, 3), event(sid, 7, 12, True)], commit=False)
    assert err.value.status == 503 and "could not be recovered" in err.value.message
