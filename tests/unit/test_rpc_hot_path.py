"""The per-RPC hot path (wrapper, authentication, CheckConsent) gives the same answers as
the straightforward code it replaced: these pin that down, edge cases included."""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import re
import time
import types
from typing import Any

import pytest
import structlog
from najimi.consent.v1 import consent_service_pb2 as pb

from services.consent.servicer import ConsentServicer
from services.consent.store import DataCategory, Purpose
from services.consent.vocabulary import Vocabulary
from shared import auth, interceptors
from shared.consent_index import REASON_OF_STATUS, ConsentIndex, ConsentRecord, Decision
from shared.db import now_micros, to_micros
from shared.errors import InvalidArgument, Unauthenticated
from shared.page_tokens import PageTokens
from shared.validation import RESOURCE_ID, Violations, is_valid_id

RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"
LOCATION = "user.location.precise"


def reference_token(value: str | bytes) -> str | None:
    """How a bearer token was read before the fast path (None: MALFORMED_TOKEN)."""
    text = value.decode() if isinstance(value, bytes) else value
    scheme, _, token = text.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@pytest.mark.parametrize(
    "value",
    [
        "Bearer abc",
        "bearer abc",
        "BEARER  abc ",
        "Bearer a b",
        "Bearer \tabc\n",
        "Bearer ",
        "Bearer",
        "Bearer  ",
        "Bearerabc",
        " Bearer abc",
        "Basic abc",
        "bearer\tabc",
        "",
        b"Bearer abc",
        b"Basic abc",
    ],
)
def test_bearer_tokens_are_read_as_before(value: str | bytes):
    expected = reference_token(value)
    if expected is None:
        with pytest.raises(Unauthenticated) as refused:
            auth.token_of(value)
        assert refused.value.reason == "MALFORMED_TOKEN"
    else:
        assert auth.token_of(value) == expected
        assert auth.bearer_token((("authorization", value),)) == expected
    with pytest.raises(Unauthenticated) as missing:
        auth.bearer_token((("user-agent", "x"),))
    assert missing.value.reason == "MISSING_TOKEN"


def test_token_hashes_are_sha256_hex():
    token = auth.new_token()
    assert auth.hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


async def test_static_tokens_are_found_without_resolvers_and_others_go_to_them():
    service, admin, device = auth.new_token(), auth.new_token(), auth.new_token()
    static = auth.StaticTokens(
        # A hash written in upper case is the same hash.
        {"service:profile": auth.hash_token(service), "admin": auth.hash_token(admin).upper()}
    )
    asked: list[str] = []

    async def devices(digest: str) -> auth.Principal | None:
        asked.append(digest)
        return auth.Principal("device", "d-1") if digest == auth.hash_token(device) else None

    authenticator = auth.Authenticator([devices], static=static)
    assert authenticator.static_principal(auth.hash_token(service)) == auth.Principal("service", "profile")
    assert authenticator.static_principal(auth.hash_token(admin)) == auth.Principal("admin")
    assert authenticator.static_principal(auth.hash_token(device)) is None
    assert asked == []
    bearer = (("authorization", f"Bearer {device}"),)
    assert await authenticator.authenticate(bearer) == auth.Principal("device", "d-1")
    assert asked == [auth.hash_token(device)]  # device tokens are resolved on every call
    with pytest.raises(Unauthenticated) as unknown:
        await authenticator.authenticate((("authorization", "Bearer nope"),))
    assert unknown.value.reason == "INVALID_TOKEN"
    assert await static.resolve(auth.hash_token(service)) == auth.Principal("service", "profile")
    with pytest.raises(ValueError):
        auth.StaticTokens({"admin": "not-hex"})


def test_principal_text_and_rules_are_unchanged():
    for principal in [auth.Principal("admin"), auth.Principal("service", "x"), auth.Principal("device", "d")]:
        assert str(principal) == str(principal)  # cached on first use, the same after
        expected = principal.kind if principal.is_admin else f"{principal.kind}:{principal.name}"
        assert str(principal) == expected
        assert repr(principal).startswith("Principal(")
        for names in [
            {"admin"},
            {"admin", "service:*"},
            {"admin", "device:*"},
            {"admin", "service:x"},
            set(),
        ]:
            rule = frozenset(names)
            reference = (
                str(principal) in rule
                or f"{principal.kind}:*" in rule
                or (principal.is_admin and "admin" in rule)
            )
            assert auth.is_allowed(principal, rule) == reference


def test_request_ids_come_from_metadata_or_are_new_and_distinct():
    assert interceptors._scan((("x-request-id", "r-1"), ("x-request-id", "r-2"))) == ("r-1", None)
    request_id, authorization = interceptors._scan(
        (("authorization", "Bearer a"), ("authorization", "Bearer b"), ("x-request-id", ""))
    )
    assert authorization == "Bearer a" and re.fullmatch(r"[0-9a-f]{16}", request_id)
    made = {interceptors.new_request_id() for _ in range(1000)}  # across several fetches
    assert len(made) == 1000 and all(re.fullmatch(r"[0-9a-f]{16}", made_id) for made_id in made)


def test_the_log_context_variables_are_structlogs():
    def bound() -> dict[str, Any]:
        interceptors._REQUEST_ID_VAR.set("r-9")
        interceptors._PRINCIPAL_VAR.set("service:x")
        return structlog.contextvars.get_contextvars()

    context = contextvars.copy_context().run(bound)
    assert context["request_id"] == "r-9" and context["principal"] == "service:x"
    assert "request_id" not in structlog.contextvars.get_contextvars()  # only in that context


def test_now_micros_is_the_wall_clock_in_microseconds():
    before = to_micros(dt.datetime.now(dt.UTC))
    now = now_micros()
    after = to_micros(dt.datetime.now(dt.UTC))
    assert before - 1 <= now <= after + 1
    assert abs(now - time.time() * 1e6) < 1e6


@pytest.mark.parametrize(
    "value", ["c-1", "", "a" * 128, "a" * 129, "a b", "abc\n", "abc\n\n", "é", "x:y.z_-"]
)
def test_id_checks_match_the_pattern(value: str):
    violations = Violations()
    violations.require_id("customer_id", value)
    assert is_valid_id(value) == (bool(value) and bool(RESOURCE_ID.match(value))) == (not violations.found)


def index_with_cases(now: int) -> ConsentIndex:
    index = ConsentIndex()
    index.revision = 42

    def record(granted: bool, categories: set[str], notice: int = 1, expires: int | None = None):
        return ConsentRecord(granted, frozenset(categories), notice, expires, 1, now - 10)

    index.put("granted", RECS, record(True, {PURCHASES, BROWSING}, expires=now + 1_000))
    index.put("forever", RECS, record(True, {PURCHASES}))
    index.put("withdrawn", RECS, record(False, set()))
    index.put("expired", RECS, record(True, {PURCHASES}, expires=now))
    index.put("old-notice", "other.purpose", record(True, {PURCHASES}, notice=1))
    index.add_material_notice("other.purpose", now - 5, 2)
    index.add_material_notice("other.purpose", now + 5, 3)  # not yet in effect
    return index


def reference_check(index: ConsentIndex, customer: str, purpose: str, categories: Any, now: int) -> Decision:
    """ConsentIndex.check as it was written before decide()."""
    record = index.record(customer, purpose)
    asked = tuple(dict.fromkeys(categories))
    status = index.status(record, purpose, now)
    if status != pb.CONSENT_STATUS_GRANTED or record is None:
        reason = REASON_OF_STATUS[status]
        return Decision(False, status, reason, (), asked, index.revision, None)
    if not asked:
        allowed_all = tuple(sorted(record.categories))
        return Decision(
            True,
            status,
            pb.CONSENT_CHECK_REASON_ALLOWED,
            allowed_all,
            (),
            index.revision,
            record.expires_at_us,
        )
    allowed = tuple(c for c in asked if c in record.categories)
    denied = tuple(c for c in asked if c not in record.categories)
    reason = pb.CONSENT_CHECK_REASON_CATEGORY_NOT_GRANTED if denied else pb.CONSENT_CHECK_REASON_ALLOWED
    return Decision(not denied, status, reason, allowed, denied, index.revision, record.expires_at_us)


CASES = [
    (customer, purpose, categories)
    for customer in ["granted", "forever", "withdrawn", "expired", "old-notice", "nobody"]
    for purpose in [RECS, "other.purpose"]
    for categories in [
        (),
        (PURCHASES,),
        (PURCHASES, BROWSING),
        (BROWSING, PURCHASES, BROWSING),
        (LOCATION,),
        (PURCHASES, LOCATION, PURCHASES),
        [PURCHASES],
    ]
]


def test_decide_and_check_answer_as_before():
    now = 1_800_000_000_000_000
    index = index_with_cases(now)
    for customer, purpose, categories in CASES:
        expected = reference_check(index, customer, purpose, categories, now)
        assert index.check(customer, purpose, categories, now) == expected
        assert Decision(*index.decide(customer, purpose, categories, now)) == expected
    assert index.material_version("other.purpose", now) == 2
    assert index.material_version(RECS, now) == 0


def consent_servicer(now: int) -> ConsentServicer:
    vocabulary = Vocabulary(
        [
            Purpose(name, "P", "d", [PURCHASES, BROWSING, LOCATION], [], None, 0)
            for name in [RECS, "other.purpose"]
        ],
        [DataCategory(name, "C", "d", False, 0) for name in [PURCHASES, BROWSING, LOCATION]],
    )
    feed = types.SimpleNamespace(index=index_with_cases(now))
    tokens = PageTokens(bytes(32))
    return ConsentServicer(types.SimpleNamespace(db=None), feed, None, b"k", vocabulary, None, None, tokens)  # type: ignore[arg-type]


async def test_check_consent_replies_as_before():
    servicer = consent_servicer(now_micros())
    index = servicer.feed.index
    for customer, purpose, categories in CASES:
        request = pb.CheckConsentRequest(customer_id=customer, purpose=purpose, data_categories=categories)
        reply = await servicer.CheckConsent(request, None)  # type: ignore[arg-type]
        decision = reference_check(index, customer, purpose, categories, now_micros())
        expected = pb.CheckConsentResponse(
            allowed=decision.allowed,
            allowed_data_categories=decision.allowed_categories,
            denied_data_categories=decision.denied_categories,
            reason=decision.reason,  # type: ignore[arg-type]
            decided_at_revision=decision.revision,
        )
        if decision.expires_at_us is not None:
            expected.expire_time.FromMicroseconds(decision.expires_at_us)
        assert reply == expected, (customer, purpose, categories)


async def test_check_consent_lists_every_violation():
    servicer = consent_servicer(now_micros())
    request = pb.CheckConsentRequest(
        customer_id="no spaces", purpose="nope", data_categories=[PURCHASES, "x.y"]
    )
    with pytest.raises(InvalidArgument) as invalid:
        await servicer.CheckConsent(request, None)  # type: ignore[arg-type]
    assert [v.field for v in invalid.value.violations] == ["customer_id", "purpose", "data_categories[1]"]
    with pytest.raises(InvalidArgument) as empty:
        await servicer.CheckConsent(pb.CheckConsentRequest(purpose=RECS), None)  # type: ignore[arg-type]
    assert [(v.field, v.description) for v in empty.value.violations] == [("customer_id", "is required")]
