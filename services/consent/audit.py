"""The tamper-evident audit log: an append-only hash chain in the audit_log table.

Each entry's hash is SHA-256(prev_hash || canonical), where canonical is the UTF-8
RFC 8785 canonical JSON of the entry's proto3 JSON mapping without customer_id and
hash (see AuditEntry in consent_service.proto); the first entry's prev_hash is 32
zero bytes. feed_head (one row, id 1) holds the last sequence handed out and the
last entry's hash, so a verification to the end also notices entries removed from
or added after the end of the chain. Record VerifyAuditLogResponse.head_hash
outside najimi now and then: a later verification ending at the same sequence must
report the same hash, which reveals even a rewrite of the whole chain.

Entries appended before record_time had its AIP-142 name were hashed with the member
named recordedAt; verification accepts that naming too, so older chains stay valid.

customer_id is outside the hash so that an erasure can pseudonymise it
("erased:<customer_ref>") without breaking the chain; customer_ref, an HMAC-SHA-256
of the id under the audit key (NAJIMI_CONSENT_AUDIT_KEY, or the development key
file consent-audit.key, see shared/keys.py), is inside the hash from the start.

`details` must never hold personal data — no customer id, name, e-mail, phone
number, address or free text a customer typed: it is inside the hash, so it can
never be erased. Record what changed with vocabulary names, revisions, versions,
counts and server-made ids, e.g. {"purpose": "analytics", "revision": 42}.
`append_entry` refuses details with a member named customer_id (a programming
error); it cannot recognise personal data in general, so callers must not pass any.
It does not compare values with the customer id: an opaque id may equal a purpose
name, and such a customer's consent must still be recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from najimi.consent.v1 import consent_service_pb2 as pb
from sqlalchemy.engine import Connection

from shared.canonical_json import canonical_json, message_json, renamed_members
from shared.keys import configured_key
from shared.settings import Settings

AUDIT_KEY_VARIABLE = "NAJIMI_CONSENT_AUDIT_KEY"
AUDIT_KEY_FILE = "consent-audit.key"
GENESIS_HASH = bytes(32)
ERASED_PREFIX = "erased:"
# The fields outside the hash.
UNHASHED_FIELDS = frozenset({"customer_id", "hash"})
# The JSON names entries were hashed under before the AIP-142 rename (current -> earlier).
LEGACY_HASHED_NAMES = {"recordTime": "recordedAt"}
# Member names details may not use: the customer id belongs in the entry's customer_id.
CUSTOMER_ID_MEMBERS = frozenset({"customer_id", "customerId"})
# Rows fetched at a time while verifying, so a long log is streamed, not loaded.
VERIFY_BATCH = 1000

metadata = sa.MetaData()

# As created by migrations/versions/0002_consent_state.py.
feed_head = sa.Table(
    "feed_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("audit_sequence", sa.BigInteger, nullable=False),
    sa.Column("audit_head_hash", sa.LargeBinary, nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("recorded_at_us", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.String(160), nullable=False),
    sa.Column("action", sa.SmallInteger, nullable=False),  # AuditAction
    sa.Column("customer_id", sa.String(160), nullable=False),
    sa.Column("customer_ref", sa.String(64), nullable=False, index=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # JSON object
    sa.Column("prev_hash", sa.LargeBinary, nullable=False),
    sa.Column("hash", sa.LargeBinary, nullable=False),
)


def audit_key(settings: Settings) -> bytes:
    """The HMAC key of customer references (see the module docstring)."""
    return configured_key(
        settings.consent_audit_key.get_secret_value(), AUDIT_KEY_VARIABLE, settings.data_dir, AUDIT_KEY_FILE
    )


def customer_ref(key: bytes, customer_id: str) -> str:
    """HMAC-SHA-256 of the customer id under the audit key, in hex; "" for no customer."""
    if not customer_id:
        return ""
    return hmac.new(key, customer_id.encode("utf-8"), hashlib.sha256).hexdigest()


def entry_hash(prev_hash: bytes, entry: pb.AuditEntry, names: Mapping[str, str] | None = None) -> bytes:
    """SHA-256(prev_hash || canonical JSON of `entry` without customer_id and hash).

    `names` renames top-level members first (LEGACY_HASHED_NAMES: as hashed before the rename).
    """
    document = message_json(entry, UNHASHED_FIELDS)
    if names:
        document = renamed_members(document, names)
    return hashlib.sha256(prev_hash + canonical_json(document)).digest()


def hash_matches(prev_hash: bytes, entry: pb.AuditEntry, stored_hash: bytes) -> bool:
    """Whether `stored_hash` is the entry's hash under its current or its earlier member names."""
    return any(
        hmac.compare_digest(entry_hash(prev_hash, entry, names), stored_hash)
        for names in (None, LEGACY_HASHED_NAMES)
    )


def append_entry(
    connection: Connection,
    *,
    ref_key: bytes,
    actor: str,
    action: pb.AuditAction.ValueType,
    customer_id: str,
    request_id: str,
    details: Mapping[str, Any],
    now_us: int,
) -> pb.AuditEntry:
    """Appends one entry in the caller's transaction and returns it.

    Takes the feed_head row lock first (an UPDATE), which serialises appends on
    PostgreSQL: sequences are handed out in commit order, without gaps, and each
    entry links to the one committed before it. `details` must never hold personal
    data (see the module docstring); details with a member named customer_id are
    refused with ValueError.
    """
    if _names_a_customer(details):
        raise ValueError("audit details must not hold a customer id (the entry's customer_id carries it)")
    entry = pb.AuditEntry(
        actor=actor,
        action=action,
        customer_id=customer_id,
        customer_ref=customer_ref(ref_key, customer_id),
        request_id=request_id,
    )
    entry.details.update(dict(details))
    entry.record_time.FromMicroseconds(now_us)
    # Store details as the JSON the hash covers (Struct numbers are doubles: 42 -> 42.0 -> "42").
    stored_details = canonical_json(json_format.MessageToDict(entry.details)).decode("utf-8")

    connection.execute(
        sa.update(feed_head).where(feed_head.c.id == 1).values(audit_sequence=feed_head.c.audit_sequence + 1)
    )
    head = connection.execute(
        sa.select(feed_head.c.audit_sequence, feed_head.c.audit_head_hash).where(feed_head.c.id == 1)
    ).one()
    entry.sequence = head.audit_sequence
    entry.prev_hash = bytes(head.audit_head_hash)
    entry.hash = entry_hash(entry.prev_hash, entry)
    connection.execute(
        sa.insert(audit_log).values(
            sequence=entry.sequence,
            recorded_at_us=now_us,
            actor=actor,
            action=int(action),
            customer_id=customer_id,
            customer_ref=entry.customer_ref,
            request_id=request_id,
            details=stored_details,
            prev_hash=entry.prev_hash,
            hash=entry.hash,
        )
    )
    connection.execute(sa.update(feed_head).where(feed_head.c.id == 1).values(audit_head_hash=entry.hash))
    return entry


def list_entries(
    connection: Connection, *, customer_ref: str | None, start_sequence: int, limit: int
) -> list[pb.AuditEntry]:
    """Up to `limit` entries from `start_sequence` on, in ascending sequence order.

    With `customer_ref` (see `customer_ref()`), only that customer's entries, their
    pseudonymised ones included; None means every entry.
    """
    query = sa.select(audit_log).where(audit_log.c.sequence >= start_sequence)
    if customer_ref is not None:
        query = query.where(audit_log.c.customer_ref == customer_ref)
    rows = connection.execute(query.order_by(audit_log.c.sequence).limit(limit))
    return [entry_from_row(row._mapping) for row in rows]


def entry_from_row(row: Mapping[Any, Any]) -> pb.AuditEntry:
    """The AuditEntry of an audit_log row; ValueError when the row cannot be one."""
    entry = pb.AuditEntry(
        sequence=row["sequence"],
        actor=row["actor"],
        action=row["action"],  # type: ignore[arg-type]
        customer_id=row["customer_id"],
        customer_ref=row["customer_ref"],
        request_id=row["request_id"],
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
    )
    entry.record_time.FromMicroseconds(row["recorded_at_us"])
    details = json.loads(row["details"])
    if not isinstance(details, dict):
        raise ValueError("details is not a JSON object")
    entry.details.update(details)
    return entry


def verify_chain(
    connection: Connection, start_sequence: int = 0, end_sequence: int = 0
) -> pb.VerifyAuditLogResponse:
    """Recomputes the chain from start_sequence to end_sequence (0: from the first / to the last).

    Streams the entries in sequence order and reports the first broken one:
    SEQUENCE_GAP when an expected sequence is missing (first_broken_sequence is the
    missing one), PREV_HASH_MISMATCH when an entry's prev_hash is not the previous
    entry's hash (or, verifying from the first entry, not 32 zero bytes),
    HASH_MISMATCH when an entry's content does not match its hash. When the range
    reaches the last sequence feed_head recorded, that entry's hash must be the
    recorded head hash (PREV_HASH_MISMATCH: the last entry was replaced), and an
    entry beyond it is reported as inserted (PREV_HASH_MISMATCH) when verifying to
    the end. Starting after the first entry, the stored prev_hash of the start
    entry is trusted as the anchor.

    entries_checked, last_sequence and head_hash describe the intact entries before
    the first broken one.
    """
    first = max(start_sequence, 1)
    head_sequence, head_hash = _head(connection)
    # The last sequence that must exist: everything up to the recorded head was committed.
    must_reach = head_sequence if end_sequence <= 0 else min(end_sequence, head_sequence)
    query = sa.select(audit_log).where(audit_log.c.sequence >= first)
    if end_sequence > 0:
        query = query.where(audit_log.c.sequence <= end_sequence)
    query = query.order_by(audit_log.c.sequence)

    checked = 0
    last_sequence = 0
    last_hash = b""
    # The hashes of the entries from the recorded head on, to check them against a re-read head.
    tail_hashes: dict[int, bytes] = {}

    def broken(
        sequence: int, reason: pb.AuditVerificationReason.ValueType, detail: str
    ) -> pb.VerifyAuditLogResponse:
        return pb.VerifyAuditLogResponse(
            valid=False,
            entries_checked=checked,
            first_broken_sequence=sequence,
            reason=reason,
            last_sequence=last_sequence,
            head_hash=last_hash,
            detail=detail,
        )

    result = connection.execute(query.execution_options(yield_per=VERIFY_BATCH))
    try:
        for row in result:
            values = row._mapping
            sequence = int(values["sequence"])
            expected = last_sequence + 1 if checked else first
            if sequence != expected:
                return broken(
                    expected, pb.AUDIT_VERIFICATION_REASON_SEQUENCE_GAP, f"entry {expected} is missing"
                )
            prev_hash = bytes(values["prev_hash"])
            anchor = last_hash if checked else (GENESIS_HASH if sequence == 1 else prev_hash)
            if prev_hash != anchor:
                return broken(
                    sequence,
                    pb.AUDIT_VERIFICATION_REASON_PREV_HASH_MISMATCH,
                    f"entry {sequence} does not link to entry {sequence - 1}",
                )
            stored_hash = bytes(values["hash"])
            try:
                intact = hash_matches(prev_hash, entry_from_row(values), stored_hash)
            except Exception:  # an unreadable row was altered too
                intact = False
            if not intact:
                return broken(
                    sequence,
                    pb.AUDIT_VERIFICATION_REASON_HASH_MISMATCH,
                    f"entry {sequence} does not match its hash",
                )
            if sequence == head_sequence and stored_hash != head_hash:
                return broken(
                    sequence,
                    pb.AUDIT_VERIFICATION_REASON_PREV_HASH_MISMATCH,
                    f"entry {sequence} is not the entry the log's head recorded",
                )
            checked += 1
            last_sequence = sequence
            last_hash = stored_hash
            if sequence >= head_sequence:
                tail_hashes[sequence] = stored_hash
    finally:
        result.close()

    if first <= must_reach and last_sequence < must_reach:
        missing = last_sequence + 1 if checked else first
        return broken(missing, pb.AUDIT_VERIFICATION_REASON_SEQUENCE_GAP, f"entry {missing} is missing")
    if last_sequence > head_sequence:
        # Entries beyond the head read at the start: committed since (fine), or inserted.
        # Every one committed was committed before the head is read again.
        head_sequence, head_hash = _head(connection)
        if last_sequence > head_sequence or tail_hashes.get(head_sequence, head_hash) != head_hash:
            replaced = tail_hashes.get(head_sequence) != head_hash
            bad = max(head_sequence if replaced else head_sequence + 1, first)
            checked -= last_sequence - bad + 1
            last_sequence = bad - 1 if checked else 0
            last_hash = tail_hashes.get(last_sequence, b"") if checked else b""
            return broken(
                bad,
                pb.AUDIT_VERIFICATION_REASON_PREV_HASH_MISMATCH,
                f"entry {bad} is not part of the chain the log's head recorded",
            )
    return pb.VerifyAuditLogResponse(
        valid=True,
        entries_checked=checked,
        reason=pb.AUDIT_VERIFICATION_REASON_VALID,
        last_sequence=last_sequence,
        head_hash=last_hash,
    )


def pseudonymise(connection: Connection, customer_id: str, ref: str) -> int:
    """Replaces the customer id by "erased:<ref>" on the customer's entries; returns how many.

    The chain stays valid: customer_id is outside the hash, and customer_ref (inside
    it) already identifies the trail without revealing the id.
    """
    if not customer_id or not ref:
        raise ValueError("pseudonymise needs a customer id and its customer_ref")
    result = connection.execute(
        sa.update(audit_log)
        .where(audit_log.c.customer_id == customer_id)
        .values(customer_id=ERASED_PREFIX + ref)
    )
    return int(result.rowcount)


def _head(connection: Connection) -> tuple[int, bytes]:
    row = connection.execute(
        sa.select(feed_head.c.audit_sequence, feed_head.c.audit_head_hash).where(feed_head.c.id == 1)
    ).one()
    return int(row.audit_sequence), bytes(row.audit_head_hash)


def _names_a_customer(value: Any) -> bool:
    """Whether a JSON-like value has an object member named customer_id (at any depth)."""
    if isinstance(value, Mapping):
        return any(key in CUSTOMER_ID_MEMBERS or _names_a_customer(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(_names_a_customer(item) for item in value)
    return False
