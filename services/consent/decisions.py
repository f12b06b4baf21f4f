"""Recording consent decisions: grants and withdrawals, in one transaction each.

A decision updates the customer's current consent for the purpose, appends it to the
history, publishes a change on the feed with the next global revision, issues one
signed receipt for the whole call, and appends to the audit chain.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.consent import audit
from services.consent.notices import NoticeSchedule
from services.consent.receipts import ReceiptSigner
from services.consent.store import (
    Purpose,
    allocate_revision,
    consent_history,
    consents,
    data_categories,
    insert_change,
    load_purpose,
    receipts,
)
from shared.consent_index import EXPIRED, GRANTED, NEEDS_RENEWAL, NOT_GIVEN, WITHDRAWN
from shared.errors import FailedPrecondition
from shared.proto_time import timestamp_of
from shared.validation import Violations

JURISDICTION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
MAX_DECISIONS = 100


@dataclass(frozen=True)
class DecisionInput:
    """One purpose's decision: a grant of exactly `categories`, or a withdrawal of them
    (all of them when empty)."""

    purpose: str
    grant: bool
    categories: tuple[str, ...]
    notice_version: int = 0
    expires_at_us: int | None = None


@dataclass(frozen=True)
class Recorder:
    """Who records, and with what keys: the context every decision needs."""

    actor: str
    request_id: str
    now_us: int
    signer: ReceiptSigner
    audit_key: bytes


def check_common(
    violations: Violations, customer_id: str, method: int, jurisdiction: str, request_id: str
) -> None:
    violations.require_id("customer_id", customer_id)
    if method not in pb.CollectionMethod.values() or method == pb.COLLECTION_METHOD_UNSPECIFIED:
        violations.add("collection_method", "is required: one of the CollectionMethod values")
    if not JURISDICTION.match(jurisdiction):
        violations.add("jurisdiction", "must be an ISO 3166-1 alpha-2 or ISO 3166-2 code, e.g. DE or US-CA")
    violations.require_request_id("request_id", request_id)


def check_decision(
    connection: Connection, violations: Violations, prefix: str, decision: DecisionInput, now_us: int
) -> tuple[Purpose | None, NoticeSchedule | None]:
    """Checks one decision against the vocabulary and the notices; returns the purpose."""
    purpose = load_purpose(connection, decision.purpose) if decision.purpose else None
    if purpose is None:
        violations.add(
            f"{prefix}purpose", "is required" if not decision.purpose else "is not a known purpose"
        )
        return None, None
    allowed = set(purpose.data_categories)
    for index, category in enumerate(decision.categories):
        if category not in allowed:
            violations.add(
                f"{prefix}data_categories[{index}]", f"is not a data category {purpose.name} may use"
            )
    if len(set(decision.categories)) != len(decision.categories):
        violations.add(f"{prefix}data_categories", "must not repeat a category")
    schedule = NoticeSchedule.load(connection, purpose.name)
    if decision.grant:
        if not decision.categories:
            violations.add(f"{prefix}data_categories", "must name at least one category to grant")
        if decision.notice_version < 1:
            violations.add(f"{prefix}notice_version", "must be at least 1")
        elif schedule.get(decision.notice_version) is None:
            violations.add(f"{prefix}notice_version", f"is not a version of the {purpose.name} notice")
        if decision.expires_at_us is not None and decision.expires_at_us <= now_us:
            violations.add(f"{prefix}expire_time", "must be in the future")
    return purpose, schedule


def _status(
    decision: int, notice_version: int, expires_at_us: int | None, schedule: NoticeSchedule, now_us: int
) -> int:
    if decision == pb.CONSENT_DECISION_UNSPECIFIED:
        return NOT_GIVEN
    if decision == pb.CONSENT_DECISION_WITHDRAWN:
        return WITHDRAWN
    if expires_at_us is not None and expires_at_us <= now_us:
        return EXPIRED
    if notice_version < schedule.material_in_effect(now_us):
        return NEEDS_RENEWAL
    return GRANTED


def purpose_consent(
    row: sa.Row | None, purpose: str, schedule: NoticeSchedule, now_us: int
) -> pb.PurposeConsent:
    """The current consent message for one purpose from its stored row (None: never decided)."""
    current = schedule.in_effect(now_us)
    if row is None:
        return pb.PurposeConsent(
            purpose=purpose,
            status=NOT_GIVEN,
            decision=pb.CONSENT_DECISION_UNSPECIFIED,
            current_notice_version=current,
        )
    status = _status(row.decision, row.notice_version, row.expires_at_us, schedule, now_us)
    renew_by = schedule.renew_by(row.notice_version, now_us) if status == GRANTED else None
    return pb.PurposeConsent(
        purpose=purpose,
        status=status,  # type: ignore[arg-type]
        decision=row.decision,
        granted_data_categories=json.loads(row.categories),
        notice_version=row.notice_version,
        current_notice_version=current,
        grant_time=timestamp_of(row.given_at_us),
        expire_time=timestamp_of(row.expires_at_us),
        renew_deadline_time=timestamp_of(renew_by),
        revision=row.revision,
        collection_method=row.collection_method,
        jurisdiction=row.jurisdiction,
        receipt_id=row.receipt_id,
    )


def current_row(connection: Connection, customer_id: str, purpose: str) -> sa.Row | None:
    return connection.execute(
        sa.select(consents).where(consents.c.customer_id == customer_id, consents.c.purpose == purpose)
    ).first()


def _sensitive(connection: Connection, categories: set[str]) -> list[str]:
    if not categories:
        return []
    rows = connection.execute(
        sa.select(data_categories.c.name).where(
            data_categories.c.name.in_(categories), data_categories.c.sensitive
        )
    )
    return sorted(row.name for row in rows)


def record_decisions(
    connection: Connection,
    recorder: Recorder,
    customer_id: str,
    decisions: Sequence[DecisionInput],
    method: int,
    jurisdiction: str,
) -> tuple[list[pb.PurposeConsent], pb.ConsentReceipt]:
    """Records checked decisions; returns each purpose's consent after it and the receipt."""
    now = recorder.now_us
    receipt_id = f"rcpt_{uuid.uuid4().hex}"
    receipt_purposes: list[pb.ReceiptPurpose] = []
    written: list[tuple[str, NoticeSchedule]] = []
    granted_everywhere: set[str] = set()
    for decision in decisions:
        purpose = load_purpose(connection, decision.purpose)
        assert purpose is not None  # checked before
        schedule = NoticeSchedule.load(connection, purpose.name)
        before = current_row(connection, customer_id, purpose.name)
        before_granted = (
            set(json.loads(before.categories))
            if before is not None and before.decision == pb.CONSENT_DECISION_GRANTED
            else set()
        )
        if decision.grant:
            if decision.notice_version < schedule.material_in_effect(now):
                raise FailedPrecondition(
                    f"notice version {decision.notice_version} of {purpose.name} is outdated by a material version",
                    reason="NOTICE_VERSION_OUTDATED",
                )
            granted = set(decision.categories)
            expiry_candidates = [t for t in (decision.expires_at_us,) if t is not None]
            if purpose.consent_validity_seconds:
                expiry_candidates.append(now + purpose.consent_validity_seconds * 1_000_000)
            expires_at = min(expiry_candidates, default=None)
            notice_version, outcome = decision.notice_version, pb.CONSENT_DECISION_GRANTED
        else:
            withdrawn_asked = set(decision.categories) or before_granted
            granted = before_granted - withdrawn_asked
            keep = before is not None and bool(granted)
            expires_at = before.expires_at_us if keep and before is not None else None
            notice_version = before.notice_version if keep and before is not None else 0
            outcome = pb.CONSENT_DECISION_GRANTED if granted else pb.CONSENT_DECISION_WITHDRAWN
        withdrawn = sorted(before_granted - granted)
        revision = allocate_revision(connection)
        values = dict(
            decision=outcome,
            categories=json.dumps(sorted(granted)),
            notice_version=notice_version,
            collection_method=method,
            jurisdiction=jurisdiction,
            given_at_us=now,
            expires_at_us=expires_at,
            revision=revision,
            receipt_id=receipt_id,
            expiry_published=False,
        )
        if before is None:
            connection.execute(
                consents.insert().values(customer_id=customer_id, purpose=purpose.name, **values)
            )
        else:
            connection.execute(
                consents.update()
                .where(consents.c.customer_id == customer_id, consents.c.purpose == purpose.name)
                .values(**values)
            )
        connection.execute(
            consent_history.insert().values(
                revision=revision,
                customer_id=customer_id,
                purpose=purpose.name,
                decision=outcome,
                categories=json.dumps(sorted(granted)),
                withdrawn_categories=json.dumps(withdrawn),
                notice_version=notice_version,
                collection_method=method,
                jurisdiction=jurisdiction,
                given_at_us=now,
                expires_at_us=expires_at,
                receipt_id=receipt_id,
                actor=recorder.actor,
            )
        )
        status = _status(outcome, notice_version, expires_at, schedule, now)
        insert_change(
            connection,
            pb.ConsentChange(
                revision=revision,
                kind=pb.CONSENT_CHANGE_KIND_CONSENT,
                customer_id=customer_id,
                purpose=purpose.name,
                status=status,  # type: ignore[arg-type]
                granted_data_categories=sorted(granted),
                notice_version=notice_version,
                expire_time=timestamp_of(expires_at),
                change_time=timestamp_of(now),
            ),
        )
        receipt_purposes.append(
            pb.ReceiptPurpose(
                purpose=purpose.name,
                granted=bool(granted),
                data_categories=sorted(granted),
                withdrawn_data_categories=withdrawn,
                notice_version=notice_version,
                notice_url=schedule.url_of(notice_version),
                expire_time=timestamp_of(expires_at),
                revision=revision,
            )
        )
        granted_everywhere |= granted
        audit.append_entry(
            connection,
            ref_key=recorder.audit_key,
            actor=recorder.actor,
            action=pb.AUDIT_ACTION_CONSENT_GRANTED if decision.grant else pb.AUDIT_ACTION_CONSENT_WITHDRAWN,
            customer_id=customer_id,
            request_id=recorder.request_id,
            details={
                "purpose": purpose.name,
                "revision": revision,
                "receipt_id": receipt_id,
                "granted_data_categories": sorted(granted),
                "withdrawn_data_categories": withdrawn,
                "notice_version": notice_version,
            },
            now_us=now,
        )
        written.append((purpose.name, schedule))
    sensitive = _sensitive(connection, granted_everywhere)
    receipt = recorder.signer.sign(
        pb.ConsentReceipt(
            receipt_id=receipt_id,
            issue_time=timestamp_of(now),
            jurisdiction=jurisdiction,
            collection_method=method,  # type: ignore[arg-type]
            customer_id=customer_id,
            purposes=receipt_purposes,
            sensitive=bool(sensitive),
            sensitive_data_categories=sensitive,
        )
    )
    connection.execute(
        receipts.insert().values(
            receipt_id=receipt_id,
            customer_id=customer_id,
            issued_at_us=now,
            payload=receipt.payload,
            signature=receipt.signature,
            key_id=receipt.key_id,
        )
    )
    after = [
        purpose_consent(current_row(connection, customer_id, name), name, schedule, now)
        for name, schedule in written
    ]
    return after, receipt
