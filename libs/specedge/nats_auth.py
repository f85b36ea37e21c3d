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

The gateway and the verifiers get narrow accounts too (`_SERVICE_PERMISSIONS`): the
gateway opens and closes sessions, reads their tokens and asks for stats; a verifier reads
its own requests and answers them. Neither can publish drafts, assignments or tokens.

So an edge can neither read another edge's assignments (prompts) or any session's
tokens, nor publish as another edge or claim another user. The server side re-checks the
rest (`scheduler`, `verifier`).

Passwords are random, shown once in a credentials file (mode 0600) per account, and
stored bcrypt-hashed in the deployment's auth directory (`users.json`), from which the
nats-server `authorization` block (`auth.conf`) is rendered. nats-server re-reads it on
SIGHUP (`nats-server --signal reload`), so accounts can be added and revoked live.

With the auth callout (`AuthDir.enable_callout`), edges need no account of their own: an
issuer key (`issuer.nk`) signs the user JWTs that `specedge auth-callout` issues to edges
that join with a user's key, with the same permissions as an edge account here
(`jwt_permissions`). The static accounts then live in the `SPECEDGE` NATS account and
bypass the callout (`auth_users`); its own `specedge-auth` login is one of them, and
`specedge-system` (in the system account) lets it disconnect an edge whose key is revoked.
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

Role = Literal["admin", "gateway", "scheduler", "verifier", "edge-agent", "auth-callout", "system"]
Pool = Literal["user", "shared", "server"]
SERVICE_ROLES: tuple[Role, ...] = ("gateway", "scheduler", "verifier")
USERS_FILE, CONFIG_FILE, ISSUER_FILE = "users.json", "auth.conf", "issuer.nk"
ACCOUNT, SYSTEM_ACCOUNT = "SPECEDGE", "SYS"  # NATS accounts (with the auth callout only)
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


KEY_EDGE_PREFIX = "key-"  # edge ids of edges that join with a key (`auth_callout`); no account may take one


def edge_identity(edge_id: str, user: str = "", server_side: bool = False, key_joined: bool = False) -> Identity:
    """An edge agent's account: a user's own edge, a shared-pool edge or a server-side drafter
    (`key_joined`: one that joins with a key through the auth callout, `key-…`)."""
    subjects.registry_announce("edge-agent", edge_id)  # refuses an id that is not one subject token
    if edge_id.startswith(KEY_EDGE_PREFIX) != key_joined:
        raise ValueError(f"edge ids starting with {KEY_EDGE_PREFIX!r} are those of edges that join with a key, "
                         "and only those")
    if user and server_side:
        raise ValueError("a server-side drafter belongs to no user")
    pool: Pool = "user" if user else "server" if server_side else "shared"
    return Identity(nats_user=f"edge-{edge_id}", role="edge-agent", edge_id=edge_id, pool=pool, user=user)


def _role_subjects(role: str) -> list[str]:
    """A server-side role's own registry subjects (any instance of it: instance ids are chosen at start)."""
    return [f"{subjects.PREFIX}.registry.announce.{role}.*", f"{subjects.PREFIX}.registry.leave.{role}.*"]


# What the gateway and the verifiers may do: only their own part of the protocol.
_SERVICE_PERMISSIONS: dict[str, dict] = {
    "gateway": {
        "publish": {"allow": [subjects.SESSIONS_OPEN, subjects.SESSIONS_CLOSE, f"{subjects.PREFIX}.stats.*.*",
                              subjects.REGISTRY_DISCOVER, *_role_subjects("gateway")]},
        "subscribe": {"allow": [f"{subjects.PREFIX}.session.*.tokens", subjects.REGISTRY_ANNOUNCE_ALL,
                                subjects.REGISTRY_DISCOVER, "_INBOX.>"]},
    },
    "verifier": {
        "publish": {"allow": [*_role_subjects("verifier")]},
        "subscribe": {"allow": [f"{subjects.PREFIX}.verifier.*.>", f"{subjects.PREFIX}.stats.verifier.*",
                                subjects.REGISTRY_DISCOVER]},
        "allow_responses": True,  # answers to prefill, verify and stats requests
    },
}


def permissions(identity: Identity) -> dict | None:
    """The nats-server `permissions` of an account (None: everything — the scheduler, which
    talks to every party, the admin and the auth callout)."""
    if identity.role in _SERVICE_PERMISSIONS:
        return _SERVICE_PERMISSIONS[identity.role]
    if identity.role != "edge-agent":
        return None
    edge = identity.edge_id
    return {
        "publish": {"allow": [
            f"{subjects.PREFIX}.drafts.{edge}.*",
            subjects.registry_announce("edge-agent", edge, identity.pool, identity.user),
            subjects.registry_leave("edge-agent", edge),
            subjects.auth_whoami(edge),  # (answered only to an edge that joined through the auth callout)
        ]},
        "subscribe": {"allow": [
            f"{subjects.PREFIX}.edge.{edge}.>",
            subjects.stats("edge-agent", edge),
            subjects.REGISTRY_DISCOVER,
        ]},
        "allow_responses": True,  # answer stats requests it received, nothing else (discovery: announce)
    }


def jwt_permissions(identity: Identity) -> dict:
    """An edge's `permissions` in the form of a user JWT's claims (the auth callout's)."""
    perms = permissions(identity)
    return {"pub": {"allow": perms["publish"]["allow"]}, "sub": {"allow": perms["subscribe"]["allow"]},
            "resp": {"max": 1, "ttl": 0}}


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_COST)).decode()


def render_config(accounts: dict[str, tuple[Identity, str]], issuer: str | None = None) -> str:
    """The nats-server `authorization` block for accounts {nats_user: (identity, bcrypt hash)};
    with `issuer` (the public key of the auth callout's issuer) the accounts and the
    `auth_callout` block instead.

    NATS configuration accepts JSON values, so the blocks are written as JSON.
    """
    if not accounts:
        raise ValueError("no accounts: nats-server would let anyone in")
    users, system = [], []
    for name, (identity, password_hash) in sorted(accounts.items()):
        entry: dict = {"user": name, "password": password_hash}
        if (perms := permissions(identity)) is not None:
            entry["permissions"] = perms
        (system if identity.role == "system" else users).append(entry)
    head = "# Generated by `specedge nats-auth`; edit with that command, not by hand.\n"
    if issuer is None:
        return head + f"authorization: {json.dumps({'users': users + system}, indent=2)}\n"
    callout = {"issuer": issuer, "auth_users": sorted(accounts), "account": ACCOUNT}
    return (head + f"accounts: {json.dumps({ACCOUNT: {'users': users}, SYSTEM_ACCOUNT: {'users': system}}, indent=2)}\n"
            f"system_account: {SYSTEM_ACCOUNT}\n"
            f"authorization: {json.dumps({'auth_callout': callout}, indent=2)}\n")


class AuthDir:
    """A deployment's accounts on disk: `users.json` (hashes), `auth.conf`, credentials files."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)

    def credentials_path(self, nats_user: str) -> pathlib.Path:
        return self.path / f"{nats_user}.creds.json"

    @property
    def config_path(self) -> pathlib.Path:
        return self.path / CONFIG_FILE

    @property
    def issuer_path(self) -> pathlib.Path:
        return self.path / ISSUER_FILE

    def issuer_seed(self) -> str | None:
        """The auth callout's issuer seed (None: the callout is not enabled)."""
        return self.issuer_path.read_text().strip() if self.issuer_path.exists() else None

    def enable_callout(self) -> list[Credentials]:
        """Let edges join with a user's key through `specedge auth-callout`: an issuer key, the
        callout's own login (`specedge-auth`) and a system account login
        (`specedge-system`, to disconnect revoked edges); existing ones are kept."""
        from specedge.nats_jwt import new_account_seed  # noqa: PLC0415 - nkeys only where the callout is used

        if not self.issuer_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.issuer_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new_account_seed() + "\n")
        existing = self.accounts()
        created = [self.add(identity) for identity in (service_identity("auth-callout"), service_identity("system"))
                   if identity.nats_user not in existing]
        self._write(self.accounts())
        return created

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
        seed = self.issuer_seed()
        issuer = None
        if seed is not None:
            from specedge.nats_jwt import public_key  # noqa: PLC0415

            issuer = public_key(seed)
        config = render_config(accounts, issuer)
        for name, text in ((USERS_FILE, json.dumps(raw, indent=2) + "\n"), (CONFIG_FILE, config)):
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
