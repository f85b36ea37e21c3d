"""Redis connection for the services that keep session state (gateway, scheduler, verifier).

Owns connecting (with a health check) and closing. The key schema arrives with the
distributed-system issue and will be documented here. The edge agent never imports this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def connect_redis(url: str) -> AsyncIterator[aioredis.Redis]:
    """Connect and PING; a server that does not answer is a clear `ConnectionError`."""
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
