"""Session state and API keys in Redis: the one place that knows the key schema.

Used by the gateway (API keys; committed tokens, to fill a gap in a token stream), the
scheduler (creates, takes over and ends session records) and the verifier (commits
tokens, reads them back to re-prefill). The edge agent never imports this.

Key schema (every key under `specedge:`; see docs/architecture.md):

- `specedge:session:{sid}` (hash): user, mode, scheduler, verifier, edge, sampling
  (msgpack), prompt_len, max_new, eos (comma-separated ids), cycle, ttl. Expires `ttl`
  seconds (the scheduler's `--session-ttl`) after the last commit.
- `specedge:session:{sid}:tokens` (list): the committed token ids, prompt then output.
  Same expiry.
- `specedge:session:{sid}:prompt_logprobs` (msgpack): the prompt's `TokenLogprob`s, when
  the session asked (`SamplingSpec.prompt_logprobs`: completions' `echo`). Written by the
  verifier before its first result, taken (read and deleted) by the gateway; outlives the
  session's end by up to `PROMPT_LOGPROBS_TTL_S`.
- `specedge:apikey:{sha256(key)}` (hash): user, label, created (unix seconds). No expiry:
  removed by `specedge keys revoke`.
- `specedge:user:{user}:active` (integer): the user's requests generating now, over all
  gateways. Expires an hour after the last request started (bounds what a crashed
  gateway leaves); deleted when it falls to 0.

A session's keys are deleted when it ends; the TTL bounds what a crashed scheduler leaves
behind. Commits are idempotent: `commit()` appends a cycle's tokens only if the stored
cycle and committed length are the ones the cycle was verified against, so a replayed or
late cycle never commits twice. A session whose scheduler died is taken over by another
scheduler with `claim()` (compare-and-set of the `scheduler` field: one taker wins), which
reads everything it needs to go on from the record. API keys are stored only as SHA-256 hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from specedge.protocol import SamplingSpec, TokenLogprob

log = logging.getLogger(__name__)

PREFIX = "specedge"
DEFAULT_SESSION_TTL_S = 3600
API_KEY_PREFIX = "sk-specedge-"
EDGE_TOKEN_PREFIX = "se-edge-"


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


def tokens_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}:tokens"


def prompt_logprobs_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}:prompt_logprobs"


PROMPT_LOGPROBS_TTL_S = 600


def edge_suspension_key(edge_id: str) -> str:
    return f"{PREFIX}:edge_suspended:{edge_id}"


def api_key_key(key_hash: str) -> str:
    return f"{PREFIX}:apikey:{key_hash}"


def sentinel_of(url: str) -> tuple[list[tuple[str, int]], str, int] | None:
    """(Sentinels, service name, db) of a `redis+sentinel://HOST:PORT,…/SERVICE/DB` URL; None
    for a plain `redis://` one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis+sentinel":
        return None
    hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in parts.netloc.rsplit("@", 1)[-1].split(",")]
    service, _, db = parts.path.strip("/").partition("/")
    if not hosts or not service:
        raise ValueError(f"expected redis+sentinel://HOST:PORT,…/SERVICE[/DB], got {url!r}")
    return hosts, service, int(db or 0)


@contextlib.asynccontextmanager
async def connect_redis(url: str) -> AsyncIterator[aioredis.Redis]:
    """Connect and PING; a server that does not answer is a clear `ConnectionError`.

    `redis+sentinel://HOST:PORT,…/SERVICE/DB`: ask those Sentinels which server is the
    primary of SERVICE, and again whenever the connection to it is lost (a failover)."""
    if (sentinel := sentinel_of(url)) is not None:
        hosts, service, db = sentinel
        password = urllib.parse.urlsplit(url).password
        watchers = Sentinel(hosts, socket_timeout=2, sentinel_kwargs={"socket_timeout": 2})
        client = watchers.master_for(service, db=db, password=password, socket_connect_timeout=5,
                                     socket_timeout=5, health_check_interval=10)
    else:
        client = aioredis.from_url(url, socket_connect_timeout=5, health_check_interval=10)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise ConnectionError(f"cannot reach Redis at {url}: {exc}") from exc
    log.info("redis: connected to %s", url)
    try:
        yield client
    finally:
        await client.aclose()


# -- sessions ------------------------------------------------------------------------------

class NotReplicatedError(RedisError):
    """A commit reached the primary but not its replicas in time: it is not acknowledged (the
    verifier answers `state_unavailable`; a retry finds it committed, or — after a failover
    that lost it — commits it again)."""


class Commit(Enum):
    DONE = 1
    ALREADY = 0        # this cycle was committed before: a replay, nothing appended
    STALE = -1         # the session is at another cycle or length: refused
    UNKNOWN = -2       # no such session (ended, expired or never opened)


# KEYS: session hash, tokens list. ARGV: cycle, committed_len, token ids...
_COMMIT = """
local fields = redis.call('HMGET', KEYS[1], 'cycle', 'ttl')
if not fields[1] then return -2 end
local cycle, want = tonumber(fields[1]), tonumber(ARGV[1])
if cycle > want then return 0 end
if cycle < want or redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return -1 end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 3))
redis.call('HSET', KEYS[1], 'cycle', want + 1)
redis.call('EXPIRE', KEYS[1], fields[2])
redis.call('EXPIRE', KEYS[2], fields[2])
return 1
"""

# KEYS: session hash. ARGV: the scheduler it had, the one taking it over.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'scheduler') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'scheduler', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class SessionRecord:
    """What is needed to resume a session elsewhere: its committed tokens and how it samples."""

    session_id: str
    tokens: list[int]
    sampling: SamplingSpec
    cycle: int
    user: str = ""
    mode: str = "specedge"
    scheduler: str = ""
    verifier: str = ""
    edge: str = ""
    prompt_len: int = 0
    max_new_tokens: int = 0  # 0: not recorded
    eos_ids: tuple[int, ...] = ()
    idle_s: float = 0.0  # seconds since it was created or last committed (from its key's TTL)

    @property
    def output(self) -> list[int]:
        """The committed output tokens (after the prompt)."""
        return self.tokens[self.prompt_len:]


class SessionStore:
    """Session records: create, commit a cycle's tokens idempotently, load, end."""

    REPLICATION_WAIT_MS = 1000  # how long a commit waits for a replica's acknowledgement

    def __init__(self, client: aioredis.Redis, ttl_s: int = DEFAULT_SESSION_TTL_S, replicas: int = 0) -> None:
        """`replicas`: replicas that must hold a commit before it counts (`WAIT`): with one, a
        failover to the replica never loses a committed token (Redis with Sentinel)."""
        self.client, self.ttl_s, self.replicas = client, ttl_s, replicas
        self._replicas_seen, self._replicas_checked = replicas, float("-inf")
        self._commit = client.register_script(_COMMIT)
        self._claim = client.register_script(_CLAIM)

    async def create(self, session_id: str, tokens: list[int], sampling: SamplingSpec, *, user: str = "",
                     mode: str = "specedge", scheduler: str = "", verifier: str = "", edge: str = "",
                     max_new_tokens: int = 0, eos_ids: list[int] | tuple[int, ...] = ()) -> None:
        fields = {"user": user, "mode": mode, "scheduler": scheduler, "verifier": verifier, "edge": edge,
                  "sampling": msgspec.msgpack.encode(sampling), "prompt_len": len(tokens), "cycle": 0,
                  "max_new": max_new_tokens, "eos": ",".join(str(t) for t in eos_ids), "ttl": self.ttl_s}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(session_key(session_id), tokens_key(session_id))
            pipe.hset(session_key(session_id), mapping=fields)
            pipe.rpush(tokens_key(session_id), *tokens)
            pipe.expire(session_key(session_id), self.ttl_s)
            pipe.expire(tokens_key(session_id), self.ttl_s)
            await pipe.execute()

    async def assign(self, session_id: str, **owners: str) -> None:
        """Record a new owner (`verifier=…`, `edge=…`) of a live session."""
        if await self.client.exists(session_key(session_id)):
            await self.client.hset(session_key(session_id), mapping=owners)

    async def commit(self, session_id: str, cycle: int, committed_len: int, tokens: list[int]) -> Commit:
        """Append one verified cycle's tokens, exactly once (see the module docstring)."""
        if not tokens:
            raise ValueError("a cycle commits at least its bonus token")
        code = await self._commit(keys=[session_key(session_id), tokens_key(session_id)],
                                  args=[cycle, committed_len, *tokens])
        if self.replicas and Commit(int(code)) is Commit.DONE and (wanted := await self._replicas_up()):
            acked = await self.client.execute_command("WAIT", wanted, self.REPLICATION_WAIT_MS)
            if acked < wanted:  # on the primary only: not yet durable, so not acknowledged
                raise NotReplicatedError(f"{acked} of {wanted} replicas acknowledged the commit")
        return Commit(int(code))

    async def _replicas_up(self) -> int:
        """How many of `replicas` the primary has connected now (checked at most once a second):
        after a failover and until the old primary returns as a replica there is none to wait
        for, and commits go on — durable on one server, as without Sentinel."""
        now = time.monotonic()
        if now - self._replicas_checked > 1.0:
            role = await self.client.execute_command("ROLE")
            up = len(role[2]) if role and role[0] in (b"master", "master") else 0
            if up < self.replicas and self._replicas_seen >= self.replicas:
                log.warning("redis: %d of %d replicas connected: commits are on the primary only", up, self.replicas)
            self._replicas_seen, self._replicas_checked = up, now
        return min(self.replicas, self._replicas_seen)

    async def claim(self, session_id: str, dead_scheduler: str, scheduler: str) -> bool:
        """Take over a session from `dead_scheduler`; False if it is gone or another took it first."""
        return bool(await self._claim(keys=[session_key(session_id)], args=[dead_scheduler, scheduler]))

    async def session_ids(self) -> list[str]:
        """Every live session's id (a SCAN: for takeovers, not for the hot path)."""
        found = []
        async for name in self.client.scan_iter(match=session_key("*"), count=500):
            name = name.decode()
            if not name.endswith(":tokens"):
                found.append(name.rsplit(":", 1)[-1])
        return found

    async def load(self, session_id: str) -> SessionRecord | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(session_key(session_id))
            pipe.lrange(tokens_key(session_id), 0, -1)
            pipe.ttl(session_key(session_id))
            fields, tokens, left = await pipe.execute()
        if not fields:
            return None
        return SessionRecord(
            session_id=session_id, tokens=[int(t) for t in tokens],
            sampling=msgspec.msgpack.decode(fields[b"sampling"], type=SamplingSpec),
            cycle=int(fields[b"cycle"]), user=fields.get(b"user", b"").decode(),
            mode=fields.get(b"mode", b"specedge").decode(), scheduler=fields.get(b"scheduler", b"").decode(),
            verifier=fields.get(b"verifier", b"").decode(), edge=fields.get(b"edge", b"").decode(),
            prompt_len=int(fields.get(b"prompt_len", b"0")), max_new_tokens=int(fields.get(b"max_new", b"0")),
            eos_ids=tuple(int(t) for t in fields.get(b"eos", b"").decode().split(",") if t),
            idle_s=max(0.0, float(fields.get(b"ttl", b"0")) - left) if left >= 0 else 0.0)

    async def end(self, session_id: str) -> None:
        await self.client.delete(session_key(session_id), tokens_key(session_id))

    async def save_prompt_logprobs(self, session_id: str, entries: list[TokenLogprob]) -> None:
        await self.client.set(prompt_logprobs_key(session_id), msgspec.msgpack.encode(entries),
                              ex=PROMPT_LOGPROBS_TTL_S)

    async def take_prompt_logprobs(self, session_id: str) -> list[TokenLogprob] | None:
        """The prompt's logprobs the verifier saved (once: the key goes), or None."""
        data = await self.client.getdel(prompt_logprobs_key(session_id))
        return None if data is None else msgspec.msgpack.decode(data, type=list[TokenLogprob])

    async def suspend_edge(self, edge_id: str, seconds: float) -> None:
        """Record that an edge is cut off, for every scheduler, for `seconds`."""
        await self.client.set(edge_suspension_key(edge_id), 1, px=max(1, int(seconds * 1000)))

    async def edge_suspension(self, edge_id: str) -> float:
        """Seconds left of an edge's suspension (0: none)."""
        return max(0.0, await self.client.pttl(edge_suspension_key(edge_id)) / 1000)


# -- API keys ------------------------------------------------------------------------------

def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyInfo:
    key_hash: str
    user: str
    label: str
    created: float
    edge: bool = False  # an edge token: joins edges (`specedge edge-agent --api-key`), not API calls


def edge_owner_key(edge_id: str) -> str:
    return f"{PREFIX}:edge:{edge_id}:owner"


class ApiKeys:
    """Gateway API keys, stored hashed: create (the key is shown once), check, list, revoke."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def create(self, user: str, label: str = "", key: str | None = None, edge: bool = False) -> str:
        """Store a key for `user` and return it (a fresh random one unless `key` is given).
        `edge`: an edge token — it joins edges to NATS (the user's own, or with no user the
        shared pool's) and is refused by the gateway."""
        if len(user) > 64 or not (user or edge):
            raise ValueError("a user name is 1 to 64 characters")
        key = key or (EDGE_TOKEN_PREFIX if edge else API_KEY_PREFIX) + secrets.token_urlsafe(24)
        if len(key) < 16:
            raise ValueError("an API key is at least 16 characters")
        await self.client.hset(api_key_key(hash_api_key(key)), mapping={
            "user": user, "label": label, "created": time.time(), "kind": "edge" if edge else "api"})
        return key

    async def user_of(self, key: str) -> str | None:
        """The user an API key belongs to, or None if it is unknown, revoked or an edge token."""
        user, kind = await self.client.hmget(api_key_key(hash_api_key(key)), ["user", "kind"])
        return user.decode() if user is not None and kind != b"edge" else None

    async def holder(self, key: str) -> ApiKeyInfo | None:
        """Whose key (an API key or an edge token) this is; None if unknown or revoked."""
        key_hash = hash_api_key(key)
        fields = await self.client.hgetall(api_key_key(key_hash))
        return self._info(key_hash, fields) if fields else None

    async def exists(self, key_hash: str) -> bool:
        return bool(await self.client.exists(api_key_key(key_hash)))

    @staticmethod
    def _info(key_hash: str, fields: dict[bytes, bytes]) -> ApiKeyInfo:
        return ApiKeyInfo(key_hash, fields[b"user"].decode(), fields.get(b"label", b"").decode(),
                          float(fields[b"created"]), fields.get(b"kind") == b"edge")

    async def list(self) -> list[ApiKeyInfo]:
        found = []
        async for name in self.client.scan_iter(match=api_key_key("*"), count=500):
            fields = await self.client.hgetall(name)
            if fields:
                found.append(self._info(name.decode().rsplit(":", 1)[-1], fields))
        return sorted(found, key=lambda k: k.created)

    async def revoke(self, key_or_hash_prefix: str) -> int:
        """Revoke a key given itself or ≥ 8 hex digits of its hash (see `list`); returns how many."""
        if removed := await self.client.delete(api_key_key(hash_api_key(key_or_hash_prefix))):
            return removed
        if len(key_or_hash_prefix) < 8 or any(c not in "0123456789abcdef" for c in key_or_hash_prefix):
            return 0
        names = [n async for n in self.client.scan_iter(match=api_key_key(key_or_hash_prefix + "*"))]
        return await self.client.delete(*names) if names else 0


# -- per-user concurrency ---------------------------------------------------------------

def active_key(user: str) -> str:
    return f"{PREFIX}:user:{user}:active"


class ConcurrencyLimit:
    """At most `limit` requests of one user generating at once, over all gateways."""

    def __init__(self, client: aioredis.Redis, limit: int, ttl_s: int = 3600) -> None:
        self.client, self.limit, self.ttl_s = client, limit, ttl_s

    async def acquire(self, user: str) -> bool:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(active_key(user))
            pipe.expire(active_key(user), self.ttl_s)
            active, _ = await pipe.execute()
        if active > self.limit:
            await self.release(user)
            return False
        return True

    async def release(self, user: str) -> None:
        if await self.client.decr(active_key(user)) <= 0:
            await self.client.delete(active_key(user))
