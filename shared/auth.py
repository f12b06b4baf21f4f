"""Principals, bearer tokens and per-RPC authorisation.

Principals are `service:<name>` (internal callers), `device:<id>` (one IoT device) and
`admin` (the platform team). Tokens travel as `authorization: Bearer <token>` metadata.
Only SHA-256 hashes of tokens are stored: tokens are 256-bit random strings, so a fast
hash is as safe as a slow one and keeps authentication off the hot path's budget.
Comparisons of hashes are constant-time (`hmac.compare_digest`).

Every call is authenticated: its token is hashed and the hash looked up. The static
(service and admin) tokens never change while a process runs, so they are held in a
dictionary by hash and found without an await, and an authorization value once verified
against them is remembered in memory (at most MAX_REMEMBERED_CALLERS values), so a
service's later calls skip parsing and hashing. Other tokens (devices, which can be
revoked) go through the resolvers every time and are never remembered.
"""

from __future__ import annotations

import contextvars
import functools
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PermissionDenied, Unauthenticated

try:
    # CPython's own SHA-256 (hashlib's fallback): the same digest as OpenSSL's, with far less
    # set-up per call; measured at about 5 µs less per authenticated RPC in the consent bench.
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - not CPython 3.11
    from hashlib import sha256 as _sha256


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
        return self._text

    # Worked out on first use and kept (a service's principal serves every call it makes).
    @functools.cached_property
    def _text(self) -> str:
        return self.kind if self.kind == "admin" else f"{self.kind}:{self.name}"

    @functools.cached_property
    def _kind_rule(self) -> str:
        return f"{self.kind}:*"

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
    return _sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the (first) authorization metadata."""
    for key, value in metadata or ():
        if key == "authorization":
            return token_of(value)
    return token_of(None)


def token_of(authorization: str | bytes | None) -> str:
    """The token of an authorization metadata value ('Bearer <token>'; None: there was none)."""
    if authorization is None:
        raise Unauthenticated("missing authorization metadata ('Bearer <token>')", reason="MISSING_TOKEN")
    text = authorization.decode() if isinstance(authorization, bytes) else authorization
    if text.startswith("Bearer "):  # the usual spelling: the same answer as below, sooner
        token = text[7:].strip()
    else:
        scheme, _, token = text.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
    if token:
        return token
    raise Unauthenticated("authorization metadata must be 'Bearer <token>'", reason="MALFORMED_TOKEN")


# A resolver maps a token hash to a principal, or None when it does not know the hash
# (e.g. the replenishment service resolves device tokens from its own store).
TokenResolver = Callable[[str], Awaitable[Principal | None]]


class StaticTokens:
    """Token hashes of service and admin principals, loaded from a JSON file."""

    def __init__(self, hashes: Mapping[str, str]):
        # hash (lowercase hex) -> (the same hash, principal)
        self._by_digest: dict[str, tuple[str, Principal]] = {}
        for principal, digest in hashes.items():
            normal = bytes.fromhex(digest).hex()  # refuses a malformed hash at start-up
            self._by_digest[normal] = (normal, Principal.parse(principal))

    @classmethod
    def from_file(cls, path: Path) -> StaticTokens:
        """Reads {"principal": "sha256-hex", ...}; a missing file means no static tokens."""
        if not path.exists():
            return cls({})
        return cls(json.loads(path.read_text()))

    def lookup(self, digest_hex: str) -> Principal | None:
        """The principal whose token has this hash, or None.

        The dictionary finds the one candidate (the caller chose the token, not its hash,
        and str hashing is keyed per process, so where it looks reveals nothing about the
        stored hashes); the candidate is then confirmed with a constant-time comparison.
        """
        entry = self._by_digest.get(digest_hex)
        if entry is None:
            return None
        candidate, principal = entry
        return principal if hmac.compare_digest(candidate, digest_hex) else None

    async def resolve(self, digest_hex: str) -> Principal | None:
        return self.lookup(digest_hex)


def _no_principal(digest: str) -> Principal | None:
    return None


# Authorization values verified against the static tokens that a process remembers: more
# than any deployment has services, so only a caller cycling through bad values misses.
MAX_REMEMBERED_CALLERS = 1024


class Authenticator:
    """Static tokens first (no await), then each resolver in turn."""

    def __init__(self, resolvers: Iterable[TokenResolver], static: StaticTokens | None = None):
        self._resolvers = list(resolvers)
        # The service or admin principal of a token hash, found without awaiting; else None.
        self.static_principal: Callable[[str], Principal | None] = (
            static.lookup if static is not None else _no_principal
        )
        self._remembered: dict[str | bytes, Principal] = {}

    def static_caller(self, authorization: str | bytes | None) -> tuple[Principal | None, str]:
        """The service or admin principal of an authorization metadata value, without an
        await: (principal, token hash), or (None, token hash) for the resolvers to try.
        UNAUTHENTICATED when the value is missing or malformed. A value that named a static
        token is remembered, so its next call is one dictionary look-up."""
        remembered = self._remembered.get(authorization) if authorization is not None else None
        if remembered is not None:
            return remembered, ""
        digest = hash_token(token_of(authorization))
        principal = self.static_principal(digest)
        if principal is not None and authorization is not None:
            if len(self._remembered) < MAX_REMEMBERED_CALLERS:
                self._remembered[authorization] = principal
        return principal, digest

    def add_resolver(self, resolver: TokenResolver) -> None:
        self._resolvers.append(resolver)

    async def resolve(self, digest: str) -> Principal:
        """The principal of a token hash, from the static tokens or a resolver; else UNAUTHENTICATED."""
        principal = self.static_principal(digest)
        if principal is not None:
            return principal
        for resolve in self._resolvers:
            principal = await resolve(digest)
            if principal is not None:
                return principal
        raise Unauthenticated("unknown or revoked token", reason="INVALID_TOKEN")

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        return await self.resolve(hash_token(bearer_token(metadata)))


# Who may call an RPC: a set of rules, each "admin", "service:<name>", "device:*" (any
# device; the handler checks it is the caller's own) or "service:*". The rules of every
# RPC are in shared/access_policy.py; an RPC without a rule may be called by nobody.
AccessRule = frozenset[str]


def is_allowed(principal: Principal, rule: AccessRule) -> bool:
    return principal._text in rule or principal._kind_rule in rule or (principal.is_admin and "admin" in rule)


def authorize(principal: Principal, rule: AccessRule | None, method: str) -> None:
    if rule is None or not is_allowed(principal, rule):
        raise PermissionDenied(f"{principal} may not call {method}", reason="PRINCIPAL_NOT_ALLOWED")
