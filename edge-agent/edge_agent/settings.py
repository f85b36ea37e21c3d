"""Typed settings of the edge agent, built in `cli.command` and passed down."""

from __future__ import annotations

from pydantic import Field, model_validator

from specedge.config import ATTENTION_PATTERN, ServiceSettings
from specedge.protocol import MAX_TREES_AHEAD


class EdgeAgentSettings(ServiceSettings):
    draft: str
    device: str = "auto"
    dtype: str = "auto"
    max_sessions: int = Field(default=4, ge=1, le=1024)
    max_len: int = Field(default=4096, ge=16)  # most tokens (prompt + output) per session
    attention: str = Field(default="exact", pattern=ATTENTION_PATTERN)  # the runner's backend
    user: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.@-]*$")  # owner; "" joins a pool
    api_key: str | None = Field(default=None, repr=False)  # join through the auth callout with a user's key
    server_side: bool = False  # a drafter the operator runs beside the verifiers (mode server-only)
    proactive: bool | None = None  # draft ahead while a tree is out (default: yes, unless server-side)
    send_ahead: bool = True  # send a proactive tree finished before its result came (with proactive)
    trees_ahead: int = Field(default=MAX_TREES_AHEAD, ge=1, le=MAX_TREES_AHEAD)  # a chain sent ahead, at most

    @property
    def drafts_ahead(self) -> bool:
        return (not self.server_side) if self.proactive is None else self.proactive

    @model_validator(mode="after")
    def _one_pool(self) -> EdgeAgentSettings:
        if self.user and self.server_side:
            raise ValueError("a server-side drafter belongs to no user: use --user or --server-side, not both")
        if self.api_key and (self.credentials or self.server_side):
            raise ValueError("an edge joins with --api-key or with --credentials, not both; a server-side "
                             "drafter has an account of its own")
        return self

    @property
    def pool(self) -> str:
        """Which sessions this edge drafts for: its user's, anyone's (shared), or server-only ones."""
        return "user" if self.user else "server" if self.server_side else "shared"
