"""NATS JWTs as nats-server's auth callout exchanges them: check the server's signed
authorization request; sign a user JWT and the authorization response with the deployment's
issuer (an account nkey).

A NATS JWT is `header.claims.signature`, each base64url without padding: the header is
`{"typ":"JWT","alg":"ed25519-nkey"}`, `iss` in the claims is the signer's public nkey and the
signature is its ed25519 signature of `header.claims`. Keys are `nkeys`' (the NATS
project's library); `jti` is the base32 SHA-512/256 of the claims without it, as the Go
library computes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from typing import Any

import nkeys
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=").decode()


class InvalidJWT(ValueError):
    """Not a NATS JWT signed by the key its `iss` names (or not by the kind of key expected)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_account_seed() -> str:
    """A fresh account nkey seed (`SA…`): an issuer of user JWTs."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()


def public_key(seed: str) -> str:
    """The public nkey (`A…` for an account) of a seed."""
    return nkeys.from_seed(seed.encode()).public_key.decode()


def encode(claims: dict[str, Any], seed: str) -> str:
    """`claims` signed by `seed` (its public key becomes `iss`; `iat` and `jti` are set)."""
    keys = nkeys.from_seed(seed.encode())
    claims = {**claims, "iss": keys.public_key.decode(), "iat": int(time.time())}
    claims.pop("jti", None)
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = keys.sign(f"{_HEADER}.{body}".encode())
    return f"{_HEADER}.{body}.{_b64(signature)}"


def decode(token: str, issuer_kind: str = "N") -> dict[str, Any]:
    """The claims of a JWT whose signature its `iss` checks, `iss` being a public nkey of
    `issuer_kind` (`N`: a server's, which signs authorization requests)."""
    try:
        header, body, signature = token.split(".")
        claims = json.loads(_unb64(body))
        issuer = claims["iss"]
        raw = base64.b32decode(issuer)
        if not issuer.startswith(issuer_kind) or len(raw) != 35:
            raise InvalidJWT(f"issuer {issuer!r} is not a public nkey of kind {issuer_kind}")
        VerifyKey(raw[1:33]).verify(f"{header}.{body}".encode(), _unb64(signature))
    except InvalidJWT:
        raise
    except (ValueError, KeyError, TypeError, BadSignatureError) as exc:
        raise InvalidJWT(f"not a valid NATS JWT: {exc!r}") from None
    return claims
