"""Every NATS subject SpecEdge uses, built in one place.

Subjects are versioned (`specedge.v1.…`) so that a protocol change can run beside the
old one. Nothing else in the code base writes a subject string by hand.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "specedge.v1"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _token(value: str) -> str:
    """One subject token: refuse wildcards, dots and whitespace so callers cannot widen a subject."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"invalid subject token {value!r}: use 1-64 of [A-Za-z0-9_-]")
    return value


def registry_announce(role: str, instance_id: str, pool: str = "", user: str = "") -> str:
    """A service published its presence (on start and at every heartbeat).

    An edge agent's subject also names its pool and its owner (a hash of its user; `any`
    for none), so that a NATS permission on this subject binds an edge's credentials to
    whom it drafts for, and the scheduler believes an announcement only on its own subject.
    """
    subject = f"{PREFIX}.registry.announce.{_token(role)}.{_token(instance_id)}"
    if role != "edge-agent":
        return subject
    return f"{subject}.{_token(pool or 'shared')}.{owner_token(user)}"


def owner_token(user: str) -> str:
    """A subject token standing for a user name (which may hold dots): `any` for no user."""
    return "u" + hashlib.sha256(user.encode()).hexdigest()[:32] if user else "any"


def registry_leave(role: str, instance_id: str) -> str:
    """A service is shutting down cleanly."""
    return f"{PREFIX}.registry.leave.{_token(role)}.{_token(instance_id)}"


def announcer(subject: str) -> tuple[str, str]:
    """(role, instance id) that an announcement subject names ("", "" if it names none)."""
    parts = subject.split(".")
    start = len(PREFIX.split(".")) + 2
    return (parts[start], parts[start + 1]) if len(parts) > start + 1 else ("", "")


REGISTRY_ANNOUNCE_ALL = f"{PREFIX}.registry.announce.>"
REGISTRY_LEAVE_ALL = f"{PREFIX}.registry.leave.>"
REGISTRY_DISCOVER = f"{PREFIX}.registry.discover"
"""Request subject: every live service answers with its announcement."""


def verifier_prefill(instance_id: str) -> str:
    """Request to one verifier: prefill a session's prompt (reply: `PrefillReply`)."""
    return f"{PREFIX}.verifier.{_token(instance_id)}.prefill"


def verifier_verify(instance_id: str) -> str:
    """Request to one verifier: verify a batch of trees in one pass (reply: `VerifyBatchReply`)."""
    return f"{PREFIX}.verifier.{_token(instance_id)}.verify"


def verifier_close(instance_id: str) -> str:
    """To one verifier: forget a session and free its cache."""
    return f"{PREFIX}.verifier.{_token(instance_id)}.close"


def edge_assign(instance_id: str) -> str:
    """To one edge agent: draft for a new session (`DraftAssign`)."""
    return f"{PREFIX}.edge.{_token(instance_id)}.assign"


def edge_result(instance_id: str) -> str:
    """To one edge agent: a verification result for one of its sessions (`VerifyResult`)."""
    return f"{PREFIX}.edge.{_token(instance_id)}.result"


def edge_close(instance_id: str) -> str:
    """To one edge agent: stop drafting for a session (`CloseSession`)."""
    return f"{PREFIX}.edge.{_token(instance_id)}.close"


def edge_refused(instance_id: str) -> str:
    """To one edge agent: the server side refuses it (`EdgeRefused`)."""
    return f"{PREFIX}.edge.{_token(instance_id)}.refused"


def edge_identity(instance_id: str) -> str:
    """To one edge agent that joined with a key: who it is (`EdgeIdentity`, from the auth callout)."""
    return f"{PREFIX}.edge.{_token(instance_id)}.identity"


def auth_whoami(edge_id: str) -> str:
    """From an edge agent that joined with a key: ask the auth callout for its identity
    (answered on `edge_identity`; the edge's permissions bind the subject to it)."""
    return f"{PREFIX}.auth.whoami.{_token(edge_id)}"


AUTH_WHOAMI_ALL = f"{PREFIX}.auth.whoami.*"
AUTH_CALLOUT = "$SYS.REQ.USER.AUTH"
"""Where nats-server asks the auth callout about a connection (in the callout's account)."""


def server_kick(server_id: str) -> str:
    """System account request to one nats-server: disconnect a client (`{"cid": N}`)."""
    return f"$SYS.REQ.SERVER.{server_id}.KICK"


def account_disconnects(account: str) -> str:
    """System account events: a client of `account` disconnected."""
    return f"$SYS.ACCOUNT.{account}.DISCONNECT"


def drafts(edge_id: str, scheduler_id: str) -> str:
    """From one edge agent to the scheduler that owns the session: a draft tree (`DraftTreeMsg`).

    The edge's id comes first so that a permission `drafts.<edge>.>` lets an edge publish
    only as itself.
    """
    return f"{PREFIX}.drafts.{_token(edge_id)}.{_token(scheduler_id)}"


def stats(role: str, instance_id: str) -> str:
    """Request to one service: its counters (empty request -> `ServiceStats`)."""
    return f"{PREFIX}.stats.{_token(role)}.{_token(instance_id)}"


SESSIONS_OPEN = f"{PREFIX}.sessions.open"
"""Request (queue group `schedulers`): open a session (`SessionOpen` -> `SessionOpened`)."""

SESSIONS_CLOSE = f"{PREFIX}.sessions.close"
"""A session's caller is gone or done: stop generating (`CloseSession`)."""


def session_tokens(session_id: str) -> str:
    """Committed tokens of one session, in order (`TokenEvent`), for its gateway."""
    return f"{PREFIX}.session.{_token(session_id)}.tokens"
