"""The page-token codec: what it issues reads back, and nothing else does."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from shared.errors import InvalidArgument
from shared.page_tokens import MAX_TOKEN_CHARS, PageTokens
from shared.settings import load_settings

SCOPE = "/najimi.test.v1.TestService/ListThings"
FILTERS = {"customer_id": "c-1", "types": [1, 2]}
TOKENS = PageTokens(bytes(range(32)))


def rejected(token: str, scope: str = SCOPE, filters: object = FILTERS, shape=(int, str)) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        TOKENS.read(token, scope, filters, shape, "page_token")
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.violations] == ["page_token"]
    return caught.value


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_token_reads_back_its_position():
    token = TOKENS.issue(SCOPE, FILTERS, (2**63 - 1, "cus_é"))
    assert TOKENS.read(token, SCOPE, FILTERS, (int, str)) == (2**63 - 1, "cus_é")
    # The filters' key order does not matter; an empty token is the first page.
    assert TOKENS.read(token, SCOPE, {"types": [1, 2], "customer_id": "c-1"}, (int, str)) is not None
    assert TOKENS.read("", SCOPE, FILTERS, (int, str)) is None


def test_tokens_are_short_and_url_safe():
    token = TOKENS.issue(SCOPE, FILTERS, (1_733_150_000_000_000, "cus_0123456789abcdef0123456789abcdef"))
    assert len(token) < 100 and set(token) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )


def test_every_flipped_byte_is_refused():
    raw = base64.urlsafe_b64decode(TOKENS.issue(SCOPE, FILTERS, (7, "x")) + "==")
    for index in range(len(raw)):
        edited = bytearray(raw)
        edited[index] ^= 0x01
        rejected(_b64(bytes(edited)))


def test_truncated_and_extended_tokens_are_refused():
    token = TOKENS.issue(SCOPE, FILTERS, (7, "x"))
    for cut in range(1, len(token)):
        rejected(token[:cut])
    rejected(token + "A")
    rejected(token + "AAAA")


def test_a_token_is_bound_to_its_scope_filters_and_key():
    token = TOKENS.issue(SCOPE, FILTERS, (7, "x"))
    rejected(token, scope="/najimi.test.v1.TestService/ListOthers")
    rejected(token, filters={"customer_id": "c-2", "types": [1, 2]})
    rejected(token, filters={})
    with pytest.raises(InvalidArgument):
        PageTokens(bytes(32)).read(token, SCOPE, FILTERS, (int, str))


def test_garbage_is_refused_before_it_is_parsed():
    nested = "[" * 100_000 + "]" * 100_000
    for token in (
        "not a token",
        "%%%",
        "e30",  # {}
        _b64(json.dumps({"after": "x"}).encode()),
        _b64(b"\x01" + nested.encode() + bytes(16)),
        _b64(b"\x01" + ("[" * 300 + "]" * 300).encode() + bytes(16)),  # short enough, MAC wrong
        _b64(os.urandom(48)),
        "A" * (MAX_TOKEN_CHARS + 1),
        "A" * 1_000_000,
        "\u00e9" * 40,
    ):
        rejected(token)


def test_an_authentic_token_of_another_shape_is_refused():
    # The same key and scope, a position of another layout (e.g. from an earlier release).
    for position, shape in (
        ((7,), (int, str)),
        ((7, "x"), (int, int)),
        ((7, "x"), (str, str)),
        ((True, "x"), (int, str)),
    ):
        rejected(TOKENS.issue(SCOPE, FILTERS, position), shape=shape)  # type: ignore[arg-type]


def test_the_key_comes_from_the_setting_or_a_generated_file(tmp_path: Path):
    key = base64.b64encode(bytes(range(32))).decode()
    configured = PageTokens.from_settings(load_settings("consent", data_dir=tmp_path, page_token_key=key))
    token = configured.issue(SCOPE, FILTERS, (1, "a"))
    assert TOKENS.read(token, SCOPE, FILTERS, (int, str)) == (1, "a")
    generated = PageTokens.from_settings(load_settings("consent", data_dir=tmp_path))
    assert (tmp_path / "page-token.key").exists()
    again = PageTokens.from_settings(load_settings("profile", data_dir=tmp_path))
    # Every service started on one data directory (development) shares the generated key.
    assert again.read(generated.issue(SCOPE, FILTERS, (1, "a")), SCOPE, FILTERS, (int, str)) == (1, "a")
    with pytest.raises(SystemExit, match="NAJIMI_PAGE_TOKEN_KEY"):
        PageTokens.from_settings(load_settings("consent", data_dir=tmp_path, page_token_key="c2hvcnQ="))
