"""Principals, token hashing and access rules."""

from __future__ import annotations

import json

import pytest

from shared import auth
from shared.errors import PermissionDenied, Unauthenticated


def test_principals_parse_and_print_round_trip():
    for text in ["admin", "service:profile", "device:dev-1"]:
        assert str(auth.Principal.parse(text)) == text
    for bad in ["", "root", "service:", "device", "admin:x"]:
        with pytest.raises(ValueError):
            auth.Principal.parse(bad)


async def test_static_tokens_resolve_only_their_own_hash(tmp_path):
    token = auth.new_token()
    path = tmp_path / "hashes.json"
    path.write_text(json.dumps({"service:profile": auth.hash_token(token)}))
    tokens = auth.StaticTokens.from_file(path)
    assert await tokens.resolve(auth.hash_token(token)) == auth.Principal("service", "profile")
    assert await tokens.resolve(auth.hash_token(token + "x")) is None
    assert token not in path.read_text()


async def test_authenticator_needs_a_bearer_token():
    authenticator = auth.Authenticator([auth.StaticTokens({}).resolve])
    for metadata in [(), (("authorization", "Basic abc"),), (("authorization", "Bearer "),)]:
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(metadata)
    with pytest.raises(Unauthenticated) as unknown:
        await authenticator.authenticate((("authorization", "Bearer nope"),))
    assert unknown.value.reason == "INVALID_TOKEN"


def test_access_rules():
    profile = auth.Principal("service", "profile")
    device = auth.Principal("device", "d1")
    admin = auth.Principal("admin")
    services, admin_only, devices = frozenset({"service:*"}), frozenset({"admin"}), frozenset({"device:*"})
    assert auth.is_allowed(profile, services) and not auth.is_allowed(device, services)
    assert auth.is_allowed(admin, admin_only) and not auth.is_allowed(profile, admin_only)
    assert auth.is_allowed(device, devices) and not auth.is_allowed(profile, devices)
    only_consent = frozenset({"admin", "service:consent"})
    assert auth.is_allowed(auth.Principal("service", "consent"), only_consent)
    assert not auth.is_allowed(profile, only_consent) and auth.is_allowed(admin, only_consent)
    with pytest.raises(PermissionDenied):
        auth.authorize(admin, None, "Unlisted")


async def test_a_verified_static_caller_is_remembered_and_a_device_never(monkeypatch):
    token, device_token = auth.new_token(), auth.new_token()
    static = auth.StaticTokens({"service:profile": auth.hash_token(token)})
    resolved: list[str] = []

    async def devices(digest: str) -> auth.Principal | None:
        resolved.append(digest)
        return auth.Principal("device", "d-1") if digest == auth.hash_token(device_token) else None

    authenticator = auth.Authenticator([devices], static)
    header = f"Bearer {token}"
    assert authenticator.static_caller(header) == (
        auth.Principal("service", "profile"),
        auth.hash_token(token),
    )
    hashed: list[str] = []
    monkeypatch.setattr(auth, "hash_token", lambda value: hashed.append(value) or "")
    assert authenticator.static_caller(header) == (auth.Principal("service", "profile"), "")
    assert hashed == []  # remembered: not parsed or hashed again
    monkeypatch.undo()

    # A device token is no static caller: it goes to the resolvers every time (it can be revoked).
    for _ in range(2):
        principal, digest = authenticator.static_caller(f"Bearer {device_token}")
        assert principal is None and await authenticator.resolve(digest) == auth.Principal("device", "d-1")
    assert len(resolved) == 2
    with pytest.raises(Unauthenticated):
        authenticator.static_caller(None)
    with pytest.raises(Unauthenticated):
        authenticator.static_caller("Basic abc")
    principal, digest = authenticator.static_caller("Bearer not-a-known-token")
    assert principal is None and digest == auth.hash_token("not-a-known-token")


def test_remembered_callers_are_bounded(monkeypatch):
    monkeypatch.setattr(auth, "MAX_REMEMBERED_CALLERS", 2)
    tokens = [auth.new_token() for _ in range(3)]
    static = auth.StaticTokens({f"service:s{n}": auth.hash_token(t) for n, t in enumerate(tokens)})
    authenticator = auth.Authenticator([], static)
    for token in tokens:
        authenticator.static_caller(f"Bearer {token}")
    assert len(authenticator._remembered) == 2
    # The one not remembered is still verified, by its hash.
    assert authenticator.static_caller(f"Bearer {tokens[2]}") == (
        auth.Principal("service", "s2"),
        auth.hash_token(tokens[2]),
    )
