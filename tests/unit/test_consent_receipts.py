"""Consent receipts: signed, verifiable, and any alteration is caught with its reason."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from najimi.consent.v1 import consent_service_pb2 as pb

from services.consent.receipts import (
    RECEIPT_VERSION,
    RETIRED_KEYS_VARIABLE,
    SIGNING_KEY_FILE,
    SIGNING_KEY_VARIABLE,
    ReceiptSigner,
    key_id_of,
    parse_payload,
    receipt_from_stored,
    receipt_payload,
)
from shared.canonical_json import canonical_json
from shared.settings import load_settings

SEED_A = b"A" * 32
SEED_B = b"B" * 32

VALID = pb.RECEIPT_VERIFICATION_REASON_VALID
UNKNOWN_KEY = pb.RECEIPT_VERIFICATION_REASON_UNKNOWN_KEY
SIGNATURE_INVALID = pb.RECEIPT_VERIFICATION_REASON_SIGNATURE_INVALID
PAYLOAD_MALFORMED = pb.RECEIPT_VERIFICATION_REASON_PAYLOAD_MALFORMED
FIELDS_MISMATCH = pb.RECEIPT_VERIFICATION_REASON_FIELDS_MISMATCH


def signer(seed: bytes = SEED_A, **options) -> ReceiptSigner:
    return ReceiptSigner(
        Ed25519PrivateKey.from_private_bytes(seed),
        controllers=[pb.ReceiptController(name="Shop", contact="DPO", email="dpo@example.com")],
        policy_url="https://example.com/privacy",
        jurisdiction="EU",
        **options,
    )


def a_receipt() -> pb.ConsentReceipt:
    receipt = pb.ConsentReceipt(
        receipt_id="rcpt_01",
        collection_method=pb.COLLECTION_METHOD_WEB_FORM,
        customer_id="cust-42",
        purposes=[
            pb.ReceiptPurpose(
                purpose="personalize.recommendations",
                granted=True,
                data_categories=["user.behavior.purchase_history", "user.demographic.age_range"],
                notice_version=3,
                notice_url="https://example.com/notices/3",
                expire_time=timestamp_pb2.Timestamp(seconds=1_900_000_000),
                revision=9_007_199_254_740_993,  # beyond 2^53: a string in proto3 JSON
            ),
            pb.ReceiptPurpose(
                purpose="analytics",
                granted=False,
                withdrawn_data_categories=["user.device.telemetry"],
                revision=2,
            ),
        ],
        sensitive=True,
        sensitive_data_categories=["user.demographic.age_range"],
    )
    receipt.issue_time.FromMicroseconds(1_700_000_000_123_456)
    return receipt


SIGNED = signer().sign(a_receipt())


def test_a_signed_receipt_verifies_and_fills_the_configured_fields():
    signed = signer().sign(a_receipt())
    assert signed.version == RECEIPT_VERSION
    assert signed.jurisdiction == "EU" and signed.policy_url == "https://example.com/privacy"
    assert [c.name for c in signed.controllers] == ["Shop"]
    assert len(signed.signature) == 64 and signed.key_id == signer().key_id
    document = json.loads(signed.payload)
    assert document["receiptId"] == "rcpt_01" and document["version"] == RECEIPT_VERSION
    assert document["purposes"][0]["revision"] == "9007199254740993"
    assert document["collectionMethod"] == "COLLECTION_METHOD_WEB_FORM"
    assert not {"payload", "signature", "keyId"} & set(document)
    assert signed.payload == receipt_payload(signed)
    assert parse_payload(signed.payload) is not None

    answer = signer().verify(signed)
    assert answer == pb.VerifyReceiptResponse(valid=True, reason=VALID, receipt_id="rcpt_01")


def test_signing_is_deterministic_and_does_not_change_the_input():
    receipt = a_receipt()
    before = receipt.SerializeToString()
    assert signer().sign(receipt) == signer().sign(receipt)
    assert receipt.SerializeToString() == before


def test_the_callers_version_controllers_and_jurisdiction_are_kept():
    receipt = a_receipt()
    receipt.version = "KI-CR-v1.1.0"
    receipt.jurisdiction = "JP"
    receipt.controllers.add(name="Other controller", on_behalf=True)
    signed = signer().sign(receipt)
    assert signed.jurisdiction == "JP" and [c.name for c in signed.controllers] == ["Other controller"]
    assert signer().verify(signed).valid


def test_a_receipt_needs_an_id_and_a_time():
    with pytest.raises(ValueError):
        signer().sign(pb.ConsentReceipt(customer_id="c"))


def test_payload_signature_and_key_id_alone_verify():
    bare = pb.ConsentReceipt(payload=SIGNED.payload, signature=SIGNED.signature, key_id=SIGNED.key_id)
    assert signer().verify(bare).reason == VALID
    rebuilt = receipt_from_stored(SIGNED.payload, SIGNED.signature, SIGNED.key_id)
    assert rebuilt == SIGNED and signer().verify(rebuilt).valid


@pytest.mark.parametrize("field", ["payload", "signature"])
def test_flipping_any_single_byte_of_payload_or_signature_fails(field):
    original = getattr(SIGNED, field)
    verifier = signer()
    for index in range(len(original)):
        for mask in (0x01, 0x80):
            altered = bytearray(original)
            altered[index] ^= mask
            receipt = pb.ConsentReceipt()
            receipt.CopyFrom(SIGNED)
            setattr(receipt, field, bytes(altered))
            answer = verifier.verify(receipt)
            assert not answer.valid and answer.reason == SIGNATURE_INVALID, (index, mask)


@pytest.mark.parametrize("field", ["payload", "signature"])
@pytest.mark.parametrize("change", ["truncate", "extend", "empty"])
def test_shortened_or_lengthened_payload_or_signature_fails(field, change):
    receipt = pb.ConsentReceipt()
    receipt.CopyFrom(SIGNED)
    value = getattr(SIGNED, field)
    setattr(receipt, field, {"truncate": value[:-1], "extend": value + b" ", "empty": b""}[change])
    assert signer().verify(receipt).reason == SIGNATURE_INVALID


def altered_copies():
    """(description, receipt) pairs: SIGNED with one structured field changed."""

    def copy(change):
        receipt = pb.ConsentReceipt()
        receipt.CopyFrom(SIGNED)
        change(receipt)
        return receipt

    yield "receipt_id", copy(lambda r: setattr(r, "receipt_id", "rcpt_02"))
    yield "version", copy(lambda r: setattr(r, "version", "KI-CR-v1.0.0"))
    yield "issue_time", copy(lambda r: setattr(r.issue_time, "nanos", r.issue_time.nanos + 1000))
    yield "issue_time cleared", copy(lambda r: r.ClearField("issue_time"))
    yield "jurisdiction", copy(lambda r: setattr(r, "jurisdiction", "US"))
    yield "collection_method", copy(lambda r: setattr(r, "collection_method", pb.COLLECTION_METHOD_STORE))
    yield "customer_id", copy(lambda r: setattr(r, "customer_id", "cust-43"))
    yield "customer_id cleared", copy(lambda r: setattr(r, "customer_id", ""))
    yield "controller name", copy(lambda r: setattr(r.controllers[0], "name", "Other"))
    yield "controller added", copy(lambda r: r.controllers.add(name="Extra"))
    yield "policy_url", copy(lambda r: setattr(r, "policy_url", "https://evil.example.com"))
    yield "purpose granted", copy(lambda r: setattr(r.purposes[1], "granted", True))
    yield "purpose removed", copy(lambda r: r.purposes.pop())
    yield "purposes reordered", copy(lambda r: r.purposes.reverse())
    yield "category added", copy(lambda r: r.purposes[0].data_categories.append("user.contact"))
    yield "notice_version", copy(lambda r: setattr(r.purposes[0], "notice_version", 4))
    yield "expire_time", copy(lambda r: setattr(r.purposes[0].expire_time, "seconds", 1_900_000_001))
    yield "revision", copy(lambda r: setattr(r.purposes[0], "revision", 10))
    yield "sensitive cleared", copy(lambda r: setattr(r, "sensitive", False))
    yield "sensitive categories", copy(lambda r: r.sensitive_data_categories.append("user.contact"))


@pytest.mark.parametrize(("description", "receipt"), list(altered_copies()), ids=lambda v: str(v)[:30])
def test_changing_any_structured_field_fails(description, receipt):
    answer = signer().verify(receipt)
    assert not answer.valid and answer.reason == FIELDS_MISMATCH, description
    assert answer.receipt_id == "rcpt_01" and answer.detail


def test_an_unknown_key_id_fails():
    for key_id in ["", "0123456789abcdef", SIGNED.key_id.upper()]:
        receipt = pb.ConsentReceipt()
        receipt.CopyFrom(SIGNED)
        receipt.key_id = key_id
        assert signer().verify(receipt).reason == UNKNOWN_KEY
    # A receipt of another service (another key) is unknown here.
    other = signer(SEED_B).sign(a_receipt())
    assert signer().verify(other).reason == UNKNOWN_KEY


def test_a_signature_by_another_key_under_our_key_id_fails():
    forged = signer(SEED_B).sign(a_receipt())
    forged.key_id = SIGNED.key_id
    assert signer().verify(forged).reason == SIGNATURE_INVALID


def test_a_retired_key_still_verifies_and_new_receipts_use_the_new_key():
    old = signer(SEED_A)
    old_receipt = old.sign(a_receipt())
    new = signer(SEED_B, retired_public_keys={old.key_id: old.public_key})
    assert new.key_id != old.key_id and new.known_key_ids == {old.key_id, new.key_id}
    assert new.verify(old_receipt).valid
    new_receipt = new.sign(a_receipt())
    assert new_receipt.key_id == new.key_id and new.verify(new_receipt).valid
    # Without the retired key, the old receipts no longer verify.
    assert signer(SEED_B).verify(old_receipt).reason == UNKNOWN_KEY


def resigned(payload: bytes, seed: bytes = SEED_A) -> pb.ConsentReceipt:
    """A receipt carrying `payload`, validly signed by our key (what only we could make)."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return pb.ConsentReceipt(payload=payload, signature=key.sign(payload), key_id=signer(seed).key_id)


def legacy_payload(*, purpose_too: bool = True) -> bytes:
    """SIGNED's payload as signed before the AIP-142 rename (issuedAt, a purpose's expiresAt)."""
    document = json.loads(SIGNED.payload)
    document["issuedAt"] = document.pop("issueTime")
    if purpose_too:
        document["purposes"][0]["expiresAt"] = document["purposes"][0].pop("expireTime")
    return canonical_json(document)


def test_a_receipt_signed_under_the_earlier_field_names_still_parses_and_verifies():
    payload = legacy_payload()
    assert b'"issuedAt"' in payload and b'"expiresAt"' in payload and b"Time" not in payload
    content = pb.ConsentReceipt()
    content.CopyFrom(SIGNED)
    for name in ("payload", "signature", "key_id"):
        content.ClearField(name)
    assert parse_payload(payload) == content
    stored = resigned(payload)
    assert signer().verify(stored) == pb.VerifyReceiptResponse(valid=True, reason=VALID, receipt_id="rcpt_01")
    # What GetConsentReceipt returns from storage: structured fields under the current names.
    full = receipt_from_stored(stored.payload, stored.signature, stored.key_id)
    assert (
        full.issue_time == SIGNED.issue_time
        and full.purposes[0].expire_time == SIGNED.purposes[0].expire_time
    )
    assert signer().verify(full).valid
    # Half-renamed payloads were never signed by any version: malformed.
    assert signer().verify(resigned(legacy_payload(purpose_too=False))).reason == PAYLOAD_MALFORMED


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"receiptId":"r"',
        b'{"receiptId": "r"}',  # not canonical (whitespace)
        b'{"version":"v","receiptId":"r"}',  # not canonical (order)
        b'{"receiptId":"r","receiptId":"s"}',  # duplicate member
        b'{"receiptId":"r","sensitive":false}',  # default values are omitted
        b'{"receiptId":"r","unknownField":1}',
        b'{"keyId":"x","receiptId":"r"}',
        b'{"collectionMethod":"NOT_A_METHOD","receiptId":"r"}',
        b'{"issueTime":"yesterday","receiptId":"r"}',
        b'{"purposes":[{"revision":NaN}],"receiptId":"r"}',
        b"[" * 100_000,
    ],
)
def test_a_signed_payload_that_is_not_canonical_json_of_a_receipt_is_malformed(payload):
    answer = signer().verify(resigned(payload))
    assert not answer.valid and answer.reason == PAYLOAD_MALFORMED and answer.receipt_id == ""


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=200),
    signature=st.binary(max_size=80),
    key_id=st.sampled_from(["", SIGNED.key_id, "zz"]) | st.text(max_size=20),
    receipt_id=st.text(max_size=10),
)
def test_garbage_never_raises_and_never_verifies(payload, signature, key_id, receipt_id):
    answer = signer().verify(
        pb.ConsentReceipt(payload=payload, signature=signature, key_id=key_id, receipt_id=receipt_id)
    )
    assert not answer.valid and answer.reason in (UNKNOWN_KEY, SIGNATURE_INVALID)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_bit_flip_in_the_serialised_receipt_is_caught_or_harmless(index, bit):
    """Flips one bit anywhere in the wire form: the receipt fails to parse or to verify."""
    wire = bytearray(SIGNED.SerializeToString())
    wire[index % len(wire)] ^= 1 << bit
    receipt = pb.ConsentReceipt()
    try:
        receipt.ParseFromString(bytes(wire))
    except Exception:  # the protobuf runtime refuses it
        return
    if signer().verify(receipt).valid:
        receipt.DiscardUnknownFields()
        assert receipt == SIGNED


@settings(max_examples=100, deadline=None)
@given(
    receipt_id=st.text(min_size=1, max_size=64),
    customer_id=st.text(max_size=128),
    purposes=st.lists(
        st.builds(
            pb.ReceiptPurpose,
            purpose=st.text(max_size=40),
            granted=st.booleans(),
            data_categories=st.lists(st.text(max_size=40), max_size=4),
            notice_version=st.integers(min_value=0, max_value=2**31 - 1),
            revision=st.integers(min_value=0, max_value=2**63 - 1),
        ),
        max_size=4,
    ),
    micros=st.integers(min_value=0, max_value=253_402_300_799_000_000),
)
def test_any_receipt_round_trips(receipt_id, customer_id, purposes, micros):
    receipt = pb.ConsentReceipt(receipt_id=receipt_id, customer_id=customer_id, purposes=purposes)
    receipt.issue_time.FromMicroseconds(micros)
    signed = signer().sign(receipt)
    assert signer().verify(signed).valid
    content = pb.ConsentReceipt()
    content.CopyFrom(signed)
    for name in ("payload", "signature", "key_id"):
        content.ClearField(name)
    assert parse_payload(signed.payload) == content


def test_from_settings_uses_the_configured_key_controllers_and_retired_keys(tmp_path, monkeypatch):
    retired = signer(SEED_B)
    monkeypatch.setenv(SIGNING_KEY_VARIABLE, base64.b64encode(SEED_A).decode())
    monkeypatch.setenv(RETIRED_KEYS_VARIABLE, json.dumps({retired.key_id: retired.public_key_base64}))
    monkeypatch.setenv("NAJIMI_CONSENT_JURISDICTION", "JP")
    configured = ReceiptSigner.from_settings(load_settings("consent", data_dir=tmp_path))
    assert configured.key_id == signer(SEED_A).key_id == key_id_of(configured.public_key)
    assert len(configured.key_id) == 16
    assert configured.verify(retired.sign(a_receipt())).valid
    signed = configured.sign(a_receipt())
    assert signed.jurisdiction == "JP" and signed.controllers[0].name == "najimi demo shop"
    assert not (tmp_path / SIGNING_KEY_FILE).exists()


def test_without_a_configured_key_a_key_file_is_generated_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_VARIABLE, raising=False)
    monkeypatch.delenv(RETIRED_KEYS_VARIABLE, raising=False)
    settings = load_settings("consent", data_dir=tmp_path)
    first = ReceiptSigner.from_settings(settings)
    assert (tmp_path / SIGNING_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert ReceiptSigner.from_settings(settings).key_id == first.key_id


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (SIGNING_KEY_VARIABLE, "not base64!"),
        (SIGNING_KEY_VARIABLE, base64.b64encode(b"short").decode()),
        (RETIRED_KEYS_VARIABLE, "not json"),
        (RETIRED_KEYS_VARIABLE, "[]"),
        (RETIRED_KEYS_VARIABLE, '{"abc": "not base64!"}'),
        (RETIRED_KEYS_VARIABLE, json.dumps({"0123456789abcdef": base64.b64encode(b"k" * 32).decode()})),
    ],
)
def test_a_bad_key_setting_stops_naming_the_variable(tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv(SIGNING_KEY_VARIABLE, base64.b64encode(SEED_A).decode())
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        ReceiptSigner.from_settings(load_settings("consent", data_dir=tmp_path))
    assert variable in str(stopped.value.code)
