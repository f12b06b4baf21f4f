"""Signed consent receipts (Kantara Consent Receipt v1.1 fields, Ed25519 signatures).

What is signed is `payload`: the UTF-8 RFC 8785 canonical JSON of the receipt's
proto3 JSON mapping (lowerCamelCase names, default values omitted) without payload,
signature and key_id (see ConsentReceipt in consent_service.proto). The structured
fields repeat the payload for convenience; verification checks that they match it.
Receipts signed before the AIP-142 rename name issue_time "issuedAt" and a purpose's
expire_time "expiresAt" in their payload; they keep parsing and verifying.

The signing key is an Ed25519 private key given as the base64 of its 32-byte seed in
NAJIMI_CONSENT_SIGNING_KEY, or generated into <data_dir>/consent-signing.key for
development (shared/keys.py). Its key_id is the first 16 hex characters of the
SHA-256 of its raw 32-byte public key. To rotate the key, put the old key's id and
public key (base64 of the raw 32 bytes) into NAJIMI_CONSENT_RETIRED_PUBLIC_KEYS, a
JSON object {"<key_id>": "<base64 public key>", …}, and set the new key: receipts
signed by a retired key keep verifying, new receipts use the new key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from najimi.consent.v1 import consent_service_pb2 as pb

from shared.canonical_json import canonical_json, message_json, renamed_members
from shared.keys import configured_key
from shared.settings import Settings

RECEIPT_VERSION = "KI-CR-v1.1.0"
SIGNING_KEY_VARIABLE = "NAJIMI_CONSENT_SIGNING_KEY"
SIGNING_KEY_FILE = "consent-signing.key"
RETIRED_KEYS_VARIABLE = "NAJIMI_CONSENT_RETIRED_PUBLIC_KEYS"
# The fields outside the payload: the payload itself and what signs it.
UNSIGNED_FIELDS = frozenset({"payload", "signature", "key_id"})
# The JSON names payloads were signed under before the AIP-142 rename (current -> earlier).
LEGACY_RECEIPT_NAMES = {"issueTime": "issuedAt"}
LEGACY_PURPOSE_NAMES = {"expireTime": "expiresAt"}
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def key_id_of(public_key: bytes) -> str:
    """The id of an Ed25519 public key: the first 16 hex characters of SHA-256 of its raw bytes."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def receipt_payload(receipt: pb.ConsentReceipt) -> bytes:
    """The canonical JSON of `receipt` that is signed (payload, signature and key_id left out)."""
    return canonical_json(message_json(receipt, UNSIGNED_FIELDS))


def parse_payload(payload: bytes) -> pb.ConsentReceipt | None:
    """The receipt a payload describes, or None when it is not canonical JSON of a receipt.

    Strict: the payload must be exactly what `receipt_payload` gives for the receipt
    it parses to (under the earlier names for a payload signed before the rename), so
    one receipt has exactly one payload of each naming.
    """
    try:
        document = json.loads(
            payload.decode("utf-8"), object_pairs_hook=_unique_members, parse_constant=_no_constant
        )
        if not isinstance(document, dict):
            return None
        legacy = LEGACY_RECEIPT_NAMES["issueTime"] in document
        receipt = pb.ConsentReceipt()
        json_format.ParseDict(_legacy_named(document, current=True) if legacy else document, receipt)
        expected = message_json(receipt, UNSIGNED_FIELDS)
        if canonical_json(_legacy_named(expected, current=False) if legacy else expected) != payload:
            return None
    except Exception:  # anything a hostile payload can provoke means "malformed"
        return None
    return receipt


def receipt_from_stored(payload: bytes, signature: bytes, key_id: str) -> pb.ConsentReceipt:
    """A full receipt (structured fields filled from the payload) from its stored parts."""
    receipt = parse_payload(payload) or pb.ConsentReceipt()
    receipt.payload = payload
    receipt.signature = signature
    receipt.key_id = key_id
    return receipt


class ReceiptSigner:
    """Signs receipts with the current key and verifies them with it or a retired key."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        *,
        controllers: Iterable[pb.ReceiptController] = (),
        policy_url: str = "",
        jurisdiction: str = "",
        retired_public_keys: Mapping[str, bytes] | None = None,
    ):
        self._private_key = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of(self.public_key)
        self.controllers = list(controllers)
        self.policy_url = policy_url
        self.jurisdiction = jurisdiction
        self._verifiers: dict[str, Ed25519PublicKey] = {
            key_id: Ed25519PublicKey.from_public_bytes(raw)
            for key_id, raw in (retired_public_keys or {}).items()
        }
        self._verifiers[self.key_id] = private_key.public_key()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReceiptSigner:
        """The signer configured by NAJIMI_CONSENT_* settings; SystemExit naming a bad one."""
        seed = configured_key(
            settings.consent_signing_key.get_secret_value(),
            SIGNING_KEY_VARIABLE,
            settings.data_dir,
            SIGNING_KEY_FILE,
        )
        controller = pb.ReceiptController(
            name=settings.consent_controller_name,
            contact=settings.consent_controller_contact,
            email=settings.consent_controller_email,
        )
        return cls(
            Ed25519PrivateKey.from_private_bytes(seed),
            controllers=[controller],
            policy_url=settings.consent_policy_url,
            jurisdiction=settings.consent_jurisdiction,
            retired_public_keys=retired_public_keys(settings.consent_retired_public_keys),
        )

    @property
    def public_key_base64(self) -> str:
        """The current public key as NAJIMI_CONSENT_RETIRED_PUBLIC_KEYS expects it after a rotation."""
        return base64.b64encode(self.public_key).decode()

    @property
    def known_key_ids(self) -> frozenset[str]:
        return frozenset(self._verifiers)

    def sign(self, receipt: pb.ConsentReceipt) -> pb.ConsentReceipt:
        """A signed copy of `receipt`, with payload, signature and key_id set.

        The caller fills the receipt's content: receipt_id and issue_time (required),
        collection_method, customer_id, purposes, and the sensitive flag and
        categories. Left empty, version becomes "KI-CR-v1.1.0", and controllers,
        policy_url and jurisdiction come from the configuration.
        """
        if not receipt.receipt_id or not receipt.HasField("issue_time"):
            raise ValueError("a receipt needs a receipt_id and an issue_time")
        signed = pb.ConsentReceipt()
        signed.CopyFrom(receipt)
        for name in UNSIGNED_FIELDS:
            signed.ClearField(name)  # type: ignore[arg-type]
        if not signed.version:
            signed.version = RECEIPT_VERSION
        if not signed.controllers:
            signed.controllers.extend(self.controllers)
        if not signed.policy_url:
            signed.policy_url = self.policy_url
        if not signed.jurisdiction:
            signed.jurisdiction = self.jurisdiction
        payload = receipt_payload(signed)
        signed.payload = payload
        signed.signature = self._private_key.sign(payload)
        signed.key_id = self.key_id
        return signed

    def verify(self, receipt: pb.ConsentReceipt) -> pb.VerifyReceiptResponse:
        """Whether `receipt` was signed by a key of this service and is unaltered.

        Checks, in order: key_id names a current or retired key (UNKNOWN_KEY); the
        signature is a valid Ed25519 signature of payload (SIGNATURE_INVALID); the
        payload is canonical JSON of a receipt (PAYLOAD_MALFORMED); the structured
        fields equal the payload's (FIELDS_MISMATCH). A receipt may carry the payload,
        signature and key_id only; once it carries any structured field, every
        structured field must equal the payload's — proto3 cannot tell a field
        cleared to its default from one left out, so a cleared field counts as
        altered. Never raises: garbage is an invalid receipt.
        """
        parsed = parse_payload(receipt.payload)
        receipt_id = parsed.receipt_id if parsed is not None else ""

        def answer(
            reason: pb.ReceiptVerificationReason.ValueType, detail: str = ""
        ) -> pb.VerifyReceiptResponse:
            valid = reason == pb.RECEIPT_VERIFICATION_REASON_VALID
            return pb.VerifyReceiptResponse(valid=valid, reason=reason, receipt_id=receipt_id, detail=detail)

        verifier = self._verifiers.get(receipt.key_id)
        if verifier is None:
            return answer(
                pb.RECEIPT_VERIFICATION_REASON_UNKNOWN_KEY, "key_id names no signing key of this service"
            )
        if len(receipt.signature) != SIGNATURE_BYTES:
            return answer(pb.RECEIPT_VERIFICATION_REASON_SIGNATURE_INVALID, "the signature is not 64 bytes")
        try:
            verifier.verify(receipt.signature, receipt.payload)
        except InvalidSignature:
            return answer(
                pb.RECEIPT_VERIFICATION_REASON_SIGNATURE_INVALID, "the signature does not match the payload"
            )
        if parsed is None:
            return answer(
                pb.RECEIPT_VERIFICATION_REASON_PAYLOAD_MALFORMED,
                "the payload is not canonical JSON of a receipt",
            )
        mismatch = _first_mismatch(receipt, parsed)
        if mismatch:
            return answer(
                pb.RECEIPT_VERIFICATION_REASON_FIELDS_MISMATCH, f"field {mismatch} differs from the payload"
            )
        return answer(pb.RECEIPT_VERIFICATION_REASON_VALID)


def retired_public_keys(text: str) -> dict[str, bytes]:
    """Parses NAJIMI_CONSENT_RETIRED_PUBLIC_KEYS; SystemExit naming it when malformed."""
    if not text.strip():
        return {}

    def invalid(problem: str) -> SystemExit:
        return SystemExit(f"najimi: invalid configuration:\n  {RETIRED_KEYS_VARIABLE}: {problem}")

    try:
        document = json.loads(text)
    except ValueError:
        raise invalid('must be a JSON object {"<key_id>": "<base64 Ed25519 public key>", ...}') from None
    if not isinstance(document, dict):
        raise invalid('must be a JSON object {"<key_id>": "<base64 Ed25519 public key>", ...}')
    keys: dict[str, bytes] = {}
    for key_id, encoded in document.items():
        try:
            raw = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise invalid(f"the key of {key_id!r} must be {PUBLIC_KEY_BYTES} bytes, base64-encoded")
        if key_id_of(raw) != key_id:
            raise invalid(f"{key_id!r} is not the id of its key (that is {key_id_of(raw)!r})")
        keys[key_id] = raw
    return keys


def _first_mismatch(receipt: pb.ConsentReceipt, parsed: pb.ConsentReceipt) -> str:
    """The name of the first structured field of `receipt` that differs from `parsed`; "" if none."""
    structured = pb.ConsentReceipt()
    structured.CopyFrom(receipt)
    for name in UNSIGNED_FIELDS:
        structured.ClearField(name)  # type: ignore[arg-type]
    if not structured.ListFields():
        return ""  # payload, signature and key_id only
    for field in pb.ConsentReceipt.DESCRIPTOR.fields:
        if field.name in UNSIGNED_FIELDS:
            continue
        if _value(structured, field) != _value(parsed, field):
            return field.name
    return ""


def _value(message: pb.ConsentReceipt, field: FieldDescriptor) -> Any:
    value = getattr(message, field.name)
    if _is_repeated(field):
        return [item.SerializeToString(deterministic=True) if _is_message(field) else item for item in value]
    if _is_message(field):
        return value.SerializeToString(deterministic=True) if message.HasField(field.name) else None  # type: ignore[arg-type]
    return value


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_message(field: FieldDescriptor) -> bool:
    return bool(field.type == FieldDescriptor.TYPE_MESSAGE)


def _legacy_named(document: dict[str, Any], *, current: bool) -> dict[str, Any]:
    """`document` with the renamed members under their current names (`current`) or their earlier ones."""

    def names(legacy: Mapping[str, str]) -> Mapping[str, str]:
        return {old: new for new, old in legacy.items()} if current else legacy

    renamed = renamed_members(document, names(LEGACY_RECEIPT_NAMES))
    purposes = renamed.get("purposes")
    if isinstance(purposes, list):
        renamed["purposes"] = [
            renamed_members(p, names(LEGACY_PURPOSE_NAMES)) if isinstance(p, dict) else p for p in purposes
        ]
    return renamed


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate member name")
    return document


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
