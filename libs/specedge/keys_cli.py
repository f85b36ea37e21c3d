"""`specedge keys`: create, list and revoke API keys and edge tokens (stored hashed in Redis).

A key is printed once, when it is created; Redis keeps only its SHA-256 hash and the
user it maps to. A user's requests are drafted on that user's own edge agents when one is
online, else by the shared pool, else on the server side. An edge joins NATS with the
user's API key or with an edge token (`create --edge`: it joins edges and nothing else;
without `--user`, edges of the shared pool) — `specedge edge-agent --api-key KEY`,
through the auth callout (`specedge auth-callout`). Revoking a key refuses new
connections at once and disconnects the edges that joined with it within seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from specedge.config import DEFAULT_REDIS_URL, RedisUrl

app = typer.Typer(help="Gateway API keys: create, list, revoke.", no_args_is_help=True)
T = TypeVar("T")


def _with_keys(redis_url: str, action: Callable[..., Awaitable[T]]) -> T:
    from specedge.state import ApiKeys, connect_redis  # noqa: PLC0415 - redis only where keys are managed

    async def go() -> T:
        async with connect_redis(redis_url) as client:
            return await action(ApiKeys(client))

    try:
        return asyncio.run(go())
    except ConnectionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def create(
    user: Annotated[str, typer.Option("--user", help="Whose key this is (their edges draft for them).")] = "",
    label: Annotated[str, typer.Option("--label", help="A note to tell keys apart in `keys list`.")] = "",
    key: Annotated[str | None, typer.Option("--key", help="Use this key instead of a random one.")] = None,
    edge: Annotated[bool, typer.Option("--edge", help="An edge token: joins edges (the user's own, or without "
                                               "--user the shared pool's), not API calls.")] = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Create a key and print it (the only time it is shown)."""
    typer.echo(_with_keys(redis_url, lambda keys: keys.create(user, label, key, edge=edge)))


@app.command("list")
def list_keys(redis_url: RedisUrl = DEFAULT_REDIS_URL) -> None:
    """List keys: hash prefix, user, label, creation time (never the keys themselves)."""
    for info in _with_keys(redis_url, lambda keys: keys.list()):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created))
        kind = "edge" if info.edge else "api"
        typer.echo(f"{info.key_hash[:12]}  {kind:<4}  {info.user or '(shared pool)':<24} {created} UTC  {info.label}")


@app.command()
def revoke(
    key: Annotated[str, typer.Argument(help="The key, or at least 8 hex digits of its hash from `keys list`.")],
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Revoke a key: requests with it get 401 from then on; edges that joined with it are disconnected."""
    removed = _with_keys(redis_url, lambda keys: keys.revoke(key))
    if not removed:
        typer.echo("no such key", err=True)
        raise SystemExit(1)
    typer.echo(f"revoked {removed} key(s)")
