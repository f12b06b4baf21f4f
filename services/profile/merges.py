"""Merging one customer into another: which merges are allowed and what the target keeps.

Knows nothing of gRPC or SQL; services/profile/identity_store.py runs a merge in one
transaction (identities and events move with a column update) and records it in the
`merges` table.

Rules:
- Only two different, live customers merge. A source merged before is refused (reason
  CUSTOMER_MERGED) unless it was merged into this very target: then the merge is done
  already and its first result is returned. A target merged into another customer is
  refused with CUSTOMER_MERGED too (the caller resolves it first); since both ends must
  be live, a merge can never close a cycle of aliases.
- Attributes: the target's values win. A field or custom attribute the target has no
  value for is filled from the source; one both have with different values keeps the
  target's and is recorded as a conflict. E-mail addresses compare case-insensitively.
  A source attribute that no longer fits under the 100-attribute limit is recorded as a
  conflict with an empty target value (the target kept what it had).
- The source becomes a tombstone: every field emptied, `merged_into` naming the target,
  so its id keeps resolving (ResolveIdentity, and events sent with it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from services.profile.customers import MAX_ATTRIBUTES, Attribute, Customer, Profile, age_range
from shared.errors import DomainError, FailedPrecondition, NotFound

# How a conflict's values are masked for a caller that may not read PII ("" = not PII).
PII_NAME, PII_EMAIL, PII_PHONE = "name", "email", "phone"


@dataclass(frozen=True)
class Conflict:
    """An attribute both customers had, with different values; the target's was kept.

    Values are rendered as text; `pii` says how to mask them (PII_NAME, PII_EMAIL,
    PII_PHONE, or "" when they are not PII). birth_year is rendered as the age band.
    """

    field: str
    source_value: str
    target_value: str
    pii: str = ""


@dataclass(frozen=True)
class MergedProfile:
    profile: Profile
    filled: int
    conflicts: list[Conflict]


@dataclass(frozen=True)
class MergeOutcome:
    """What a merge did, as reported to the caller (and again to a retry)."""

    source_customer_id: str
    target: Customer
    moved_identities: int
    moved_events: int
    filled: int
    conflicts: list[Conflict] = field(default_factory=list)
    merged_at_us: int = 0


@dataclass(frozen=True)
class Standing:
    """Where a customer id stands: live, merged into another, erased, or unknown."""

    customer_id: str
    exists: bool
    erased: bool = False
    merged_into: str = ""


def customer_merged_error(customer_id: str, merged_into: str, field_name: str = "") -> FailedPrecondition:
    metadata = {"customer_id": customer_id, "merged_into": merged_into}
    if field_name:
        metadata["field"] = field_name
    return FailedPrecondition(
        f"customer {customer_id} was merged into {merged_into}; resolve it with ResolveIdentity first",
        reason="CUSTOMER_MERGED",
        metadata=metadata,
    )


def _absent(standing: Standing, field_name: str) -> DomainError | None:
    if standing.exists:
        return None
    if standing.erased:
        return NotFound(
            f"{field_name} names an erased customer",
            reason="CUSTOMER_ERASED",
            metadata={"field": field_name, "customer_id": standing.customer_id},
        )
    return NotFound(
        f"{field_name} names no customer",
        reason="CUSTOMER_NOT_FOUND",
        metadata={"field": field_name, "customer_id": standing.customer_id},
    )


def merge_refusal(source: Standing, target: Standing, merged_before_into: str | None) -> DomainError | None:
    """Why `source` may not be merged into `target`, or None when it may (or already was).

    `merged_before_into` is the target of the source's earlier merge, if it had one.
    """
    problem = _absent(source, "source_customer_id") or _absent(target, "target_customer_id")
    if problem is not None:
        return problem
    if merged_before_into == target.customer_id:
        return None  # done already: the caller returns the first result
    if source.merged_into:
        return customer_merged_error(source.customer_id, source.merged_into, "source_customer_id")
    if target.merged_into:
        error = customer_merged_error(target.customer_id, target.merged_into, "target_customer_id")
        if target.merged_into == source.customer_id:
            error.message = (
                f"customer {target.customer_id} was merged into {source.customer_id}: merging back "
                "would make a cycle"
            )
            error.args = (error.message,)
        return error
    return None


def _timestamp_text(micros: int) -> str:
    moment = dt.datetime.fromtimestamp(micros / 1_000_000, dt.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def attribute_text(attribute: Attribute) -> str:
    """An attribute's value and data category as text, e.g. "gold (user.behavior.purchase_history)"."""
    value: Any = attribute.value
    if attribute.kind == "bool":
        text = "true" if value else "false"
    elif attribute.kind == "timestamp":
        text = _timestamp_text(int(value))
    else:
        text = str(value)
    return f"{text} ({attribute.data_category})"


def merged_profile(target: Profile, source: Profile, this_year: int) -> MergedProfile:
    """The target's profile with its gaps filled from the source, and the conflicts found."""
    filled = 0
    conflicts: list[Conflict] = []
    values: dict[str, Any] = {}

    def merge_field(
        name: str,
        target_value: Any,
        source_value: Any,
        render: Any = str,
        pii: str = "",
        same: Any = None,
    ) -> None:
        nonlocal filled
        empty = (None, "")
        if target_value in empty:
            values[name] = source_value
            filled += source_value not in empty
        else:
            values[name] = target_value
            equal = same(target_value, source_value) if same else target_value == source_value
            if source_value not in empty and not equal:
                conflicts.append(Conflict(name, render(source_value), render(target_value), pii))

    merge_field("display_name", target.display_name, source.display_name, pii=PII_NAME)
    merge_field(
        "email", target.email, source.email, pii=PII_EMAIL, same=lambda a, b: a.casefold() == b.casefold()
    )
    merge_field("phone", target.phone, source.phone, pii=PII_PHONE)
    merge_field(
        "birth_year", target.birth_year, source.birth_year, render=lambda year: age_range(year, this_year)
    )
    merge_field("gender", target.gender, source.gender, render=lambda g: f"GENDER_{g.upper()}")
    merge_field("region", target.region, source.region)
    merge_field("language_code", target.language_code, source.language_code)
    merge_field("signup_time", target.signup_time_us, source.signup_time_us, render=_timestamp_text)

    attributes = dict(target.attributes)
    for key in sorted(source.attributes):
        theirs = source.attributes[key]
        path = f"attributes.{key}"
        ours = attributes.get(key)
        if ours is None and len(attributes) < MAX_ATTRIBUTES:
            attributes[key] = theirs
            filled += 1
        elif ours is None:
            conflicts.append(Conflict(path, attribute_text(theirs), ""))
        elif ours != theirs:
            conflicts.append(Conflict(path, attribute_text(theirs), attribute_text(ours)))

    profile = replace(
        target,
        display_name=values["display_name"],
        email=values["email"],
        phone=values["phone"],
        birth_year=values["birth_year"],
        gender=values["gender"],
        region=values["region"],
        language_code=values["language_code"],
        signup_time_us=values["signup_time"],
        attributes=attributes,
    )
    return MergedProfile(profile, filled, conflicts)
