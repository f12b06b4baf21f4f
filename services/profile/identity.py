"""Identifiers a customer is known by: their kinds, normalisation and look-up keys."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.profile.customers import check_email, check_phone
from shared.validation import Violations

MAX_IDENTITIES_PER_REQUEST = 100
# LinkIdentity refuses more (RESOURCE_EXHAUSTED); a merge may exceed it, since the
# identifiers it moves belong to the same person already.
MAX_IDENTITIES_PER_CUSTOMER = 1000
MAX_IDENTIFIER_VALUE = 256
# Server-assigned identity ids ("idn_" and 32 hex digits; store.new_identity_id).
IDENTITY_ID = re.compile(r"^[A-Za-z0-9_]{1,40}$")
ISSUER = re.compile(r"^[a-z0-9._-]{1,64}$")
KINDS = ("email", "phone", "loyalty_card", "device_id", "cookie_id", "external_id")
# Kinds that are PII: masked in responses like Customer.email and Customer.phone.
PII_KINDS = ("email", "phone")


@dataclass(frozen=True)
class Identifier:
    kind: str
    value: str
    issuer: str = ""

    @property
    def lookup_key(self) -> str:
        """What the keyed hash is computed over: kind, issuer and normalised value, unambiguously."""
        return f"{self.kind}\x1f{self.issuer}\x1f{self.value}"


@dataclass(frozen=True)
class Identity:
    identity_id: str
    customer_id: str
    identifier: Identifier
    verified: bool
    link_time_us: int
    linked_by: str


@dataclass(frozen=True)
class Resolution:
    """The live customer a subject (identifier or customer id) belongs to today."""

    customer_id: str
    # The merged-away ids passed through on the way, in order.
    merged_customer_ids: list[str]
    # The matching identity, when an identifier was resolved.
    identity: Identity | None = None


def normalised(identifier: Identifier) -> Identifier:
    """E-mail is trimmed and lower-cased, a phone number trimmed; other kinds compare exactly."""
    if identifier.kind == "email":
        return Identifier("email", identifier.value.strip().lower(), identifier.issuer)
    if identifier.kind == "phone":
        return Identifier("phone", identifier.value.strip(), identifier.issuer)
    return identifier


def check_identifier(violations: Violations, path: str, identifier: Identifier) -> None:
    """Checks a normalised identifier; each violation is named `<path>.<field>`."""
    if identifier.kind not in KINDS:
        violations.add(f"{path}.type", "must be one of the IdentifierType values other than UNSPECIFIED")
        return
    value_path = f"{path}.value"
    if not identifier.value:
        violations.add(value_path, "is required")
    elif len(identifier.value) > MAX_IDENTIFIER_VALUE:
        violations.add(value_path, f"must be at most {MAX_IDENTIFIER_VALUE} characters")
    elif identifier.kind == "email":
        check_email(violations, value_path, identifier.value)
    elif identifier.kind == "phone":
        check_phone(violations, value_path, identifier.value)
    issuer_path = f"{path}.issuer"
    if identifier.kind == "external_id" and not identifier.issuer:
        violations.add(issuer_path, "is required for EXTERNAL_ID")
    elif identifier.kind not in ("external_id", "loyalty_card") and identifier.issuer:
        violations.add(issuer_path, "must be empty except for EXTERNAL_ID and LOYALTY_CARD")
    elif identifier.issuer and not ISSUER.match(identifier.issuer):
        violations.add(issuer_path, "must be 1 to 64 characters of [a-z0-9._-]")


def check_identifiers(violations: Violations, path: str, identifiers: list[Identifier]) -> None:
    """Checks a list of normalised identifiers: each one, their number, and no repeats."""
    if len(identifiers) > MAX_IDENTITIES_PER_REQUEST:
        violations.add(path, f"must hold at most {MAX_IDENTITIES_PER_REQUEST} identifiers")
    first_seen: dict[str, int] = {}
    for index, identifier in enumerate(identifiers):
        check_identifier(violations, f"{path}[{index}]", identifier)
        earlier = first_seen.setdefault(identifier.lookup_key, index)
        if earlier != index:
            violations.add(f"{path}[{index}]", f"repeats {path}[{earlier}]")
