"""`specedge up`: the whole system on one machine.

Starts (or connects to) nats-server and redis-server, creates a gateway API key (user
`local`; `--api-key` fixes it), starts the four services — N shared-pool edge agents and
a server-side drafter — as child processes of the real `specedge` CLI, waits until all
are registered on the bus, prints where the gateway listens, the key and an example
request, and on Ctrl-C/SIGTERM — or if any child dies — stops everything, services
first, servers last. Nothing is left running.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import sys
import threading
import time

from specedge import bus, registry
from specedge.config import UpSettings
from specedge.launcher import Launcher, LauncherError, cluster_url, free_port
from specedge.models import BUNDLED_TARGET
from specedge.nats_auth import AuthDir, Identity, edge_identity, service_identity
from specedge.protocol import ROLES
from specedge.service import setup_logging

log = logging.getLogger("specedge.up")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def edge_accounts(edges: int, server_drafter: bool) -> dict[str, Identity]:
    """The NATS accounts of the edges `up` starts: N shared-pool edges and a server-side drafter."""
    accounts = {f"edge-{i + 1}": edge_identity(f"edge-{i + 1}") for i in range(edges)}
    if server_drafter:
        accounts["server-drafter"] = edge_identity("server-drafter", server_side=True)
    return accounts


def service_commands(nats_url: str, redis_url: str, host: str, port: int, edges: int,
                     server_drafter: bool = True, auth: AuthDir | None = None, dtype: str = "auto",
                     attention: str = "exact") -> dict[str, list[str]]:
    """The argv of each service, as an operator would type it; with `auth`, each logs in
    with its own account there (`edge_accounts` for the edges). The verifier and the edges
    run their models in `dtype` with the `attention` backend."""
    cli = [sys.executable, "-m", "specedge.cli"]
    engine = ["--dtype", dtype, "--attention", attention]

    def login(identity: Identity) -> list[str]:
        return [] if auth is None else ["--credentials", str(auth.credentials_path(identity.nats_user))]

    commands = {
        role: [*cli, role, "--nats-url", nats_url, *login(service_identity(role)), "--redis-url", redis_url]
        for role in ("verifier", "scheduler")
    }
    commands["verifier"] += engine
    for name, identity in edge_accounts(edges, server_drafter).items():
        side = ["--server-side"] if identity.pool == "server" else []
        key = f"edge-agent-{name.removeprefix('edge-')}" if identity.pool != "server" else name
        commands[key] = [*cli, "edge-agent", "--nats-url", nats_url, *login(identity), "--name", name, *side,
                         *engine]
    commands["gateway"] = [*cli, "gateway", "--nats-url", nats_url, *login(service_identity("gateway")),
                           "--redis-url", redis_url, "--host", host, "--port", str(port)]
    return commands


def create_api_key(redis_url: str, key: str | None) -> str:
    """The key `specedge up` prints: the given one, or a fresh one, for user `local`."""
    from specedge.state import ApiKeys, connect_redis  # noqa: PLC0415

    async def go() -> str:
        async with connect_redis(redis_url) as client:
            return await ApiKeys(client).create("local", "specedge up", key)

    return asyncio.run(go())


async def wait_until_registered(nats_url: str, roles: dict[str, int], timeout_s: float,
                                still_running) -> list:
    """Poll discovery until every role has as many live instances as were started (GPU
    services register once their model is loaded and their kernels compiled)."""

    def missing(found: list) -> list[str]:
        have = collections.Counter(a.role for a in found)
        return [f"{role} ({have[role]}/{n})" for role, n in sorted(roles.items()) if have[role] < n]

    async with bus.connect(nats_url, name="specedge-up", initial_timeout_s=10) as nc:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and still_running():
            found = await registry.discover(nc, wait_s=0.3)
            if not missing(found):
                return found
        raise TimeoutError(f"not registered after {timeout_s:.0f}s: "
                           f"{', '.join(missing(await registry.discover(nc, wait_s=0.3)))}")


def run_up(settings: UpSettings) -> int:
    """Run until interrupted; returns the process exit code."""
    setup_logging(settings.log_level)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    if settings.port and not port_is_free(settings.host, settings.port):
        log.error("cannot start: %s:%d is already in use; pass --port N (or --port 0 for any free port)",
                  settings.host, settings.port)
        return 2
    with Launcher() as launcher:
        try:
            auth = None
            if not settings.nats_url:  # the embedded server: every service with its own account
                auth = launcher.nats_auth
                for identity in edge_accounts(settings.edges, settings.server_drafter).values():
                    auth.add(identity)
            nats_nodes = [] if settings.nats_url else [launcher.start_nats()] if settings.nats_nodes == 1 \
                else launcher.start_nats_cluster(settings.nats_nodes)
            nats_url = settings.nats_url or cluster_url(nats_nodes)
            redis_url = settings.redis_url or (launcher.start_redis_ha()[1] if settings.redis_ha
                                               else launcher.start_redis().url)
            api_key = create_api_key(redis_url, settings.api_key)
        except (LauncherError, ConnectionError, ValueError) as exc:
            log.error("%s", exc)
            return 2
        port = settings.port or free_port(settings.host)
        env = {**os.environ, "SPECEDGE_LOG_LEVEL": settings.log_level}
        service_url = nats_url if auth is None else bus.without_login(nats_url)
        commands = service_commands(service_url, redis_url, settings.host, port, settings.edges,
                                    settings.server_drafter, auth, settings.dtype, settings.attention)
        services = [launcher.spawn(role, argv, env=env) for role, argv in commands.items()]

        def all_running() -> bool:
            return not stop.is_set() and all(s.alive() for s in services)

        try:
            roles = {role: 1 for role in ROLES}
            roles["edge-agent"] = settings.edges + int(settings.server_drafter)
            found = asyncio.run(wait_until_registered(nats_url, roles, settings.ready_timeout_s, all_running))
        except (TimeoutError, ConnectionError) as exc:
            if not stop.is_set():
                log.error("startup failed: %s", exc)
            return 0 if stop.is_set() else 1
        if not all_running():
            return _report_exit(services, stop)
        for a in found:
            log.info("registered: %-10s %s", a.role, a.name)
        # The one line a user (and the e2e test) looks for, then how to talk to it:
        base = f"http://{settings.host}:{port}"
        sys.stdout.write(
            f"SpecEdge is up: gateway {base} (OpenAI base URL {base}/v1); API key {api_key} ; "
            f"nats {bus.redact(nats_url)}; redis {redis_url};"
            + (f" NATS accounts in {auth.path} (add an edge: specedge nats-auth add-edge ID --dir {auth.path},"
               f" then kill -HUP {' '.join(str(n.pid) for n in nats_nodes)});" if auth and nats_nodes else "")
            + " Ctrl-C stops everything.\n"
            f"Try: curl {base}/v1/chat/completions -H 'Authorization: Bearer {api_key}' "
            "-H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{BUNDLED_TARGET}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"Sort a list.\"}}], \"max_tokens\": 48}}'\n")
        sys.stdout.flush()
        while all_running():
            stop.wait(0.2)
        return _report_exit(services, stop)


def _report_exit(services, stop: threading.Event) -> int:
    if stop.is_set():
        log.info("stopping all services")
        return 0
    dead = [f"{s.name} (exit {s.process.returncode})" for s in services if not s.alive()]
    log.error("a service stopped unexpectedly: %s; stopping the rest", ", ".join(dead))
    return 1
