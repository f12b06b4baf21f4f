"""Everything the consent service holds about one customer: its export and its erasure.

Erasure deletes the customer's consents, history, receipts, earlier feed entries and
stored replies, publishes an ERASURE change (so every cache drops the customer), and
pseudonymises the audit trail: entries stay, chained and verifiable, under
"erased:<keyed hash>". The ERASURE change outlives the customer too: it names them by
that pseudonym, and lists the revisions of the removed feed entries, by which a cache
finds the customer's records without the id.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from najimi.consent.v1 import consent_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.consent import audit
from services.consent.receipts import receipt_from_stored
from services.consent.store import (
    allocate_revision,
    changes,
    consent_history,
    consents,
    insert_change,
    receipts,
)
from shared.data_subject import rfc3339
from shared.idempotency import Idempotency
from shared.proto_time import timestamp_of

DECISIONS = {pb.CONSENT_DECISION_GRANTED: "GRANTED", pb.CONSENT_DECISION_WITHDRAWN: "WITHDRAWN"}


def export_customer(connection: Connection, customer_id: str, ref_key: bytes) -> dict[str, Any]:
    """The customer's consent data as one JSON-compatible document (GDPR articles 15 and 20)."""
    current = [
        {
            "purpose": row.purpose,
            "decision": DECISIONS.get(row.decision, "UNSPECIFIED"),
            "granted_data_categories": json.loads(row.categories),
            "notice_version": row.notice_version,
            "collection_method": pb.CollectionMethod.Name(row.collection_method),
            "jurisdiction": row.jurisdiction,
            "grant_time": rfc3339(row.given_at_us),
            "expire_time": rfc3339(row.expires_at_us),
            "receipt_id": row.receipt_id,
        }
        for row in connection.execute(
            sa.select(consents).where(consents.c.customer_id == customer_id).order_by(consents.c.purpose)
        )
    ]
    history = [
        {
            "revision": row.revision,
            "purpose": row.purpose,
            "decision": DECISIONS.get(row.decision, "UNSPECIFIED"),
            "granted_data_categories": json.loads(row.categories),
            "withdrawn_data_categories": json.loads(row.withdrawn_categories),
            "notice_version": row.notice_version,
            "grant_time": rfc3339(row.given_at_us),
            "actor": row.actor,
            "receipt_id": row.receipt_id,
        }
        for row in connection.execute(
            sa.select(consent_history)
            .where(consent_history.c.customer_id == customer_id)
            .order_by(consent_history.c.revision)
        )
    ]
    issued = [
        json_format.MessageToDict(receipt_from_stored(row.payload, row.signature, row.key_id))
        for row in connection.execute(
            sa.select(receipts).where(receipts.c.customer_id == customer_id).order_by(receipts.c.issued_at_us)
        )
    ]
    trail = [
        {
            "sequence": entry.sequence,
            "record_time": entry.record_time.ToJsonString(),
            "actor": entry.actor,
            "action": pb.AuditAction.Name(entry.action),
            "details": json_format.MessageToDict(entry.details),
        }
        for entry in audit.list_entries(
            connection, customer_ref=audit.customer_ref(ref_key, customer_id), start_sequence=0, limit=100_000
        )
    ]
    return {
        "customer_id": customer_id,
        "consents": current,
        "history": history,
        "receipts": issued,
        "audit_trail": trail,
    }


def erase_customer(
    connection: Connection,
    customer_id: str,
    ref_key: bytes,
    request_id: str,
    now_us: int,
    requests: Idempotency,
) -> dict[str, int]:
    """Erases the customer's consent data in the caller's transaction; returns counts per kind."""
    ref = audit.customer_ref(ref_key, customer_id)
    erased_revisions = list(
        connection.execute(
            sa.select(changes.c.revision)
            .where(changes.c.customer_id == customer_id)
            .order_by(changes.c.revision)
        ).scalars()
    )
    erased = {
        "consents": connection.execute(
            consents.delete().where(consents.c.customer_id == customer_id)
        ).rowcount,
        "consent_history": connection.execute(
            consent_history.delete().where(consent_history.c.customer_id == customer_id)
        ).rowcount,
        "receipts": connection.execute(
            receipts.delete().where(receipts.c.customer_id == customer_id)
        ).rowcount,
        "feed_entries": connection.execute(
            changes.delete().where(changes.c.customer_id == customer_id)
        ).rowcount,
        "stored_responses": requests.forget_customers(connection, [customer_id]),
    }
    revision = allocate_revision(connection)
    insert_change(
        connection,
        pb.ConsentChange(
            revision=revision,
            kind=pb.CONSENT_CHANGE_KIND_ERASURE,
            customer_id=audit.ERASED_PREFIX + ref,
            status=pb.CONSENT_STATUS_NOT_GIVEN,
            change_time=timestamp_of(now_us),
            erased_revisions=erased_revisions,
        ),
    )
    audit.append_entry(
        connection,
        ref_key=ref_key,
        actor="system",
        action=pb.AUDIT_ACTION_CUSTOMER_ERASED,
        customer_id=customer_id,
        request_id=request_id,
        details={"revision": revision, **{kind: int(count) for kind, count in erased.items()}},
        now_us=now_us,
    )
    erased["audit_entries_pseudonymised"] = audit.pseudonymise(connection, customer_id, ref)
    return {kind: int(count) for kind, count in erased.items()}
