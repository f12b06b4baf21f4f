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
    assert auth.is_allowed(profile, auth.SERVICES) and not auth.is_allowed(device, auth.SERVICES)
    assert auth.is_allowed(admin, auth.ADMIN) and not auth.is_allowed(profile, auth.ADMIN)
    assert auth.is_allowed(device, auth.DEVICES) and not auth.is_allowed(profile, auth.DEVICES)
    only_consent = auth.allow("service:consent")
    assert auth.is_allowed(auth.Principal("service", "consent"), only_consent)
    assert not auth.is_allowed(profile, only_consent) and auth.is_allowed(admin, only_consent)
    with pytest.raises(PermissionDenied):
        auth.authorize(admin, None, "Unlisted")
