"""`specedge nats-auth`: the NATS accounts of a deployment — the server side's and each edge's.

Every command works on an auth directory (`--dir`, default `./nats-auth`): `users.json`
(bcrypt hashes), `auth.conf` (include it in nats.conf) and one `<account>.creds.json`
per account, readable only by its owner — hand an edge its file and nothing else. After
`add-edge` or `revoke`, tell nats-server to re-read its configuration (`nats-server
--signal reload`, SIGHUP, or `docker compose kill -s HUP nats`); a revoked edge is then
disconnected and cannot reconnect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from specedge.nats_auth import AuthDir, Credentials, edge_identity

app = typer.Typer(help="NATS accounts: the server side's, and one per edge agent.", no_args_is_help=True)
T = TypeVar("T")
Dir = Annotated[str, typer.Option("--dir", envvar="SPECEDGE_NATS_AUTH_DIR",
                                  help="The deployment's auth directory (users.json, auth.conf, credentials).")]
RELOAD_HINT = "then reload nats-server: `nats-server --signal reload` (or `docker compose kill -s HUP nats`)"


def _checked(action: Callable[[], T]) -> T:
    try:
        return action()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


def _created(auth: AuthDir, created: list[Credentials]) -> None:
    for creds in created:
        typer.echo(f"created {creds.nats_user}: {auth.credentials_path(creds.nats_user)}")


@app.command()
def init(
    directory: Dir = "nats-auth",
    callout: Annotated[bool, typer.Option(
        "--callout", help="Also let edges join with a user's key through `specedge auth-callout` (an issuer key, "
                          "its login and a system-account login).")] = False,
) -> None:
    """Create the server side's accounts (admin, gateway, scheduler, verifier) if missing, and auth.conf."""
    auth = AuthDir(directory)
    _created(auth, _checked(auth.init))
    if callout:
        _created(auth, _checked(auth.enable_callout))
        typer.echo(f"auth callout issuer: {auth.issuer_path} (run `specedge auth-callout --issuer "
                   f"{auth.issuer_path} --credentials {auth.credentials_path('specedge-auth-callout')} "
                   f"--system-credentials {auth.credentials_path('specedge-system')}`)")
    typer.echo(f"nats-server configuration: include {auth.config_path.resolve()}")


@app.command("add-edge")
def add_edge(
    edge_id: Annotated[str, typer.Argument(help="The edge's id: 1-64 of [A-Za-z0-9_-], unique in the deployment.")],
    user: Annotated[str, typer.Option("--user", help="A user's own edge: drafts only for this user's requests.")]
    = "",
    server_side: Annotated[bool, typer.Option("--server-side", help="The operator's server-side drafter.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Issue a new password for an existing edge.")] = False,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="An existing edge account is fine: keep it.")]
    = False,
    directory: Dir = "nats-auth",
) -> None:
    """Create an edge's account (a user's own, the shared pool's, or a server-side drafter's)."""
    auth = AuthDir(directory)
    identity = _checked(lambda: edge_identity(edge_id, user, server_side))
    if exist_ok and not replace and identity.nats_user in _checked(auth.accounts):
        typer.echo(f"kept {identity.nats_user}: {auth.credentials_path(identity.nats_user)}")
        return
    creds = _checked(lambda: auth.add(identity, replace=replace))
    _created(auth, [creds])
    typer.echo(f"run it with: specedge edge-agent --credentials {auth.credentials_path(creds.nats_user)} "
               "--nats-url nats://HOST:4222")
    typer.echo(RELOAD_HINT)


@app.command("list")
def list_accounts(directory: Dir = "nats-auth") -> None:
    """List accounts: NATS user, role, edge id, pool, user (never passwords)."""
    for name, (identity, _hash) in _checked(AuthDir(directory).accounts).items():
        typer.echo(f"{name:<32} {identity.role:<10} {identity.edge_id or '-':<20} {identity.pool or '-':<7} "
                   f"{identity.user or '-'}")


@app.command()
def revoke(
    account: Annotated[str, typer.Argument(help="The NATS user from `nats-auth list` (an edge's is edge-<id>).")],
    directory: Dir = "nats-auth",
) -> None:
    """Remove an account and its credentials file."""
    if not _checked(lambda: AuthDir(directory).revoke(account)):
        typer.echo("no such account", err=True)
        raise SystemExit(1)
    typer.echo(f"revoked {account}")
    typer.echo(RELOAD_HINT)
