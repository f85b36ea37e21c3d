"""Who may connect to NATS, and what each may publish and subscribe to.

Owns the NATS accounts of a deployment: one per server-side service role (gateway,
scheduler, verifier), one per edge agent, and an `admin` for tools and tests. An edge's
account is bound to its identity — its edge id, its pool and (for a user's own edge) its
user — by subject permissions:

- it may publish only its own drafts (`drafts.<edge>.*`), its own registry announcement
  (whose subject names its pool and a hash of its user, see
  `subjects.registry_announce`) and its own leave message, plus replies to requests it
  received (`allow_responses`);
- it may subscribe only to what is addressed to it (`edge.<edge>.>`, its stats subject)
  and to discovery requests.

So an edge can neither read another edge's assignments (prompts) or any session's
tokens, nor publish as another edge or claim another user. The server side re-checks the
rest (`scheduler`, `verifier`).

Passwords are random, shown once in a credentials file (mode 0600) per account, and
stored bcrypt-hashed in the deployment's auth directory (`users.json`), from which the
nats-server `authorization` block (`auth.conf`) is rendered. nats-server re-reads it on
SIGHUP (`nats-server --signal reload`), so accounts can be added and revoked live.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
from typing import Literal

import bcrypt
from pydantic import BaseModel, ConfigDict, Field

from specedge import subjects

Role = Literal["admin", "gateway", "scheduler", "verifier", "edge-agent"]
Pool = Literal["user", "shared", "server"]
SERVICE_ROLES: tuple[Role, ...] = ("gateway", "scheduler", "verifier")
USERS_FILE, CONFIG_FILE = "users.json", "auth.conf"
_BCRYPT_COST = 10  # checked by nats-server once per connection


class Identity(BaseModel):
    """What an account is: its NATS user name, its role and, for an edge, who it drafts for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_user: str = Field(pattern=r"^[A-Za-z0-9_-]{1,80}$")
    role: Role
    edge_id: str = ""
    pool: Pool | Literal[""] = ""
    user: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.@-]*$")


class Credentials(Identity):
    """An account's credentials file: its identity and its password (shown to nobody else)."""

    password: str

    @property
    def identity(self) -> Identity:
        return Identity(**self.model_dump(exclude={"password"}))

    def save(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Credentials:
        try:
            return cls.model_validate_json(pathlib.Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read NATS credentials from {path}: {exc}") from None


def service_identity(role: Role) -> Identity:
    return Identity(nats_user=f"specedge-{role}", role=role)


def edge_identity(edge_id: str, user: str = "", server_side: bool = False) -> Identity:
    """An edge agent's account: a user's own edge, a shared-pool edge or a server-side drafter."""
    subjects.registry_announce("edge-agent", edge_id)  # refuses an id that is not one subject token
    if user and server_side:
        raise ValueError("a server-side drafter belongs to no user")
    pool: Pool = "user" if user else "server" if server_side else "shared"
    return Identity(nats_user=f"edge-{edge_id}", role="edge-agent", edge_id=edge_id, pool=pool, user=user)


def permissions(identity: Identity) -> dict | None:
    """The nats-server `permissions` of an account (None: everything, for the server side)."""
    if identity.role != "edge-agent":
        return None
    edge = identity.edge_id
    return {
        "publish": {"allow": [
            f"{subjects.PREFIX}.drafts.{edge}.*",
            subjects.registry_announce("edge-agent", edge, identity.pool, identity.user),
            subjects.registry_leave("edge-agent", edge),
        ]},
        "subscribe": {"allow": [
            f"{subjects.PREFIX}.edge.{edge}.>",
            subjects.stats("edge-agent", edge),
            subjects.REGISTRY_DISCOVER,
        ]},
        "allow_responses": True,  # answer stats requests it received, nothing else (discovery: announce)
    }


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_COST)).decode()


def render_config(accounts: dict[str, tuple[Identity, str]]) -> str:
    """The nats-server `authorization` block for accounts {nats_user: (identity, bcrypt hash)}.

    NATS configuration accepts JSON values, so the block is written as JSON.
    """
    if not accounts:
        raise ValueError("no accounts: nats-server would let anyone in")
    users = []
    for name, (identity, password_hash) in sorted(accounts.items()):
        entry: dict = {"user": name, "password": password_hash}
        if (perms := permissions(identity)) is not None:
            entry["permissions"] = perms
        users.append(entry)
    return ("# Generated by `specedge nats-auth`; edit with that command, not by hand.\n"
            f"authorization: {json.dumps({'users': users}, indent=2)}\n")


class AuthDir:
    """A deployment's accounts on disk: `users.json` (hashes), `auth.conf`, credentials files."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)

    def credentials_path(self, nats_user: str) -> pathlib.Path:
        return self.path / f"{nats_user}.creds.json"

    @property
    def config_path(self) -> pathlib.Path:
        return self.path / CONFIG_FILE

    def accounts(self) -> dict[str, tuple[Identity, str]]:
        users = self.path / USERS_FILE
        if not users.exists():
            return {}
        try:
            raw = json.loads(users.read_text())
            return {name: (Identity(**entry["identity"]), entry["password_hash"]) for name, entry in raw.items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{users} is not a `specedge nats-auth` accounts file: {exc}") from None

    def _write(self, accounts: dict[str, tuple[Identity, str]]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        raw = {name: {"identity": identity.model_dump(), "password_hash": hashed}
               for name, (identity, hashed) in sorted(accounts.items())}
        for name, text in ((USERS_FILE, json.dumps(raw, indent=2) + "\n"), (CONFIG_FILE, render_config(accounts))):
            tmp = self.path / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644 if name == CONFIG_FILE else 0o600)  # nats-server may run as another user
            tmp.replace(self.path / name)

    def add(self, identity: Identity, password: str | None = None, replace: bool = False) -> Credentials:
        """Create an account and its credentials file; refuse to overwrite one unless `replace`."""
        accounts = self.accounts()
        if identity.nats_user in accounts and not replace:
            raise ValueError(f"account {identity.nats_user} exists: revoke it first, or replace it")
        creds = Credentials(**identity.model_dump(), password=password or secrets.token_urlsafe(24))
        accounts[identity.nats_user] = (identity, hash_password(creds.password))
        creds.save(self.credentials_path(identity.nats_user))
        self._write(accounts)
        return creds

    def init(self) -> list[Credentials]:
        """The server side's accounts (admin, gateway, scheduler, verifier); existing ones are kept."""
        existing = self.accounts()
        return [self.add(identity) for identity in (service_identity("admin"), *map(service_identity, SERVICE_ROLES))
                if identity.nats_user not in existing]

    def revoke(self, nats_user: str) -> bool:
        accounts = self.accounts()
        if accounts.pop(nats_user, None) is None:
            return False
        self._write(accounts)
        self.credentials_path(nats_user).unlink(missing_ok=True)
        return True
