"""The auth callout: edges join NATS with a user's key, with no account file and no reload.

nats-server (its `auth_callout` block, from `specedge nats-auth init --callout`) hands
every connection that is not one of the static accounts to this service, on
`$SYS.REQ.USER.AUTH`, as a JWT it signed. The connection's password is an API key or an
edge token (`specedge keys create [--edge]`), checked against Redis; its user name is
the edge id it asks for, which must start with `key-` (`nats-auth add-edge` refuses those)
and is bound to the key's owner the first time it is used — another owner asking for it
later is refused. The answer is a user JWT signed by the deployment's issuer whose
permissions are exactly a static edge account's (`nats_auth.jwt_permissions`): that edge
id, its pool and its user. An edge learns whom it drafts for by publishing on
`auth.whoami.<edge>`; the answer (`EdgeIdentity`) comes on `edge.<edge>.identity`.

Revocation: a revoked or unknown key is refused at once. Every `check_s` the keys of the
edges that joined through this service are looked up again, and an edge whose key is gone
is disconnected through the system account (`$SYS.REQ.SERVER.<id>.KICK`); it cannot come
back, since its key is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import time
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import Field

from specedge import bus, nats_jwt, protocol, subjects
from specedge.config import RedisServiceSettings
from specedge.nats_auth import ACCOUNT, KEY_EDGE_PREFIX, Identity, edge_identity, jwt_permissions
from specedge.protocol import EdgeIdentity
from specedge.service import Lifecycle, StartupError
from specedge.state import ApiKeys, connect_redis, edge_owner_key

log = logging.getLogger("specedge.auth_callout")

OWNER_TTL_S = 30 * 24 * 3600  # an edge id unused this long is free again


class AuthCalloutSettings(RedisServiceSettings):
    system_credentials: str | None = None  # a login of the system account: disconnects revoked edges
    issuer: str  # the issuer's seed file (`issuer.nk` in the auth directory)
    check_s: float = Field(default=1.0, gt=0)  # how often the keys of joined edges are checked again


class Refused(Exception):
    """Why a connection is refused (said to nats-server, which logs it; the client sees an authorization error)."""


@dataclass(frozen=True)
class Joined:
    """An edge connection this service let in."""

    edge_id: str
    key_hash: str


def owner_of(user: str, key_hash: str) -> str:
    """Who an edge id belongs to: a user, or for an edge token of the shared pool, that token."""
    return f"user:{user}" if user else f"token:{key_hash[:32]}"


def requested_identity(edge_id: str, user: str) -> Identity:
    """The identity an edge asking for `edge_id` with a key of `user` ("" : the shared pool) gets."""
    if not edge_id.startswith(KEY_EDGE_PREFIX):
        raise Refused(f"an edge joining with a key names itself {KEY_EDGE_PREFIX}…, not {edge_id!r}")
    try:
        return edge_identity(edge_id, user=user, key_joined=True)
    except ValueError as exc:
        raise Refused(str(exc)) from None


class AuthCallout:
    def __init__(self, nc: Client, keys: ApiKeys, issuer_seed: str, system: Client | None = None,
                 check_s: float = 1.0) -> None:
        self.nc, self.keys, self.system, self.check_s = nc, keys, system, check_s
        self.issuer_seed = issuer_seed
        self.joined: dict[tuple[str, int], Joined] = {}  # (server id, client id) -> the edge

    async def subscribe(self) -> None:
        # (a queue group: replicas share the requests, each answered once)
        await self.nc.subscribe(subjects.AUTH_CALLOUT, queue="auth-callout", cb=self.on_request)
        await self.nc.subscribe(subjects.AUTH_WHOAMI_ALL, queue="auth-callout", cb=self.on_whoami)
        if self.system is not None:
            await self.system.subscribe(subjects.account_disconnects(ACCOUNT), cb=self.on_disconnect)
            await self.system.flush()
        await self.nc.flush()

    async def on_request(self, msg: Msg) -> None:
        try:
            request = nats_jwt.decode(msg.data.decode(), issuer_kind="N")["nats"]
            user_nkey, server_id = request["user_nkey"], request["server_id"]["id"]
            client_id = int(request.get("client_info", {}).get("id", 0))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("ignored an authorization request that is not nats-server's: %s", exc)
            return  # no answer: the server refuses the connection when it times out
        opts = request.get("connect_opts", {})
        claims = {"sub": user_nkey, "aud": server_id, "nats": {"type": "authorization_response", "version": 2}}
        try:
            identity, key_hash = await self.authorize(str(opts.get("user", "")),
                                                      str(opts.get("pass") or opts.get("auth_token") or ""))
        except Refused as exc:
            log.info("refused edge %r: %s", str(opts.get("user", ""))[:80], exc)
            claims["nats"]["error"] = str(exc)
        except Exception as exc:  # Redis down: nobody gets in
            log.warning("cannot check an edge's key: %r", exc)
            claims["nats"]["error"] = "the key cannot be checked now"
        else:
            claims["nats"]["jwt"] = self.user_jwt(identity, user_nkey)
            self.joined[(server_id, client_id)] = Joined(identity.edge_id, key_hash)
            log.info("edge %s joined (pool %s, user %s)", identity.edge_id, identity.pool, identity.user or "-")
        await msg.respond(nats_jwt.encode(claims, self.issuer_seed).encode())

    async def authorize(self, edge_id: str, key: str) -> tuple[Identity, str]:
        """The identity an edge asking for `edge_id` with `key` gets, and the key's hash."""
        if not key:
            raise Refused("no key: join with an API key or an edge token as the password")
        holder = await self.keys.holder(key)
        if holder is None:
            raise Refused("unknown or revoked key")
        identity = requested_identity(edge_id, holder.user)
        owner = owner_of(holder.user, holder.key_hash)
        client = self.keys.client
        if not await client.set(edge_owner_key(edge_id), owner, nx=True, ex=OWNER_TTL_S):
            if (await client.get(edge_owner_key(edge_id)) or b"").decode() != owner:
                raise Refused(f"edge id {edge_id} belongs to another owner")
            await client.expire(edge_owner_key(edge_id), OWNER_TTL_S)
        return identity, holder.key_hash

    def user_jwt(self, identity: Identity, user_nkey: str) -> str:
        return nats_jwt.encode({"sub": user_nkey, "aud": ACCOUNT, "name": identity.edge_id, "nats": {
            **jwt_permissions(identity), "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}},
            self.issuer_seed)

    async def on_whoami(self, msg: Msg) -> None:
        """Tell a key-joined edge who it is, on its own subject (whatever reply it named)."""
        edge_id = msg.subject.rsplit(".", 1)[-1]
        if not edge_id.startswith(KEY_EDGE_PREFIX):
            return
        with contextlib.suppress(Exception):
            owner = (await self.keys.client.get(edge_owner_key(edge_id)) or b"").decode()
            kind, _, who = owner.partition(":")
            if kind in ("user", "token"):
                user = who if kind == "user" else ""
                await bus.publish(self.nc, subjects.edge_identity(edge_id), protocol.encode(
                    EdgeIdentity(edge_id=edge_id, pool="user" if user else "shared", user=user)))

    async def on_disconnect(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(msg.data)
            self.joined.pop((event["server"]["id"], int(event["client"]["id"])), None)

    async def watch(self, stop: asyncio.Event) -> None:
        """Disconnect, every `check_s`, the edges whose key has been revoked."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_s)
            try:
                gone = {h for h in {j.key_hash for j in self.joined.values()} if not await self.keys.exists(h)}
            except Exception as exc:  # Redis down: check again later
                log.warning("cannot check the keys of joined edges: %r", exc)
                continue
            for (server_id, client_id), joined in list(self.joined.items()):
                if joined.key_hash in gone:
                    await self.kick(server_id, client_id, joined.edge_id)

    async def kick(self, server_id: str, client_id: int, edge_id: str) -> None:
        self.joined.pop((server_id, client_id), None)
        if self.system is None:
            log.warning("edge %s's key is revoked, but without --system-credentials it stays connected until "
                        "it reconnects", edge_id)
            return
        try:
            await self.system.request(subjects.server_kick(server_id), json.dumps({"cid": client_id}).encode(),
                                      timeout=5)
            log.warning("edge %s disconnected: its key was revoked", edge_id)
        except Exception as exc:
            log.warning("could not disconnect edge %s (client %d on %s): %r", edge_id, client_id, server_id, exc)


async def serve(settings: AuthCalloutSettings, life: Lifecycle) -> None:
    try:
        seed = pathlib.Path(settings.issuer).read_text().strip()  # noqa: ASYNC240 - once, at start
        nats_jwt.public_key(seed)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the issuer seed from {settings.issuer}: {exc}") from None
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        nc = await stack.enter_async_context(bus.connect(settings.nats_url, "auth-callout",
                                                         credentials=settings.credentials))
        system = None
        if settings.system_credentials:
            system = await stack.enter_async_context(bus.connect(settings.nats_url, "auth-callout-system",
                                                                 credentials=settings.system_credentials))
        redis = await stack.enter_async_context(connect_redis(settings.redis_url))
        callout = AuthCallout(nc, ApiKeys(redis), seed, system, settings.check_s)
        await callout.subscribe()
        log.info("auth callout ready in %.1fs", time.monotonic() - started)
        watching = asyncio.create_task(callout.watch(life.stop))
        await life.serve_until_stopped()
        await watching
