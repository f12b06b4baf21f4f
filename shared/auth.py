"""Principals, bearer tokens and per-RPC authorisation.

Principals are `service:<name>` (internal callers), `device:<id>` (one IoT device) and
`admin` (the platform team). Tokens travel as `authorization: Bearer <token>` metadata.
Only SHA-256 hashes of tokens are stored: tokens are 256-bit random strings, so a fast
hash is as safe as a slow one and keeps authentication off the hot path's budget.
Comparisons of hashes are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Principal:
    """Who is calling: kind is "service", "device" or "admin"; name is the part after the colon."""

    kind: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Principal:
        kind, _, name = text.partition(":")
        if kind == "admin" and not name:
            return cls("admin")
        if kind in ("service", "device") and name:
            return cls(kind, name)
        raise ValueError(f"not a principal: {text!r} (expected admin, service:<name> or device:<id>)")

    def __str__(self) -> str:
        return self.kind if self.kind == "admin" else f"{self.kind}:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


ANONYMOUS = Principal("anonymous")
_current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled (set by the interceptor)."""
    return _current_principal.get()


def set_current_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current_principal.set(principal)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'", reason="MALFORMED_TOKEN")
    raise Unauthenticated("missing authorization metadata ('Bearer <token>')", reason="MISSING_TOKEN")


# A resolver maps a token hash to a principal, or None when it does not know the hash
# (e.g. the replenishment service resolves device tokens from its own store).
TokenResolver = Callable[[str], Awaitable[Principal | None]]


class StaticTokens:
    """Token hashes of service and admin principals, loaded from a JSON file."""

    def __init__(self, hashes: Mapping[str, str]):
        self._entries = [
            (bytes.fromhex(digest), Principal.parse(principal)) for principal, digest in hashes.items()
        ]

    @classmethod
    def from_file(cls, path: Path) -> StaticTokens:
        """Reads {"principal": "sha256-hex", ...}; a missing file means no static tokens."""
        if not path.exists():
            return cls({})
        return cls(json.loads(path.read_text()))

    async def resolve(self, digest_hex: str) -> Principal | None:
        digest = bytes.fromhex(digest_hex)
        found: Principal | None = None
        # Compare against every entry, so the time taken says nothing about which matched.
        for candidate, principal in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found


class Authenticator:
    def __init__(self, resolvers: Iterable[TokenResolver]):
        self._resolvers = list(resolvers)

    def add_resolver(self, resolver: TokenResolver) -> None:
        self._resolvers.append(resolver)

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        digest = hash_token(bearer_token(metadata))
        for resolve in self._resolvers:
            principal = await resolve(digest)
            if principal is not None:
                return principal
        raise Unauthenticated("unknown or revoked token", reason="INVALID_TOKEN")


# Who may call an RPC: a set of rules, each "admin", "service:*", "service:<name>",
# "device:*". An RPC absent from a service's policy may be called by nobody.
AccessRule = frozenset[str]
ADMIN: AccessRule = frozenset({"admin"})
SERVICES: AccessRule = frozenset({"admin", "service:*"})
DEVICES: AccessRule = frozenset({"admin", "device:*"})


def allow(*rules: str) -> AccessRule:
    return frozenset({"admin", *rules})


def is_allowed(principal: Principal, rule: AccessRule) -> bool:
    return str(principal) in rule or f"{principal.kind}:*" in rule or (principal.is_admin and "admin" in rule)


def authorize(principal: Principal, rule: AccessRule | None, method: str) -> None:
    if rule is None or not is_allowed(principal, rule):
        raise PermissionDenied(f"{principal} may not call {method}", reason="PRINCIPAL_NOT_ALLOWED")
