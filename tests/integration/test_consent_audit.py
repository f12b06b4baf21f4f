"""The consent audit log on SQLite and PostgreSQL: a hash chain that reports tampering."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.consent.audit import (
    GENESIS_HASH,
    LEGACY_HASHED_NAMES,
    append_entry,
    audit_key,
    customer_ref,
    entry_from_row,
    entry_hash,
    list_entries,
    pseudonymise,
    verify_chain,
)
from shared.canonical_json import canonical_json
from shared.db import Database
from shared.settings import load_settings

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "consent" / "migrations"
KEY = b"k" * 32
T0 = 1_700_000_000_000_000

VALID = pb.AUDIT_VERIFICATION_REASON_VALID
HASH_MISMATCH = pb.AUDIT_VERIFICATION_REASON_HASH_MISMATCH
PREV_HASH_MISMATCH = pb.AUDIT_VERIFICATION_REASON_PREV_HASH_MISMATCH
SEQUENCE_GAP = pb.AUDIT_VERIFICATION_REASON_SEQUENCE_GAP


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url, "consent", MIGRATIONS)
    database.migrate()
    yield database
    database.close()


def append(
    database: Database, index: int, customer_id: str = "", details: dict[str, Any] | None = None
) -> pb.AuditEntry:
    def work(connection: Connection) -> pb.AuditEntry:
        return append_entry(
            connection,
            ref_key=KEY,
            actor="service:storefront" if customer_id else "admin",
            action=pb.AUDIT_ACTION_CONSENT_GRANTED if customer_id else pb.AUDIT_ACTION_PURPOSE_CREATED,
            customer_id=customer_id,
            request_id=f"req-{index}",
            details=details or {"purpose": "analytics", "revision": index},
            now_us=T0 + index,
        )

    return database.transaction(work)


def fill(database: Database, count: int = 6) -> list[pb.AuditEntry]:
    customers = ["alice", "bob", ""]
    return [append(database, i, customers[i % 3]) for i in range(1, count + 1)]


def verify(database: Database, start: int = 0, end: int = 0) -> pb.VerifyAuditLogResponse:
    return database.transaction(lambda connection: verify_chain(connection, start, end), write=False)


def execute(database: Database, sql: str, **params: Any) -> None:
    database.transaction(lambda connection: connection.execute(sa.text(sql), params))


def head(database: Database) -> tuple[int, bytes]:
    row = database.transaction(
        lambda c: c.execute(
            sa.text("SELECT audit_sequence, audit_head_hash FROM feed_head WHERE id = 1")
        ).one()
    )
    return int(row[0]), bytes(row[1])


def stored_row(database: Database, sequence: int) -> dict[str, Any]:
    row = database.transaction(
        lambda c: c.execute(sa.text("SELECT * FROM audit_log WHERE sequence = :s"), {"s": sequence}).one()
    )
    return dict(row._mapping)


def test_an_empty_log_is_intact(database):
    assert verify(database) == pb.VerifyAuditLogResponse(valid=True, reason=VALID)


def test_appended_entries_form_a_valid_chain(database):
    entries = fill(database)
    assert [e.sequence for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(entries))
    assert head(database) == (6, entries[-1].hash)

    answer = verify(database)
    assert answer == pb.VerifyAuditLogResponse(
        valid=True, entries_checked=6, reason=VALID, last_sequence=6, head_hash=entries[-1].hash
    )
    # What is stored reads back as the entry that was appended.
    listed = database.transaction(lambda c: list_entries(c, customer_ref=None, start_sequence=0, limit=100))
    assert listed == entries


def test_the_hash_follows_the_documented_rule(database):
    entry = append(
        database, 1, "alice", {"purpose": "analytics", "revision": 42, "categories": ["user.contact"]}
    )
    canonical = (
        '{"action":"AUDIT_ACTION_CONSENT_GRANTED","actor":"service:storefront",'
        f'"customerRef":"{customer_ref(KEY, "alice")}",'
        '"details":{"categories":["user.contact"],"purpose":"analytics","revision":42},'
        '"prevHash":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",'
        '"recordTime":"2023-11-14T22:13:20.000001Z","requestId":"req-1","sequence":"1"}'
    )
    assert entry.hash == hashlib.sha256(bytes(32) + canonical.encode()).digest()
    assert entry_hash(entry.prev_hash, entry) == entry.hash
    # customer_id is outside the hash; everything else is inside.
    renamed = pb.AuditEntry()
    renamed.CopyFrom(entry)
    renamed.customer_id = "erased:x"
    assert entry_hash(entry.prev_hash, renamed) == entry.hash
    renamed.actor = "admin"
    assert entry_hash(entry.prev_hash, renamed) != entry.hash
    assert json.loads(stored_row(database, 1)["details"]) == {
        "categories": ["user.contact"],
        "purpose": "analytics",
        "revision": 42,
    }


def test_a_chain_hashed_under_the_earlier_member_name_still_verifies(database):
    """Entries appended before the AIP-142 rename were hashed with "recordedAt" for record_time."""
    fill(database)
    prev_hash = GENESIS_HASH
    for sequence in range(1, 7):
        row = stored_row(database, sequence)
        legacy = entry_hash(prev_hash, entry_from_row({**row, "prev_hash": prev_hash}), LEGACY_HASHED_NAMES)
        execute(
            database,
            "UPDATE audit_log SET prev_hash = :p, hash = :h WHERE sequence = :s",
            p=prev_hash,
            h=legacy,
            s=sequence,
        )
        prev_hash = legacy
    execute(database, "UPDATE feed_head SET audit_head_hash = :h WHERE id = 1", h=prev_hash)
    assert stored_row(database, 1)["hash"] != entry_hash(
        GENESIS_HASH, entry_from_row(stored_row(database, 1))
    )

    # Entries appended since, under the current name, continue the chain.
    appended = [append(database, i, "alice") for i in (7, 8)]
    assert appended[0].prev_hash == prev_hash
    answer = verify(database)
    assert answer.valid and answer.entries_checked == 8 and answer.head_hash == appended[-1].hash

    execute(database, """UPDATE audit_log SET details = '{"purpose":"marketing"}' WHERE sequence = 4""")
    broken = verify(database)
    assert not broken.valid and broken.reason == HASH_MISMATCH and broken.first_broken_sequence == 4


def test_customer_ref_is_a_keyed_hash():
    assert customer_ref(KEY, "") == ""
    assert customer_ref(KEY, "alice") == customer_ref(KEY, "alice") != customer_ref(KEY, "bob")
    assert customer_ref(KEY, "alice") != customer_ref(b"j" * 32, "alice")
    assert len(customer_ref(KEY, "alice")) == 64 and int(customer_ref(KEY, "alice"), 16) >= 0


def test_the_audit_key_comes_from_the_settings_or_a_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("NAJIMI_CONSENT_AUDIT_KEY", raising=False)
    settings = load_settings("consent", data_dir=tmp_path)
    generated = audit_key(settings)
    assert len(generated) == 32 and audit_key(settings) == generated
    assert (tmp_path / "consent-audit.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("NAJIMI_CONSENT_AUDIT_KEY", "c2hvcnQ=")
    with pytest.raises(SystemExit) as stopped:
        audit_key(load_settings("consent", data_dir=tmp_path))
    assert "NAJIMI_CONSENT_AUDIT_KEY" in str(stopped.value.code)


def rewrite(database: Database, sequence: int, **changes: Any) -> None:
    """Changes an entry and gives it a matching hash: a careful forger's edit."""
    row = {**stored_row(database, sequence), **changes}
    forged = entry_hash(bytes(row["prev_hash"]), entry_from_row(row))
    execute(
        database,
        "UPDATE audit_log SET details = :details, actor = :actor, hash = :hash WHERE sequence = :s",
        details=row["details"],
        actor=row["actor"],
        hash=forged,
        s=sequence,
    )


def forge_next(database: Database) -> None:
    """Appends an entry by hand, correctly linked, without moving the head."""
    last = stored_row(database, 6)
    row = {**last, "sequence": 7, "prev_hash": bytes(last["hash"]), "actor": "admin"}
    row["hash"] = entry_hash(row["prev_hash"], entry_from_row(row))
    columns = ", ".join(row)
    values = ", ".join(f":{name}" for name in row)
    execute(database, f"INSERT INTO audit_log ({columns}) VALUES ({values})", **row)  # noqa: S608


EDITS: dict[str, tuple[Callable[[Database], None], int, int]] = {
    # name: (edit, first broken sequence, reason)
    "details changed": (
        lambda db: execute(
            db, """UPDATE audit_log SET details = '{"purpose":"marketing"}' WHERE sequence = 3"""
        ),
        3,
        HASH_MISMATCH,
    ),
    "details unreadable": (
        lambda db: execute(db, "UPDATE audit_log SET details = 'not json' WHERE sequence = 3"),
        3,
        HASH_MISMATCH,
    ),
    "actor changed": (
        lambda db: execute(db, "UPDATE audit_log SET actor = 'admin' WHERE sequence = 4"),
        4,
        HASH_MISMATCH,
    ),
    "action changed": (
        lambda db: execute(db, "UPDATE audit_log SET action = 2 WHERE sequence = 2"),
        2,
        HASH_MISMATCH,
    ),
    "time changed": (
        lambda db: execute(db, "UPDATE audit_log SET recorded_at_us = recorded_at_us + 1 WHERE sequence = 1"),
        1,
        HASH_MISMATCH,
    ),
    "customer_ref changed": (
        lambda db: execute(db, "UPDATE audit_log SET customer_ref = '' WHERE sequence = 4"),
        4,
        HASH_MISMATCH,
    ),
    "hash changed": (
        lambda db: execute(db, "UPDATE audit_log SET hash = :h WHERE sequence = 3", h=b"\x01" * 32),
        3,
        HASH_MISMATCH,
    ),
    "prev_hash changed": (
        lambda db: execute(db, "UPDATE audit_log SET prev_hash = :h WHERE sequence = 3", h=b"\x01" * 32),
        3,
        PREV_HASH_MISMATCH,
    ),
    "first prev_hash changed": (
        lambda db: execute(db, "UPDATE audit_log SET prev_hash = :h WHERE sequence = 1", h=b"\x01" * 32),
        1,
        PREV_HASH_MISMATCH,
    ),
    "entry deleted": (lambda db: execute(db, "DELETE FROM audit_log WHERE sequence = 3"), 3, SEQUENCE_GAP),
    "first entry deleted": (
        lambda db: execute(db, "DELETE FROM audit_log WHERE sequence = 1"),
        1,
        SEQUENCE_GAP,
    ),
    "last entry deleted": (
        lambda db: execute(db, "DELETE FROM audit_log WHERE sequence = 6"),
        6,
        SEQUENCE_GAP,
    ),
    "entry renumbered": (
        lambda db: execute(db, "UPDATE audit_log SET sequence = 10 WHERE sequence = 4"),
        4,
        SEQUENCE_GAP,
    ),
    "entry rewritten with a matching hash": (
        lambda db: rewrite(db, 3, actor="system"),
        4,
        PREV_HASH_MISMATCH,
    ),
    "last entry rewritten with a matching hash": (
        lambda db: rewrite(db, 6, details='{"purpose":"marketing"}'),
        6,
        PREV_HASH_MISMATCH,
    ),
    "entry appended by hand": (forge_next, 7, PREV_HASH_MISMATCH),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_row_edited_directly_breaks_the_chain_at_that_entry(database, edit):
    fill(database)
    change, broken, reason = EDITS[edit]
    change(database)
    answer = verify(database)
    assert not answer.valid
    assert (answer.first_broken_sequence, answer.reason) == (broken, reason), answer.detail
    assert answer.detail
    # The intact entries before it are reported, with the last one's hash.
    assert answer.entries_checked == broken - 1 == answer.last_sequence
    assert answer.head_hash == (stored_row(database, broken - 1)["hash"] if broken > 1 else b"")


def test_a_range_is_verified_from_the_trusted_prev_hash_of_its_first_entry(database):
    entries = fill(database)
    execute(database, "UPDATE audit_log SET actor = 'system' WHERE sequence = 5")
    assert verify(database, 2, 4) == pb.VerifyAuditLogResponse(
        valid=True, entries_checked=3, reason=VALID, last_sequence=4, head_hash=entries[3].hash
    )
    assert verify(database, 3, 0).first_broken_sequence == 5
    assert verify(database, 5, 5).reason == HASH_MISMATCH
    assert verify(database, 6, 0).valid  # the anchor of a range is trusted
    assert verify(database, 7, 0) == pb.VerifyAuditLogResponse(valid=True, reason=VALID)
    assert verify(database, 1, 100).first_broken_sequence == 5
    execute(database, "DELETE FROM audit_log WHERE sequence = 2")
    assert (verify(database, 2, 3).first_broken_sequence, verify(database, 2, 3).reason) == (2, SEQUENCE_GAP)


def test_pseudonymising_a_customer_keeps_the_chain_valid(database):
    entries = fill(database)
    alice = customer_ref(KEY, "alice")
    changed = database.transaction(lambda c: pseudonymise(c, "alice", alice))
    assert changed == sum(e.customer_id == "alice" for e in entries) == 2
    answer = verify(database)
    assert answer.valid and answer.entries_checked == 6 and answer.head_hash == entries[-1].hash

    trail = database.transaction(lambda c: list_entries(c, customer_ref=alice, start_sequence=0, limit=100))
    assert [e.sequence for e in trail] == [e.sequence for e in entries if e.customer_id == "alice"]
    assert {e.customer_id for e in trail} == {"erased:" + alice}
    everything = database.transaction(
        lambda c: list_entries(c, customer_ref=None, start_sequence=0, limit=100)
    )
    assert "alice" not in {e.customer_id for e in everything}
    assert {e.customer_id for e in everything} >= {"bob", ""}
    with pytest.raises(ValueError):
        database.transaction(lambda c: pseudonymise(c, "", ""))


def test_listing_pages_by_sequence_and_filters_by_customer(database):
    fill(database, 9)
    page = database.transaction(lambda c: list_entries(c, customer_ref=None, start_sequence=4, limit=3))
    assert [e.sequence for e in page] == [4, 5, 6]
    bob = database.transaction(
        lambda c: list_entries(c, customer_ref=customer_ref(KEY, "bob"), start_sequence=0, limit=100)
    )
    assert [e.sequence for e in bob] == [1, 4, 7] and {e.customer_id for e in bob} == {"bob"}
    nobody = database.transaction(lambda c: list_entries(c, customer_ref="", start_sequence=0, limit=100))
    assert [e.sequence for e in nobody] == [2, 5, 8]


@pytest.mark.parametrize("details", [{"customer_id": "alice"}, {"parts": [{"customerId": "x"}]}])
def test_details_with_a_customer_id_member_are_refused(database, details):
    with pytest.raises(ValueError):
        append(database, 1, "alice", details)
    assert verify(database).entries_checked == 0 and head(database) == (0, bytes(32))


def test_a_customer_whose_id_equals_a_detail_is_still_recorded(database):
    entry = append(database, 1, "analytics", {"purpose": "analytics", "analytics": 1})
    assert entry.customer_id == "analytics" and verify(database).valid


def test_a_failed_transaction_appends_nothing(database):
    fill(database, 2)

    def fail(connection: Connection) -> None:
        append_entry(
            connection,
            ref_key=KEY,
            actor="admin",
            action=pb.AUDIT_ACTION_PURPOSE_CREATED,
            customer_id="",
            request_id="r",
            details={},
            now_us=T0,
        )
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        database.transaction(fail)
    assert append(database, 3).sequence == 3 and verify(database).valid


def test_concurrent_appends_form_one_gap_free_chain(database):
    threads, per_thread = 8, 15
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(number: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                append(database, number * 1000 + i, f"customer-{number}")
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert not errors
    total = threads * per_thread
    answer = verify(database)
    assert answer.valid and answer.entries_checked == total and answer.last_sequence == total
    assert head(database) == (total, answer.head_hash)
    for number in range(threads):
        mine = database.transaction(
            lambda c, n=number: list_entries(
                c, customer_ref=customer_ref(KEY, f"customer-{n}"), start_sequence=0, limit=1000
            )
        )
        # Each thread's entries are in the order it appended them.
        assert [e.request_id for e in mine] == [f"req-{number * 1000 + i}" for i in range(per_thread)]


def test_a_long_log_is_verified_in_batches(database):
    def work(connection: Connection) -> None:
        for i in range(1, 1501):
            append_entry(
                connection,
                ref_key=KEY,
                actor="system",
                action=pb.AUDIT_ACTION_CONSENT_EXPIRED,
                customer_id=f"c{i % 50}",
                request_id="",
                details={"revision": i, "purpose": "analytics"},
                now_us=T0 + i,
            )

    database.transaction(work)
    assert verify(database).entries_checked == 1500
    execute(
        database, "UPDATE audit_log SET details = :d WHERE sequence = 1222", d=canonical_json({"revision": 1})
    )
    answer = verify(database)
    assert (answer.first_broken_sequence, answer.entries_checked) == (1222, 1221)
