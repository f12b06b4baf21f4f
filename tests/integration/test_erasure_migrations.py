"""The migrations that pseudonymise what an earlier version kept in plain text."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from services.consent.app import MIGRATIONS as CONSENT_MIGRATIONS
from services.profile.app import MIGRATIONS as PROFILE_MIGRATIONS
from services.profile.pii import PiiProtector
from shared.db import Database
from shared.keys import keyed_hash


def _upgrade(database: Database, migrations, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations))
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _rows(database: Database, query: str) -> list[tuple]:
    return database.transaction(lambda c: [tuple(row) for row in c.execute(sa.text(query))], write=False)


def test_profile_tombstones_become_keyed_hashes_and_stored_replies_keep_their_customer(database_url):
    database = Database(database_url, "profile", PROFILE_MIGRATIONS)
    try:
        _upgrade(database, PROFILE_MIGRATIONS, "0005")
        database.transaction(
            lambda c: [
                c.execute(sa.text("INSERT INTO erasures VALUES ('gone-1', 5, 'dsr-1')")),
                c.execute(
                    sa.text(
                        "INSERT INTO idempotency VALUES ('p', 'CreateCustomer', 'r-1', :reply, 1),"
                        " ('p', 'EraseCustomerData', 'e-1', :erase, 2)"
                    ),
                    {"reply": b"sealed", "erase": b'{"customer_id": "gone-1"}'},
                ),
                c.execute(
                    sa.text("INSERT INTO customer_requests VALUES ('p', 'CreateCustomer', 'r-1', 'kept-1')")
                ),
            ]
        )
        protector = PiiProtector(b"m" * 32)
        database.migrate(erasure_ref=protector.erasure_ref)
        assert _rows(database, "SELECT customer_ref, erased_at_us, request_id FROM erasures") == [
            (protector.erasure_ref("gone-1"), 5, "dsr-1")
        ]
        assert protector.erasure_ref("gone-1") == keyed_hash(protector._erasure_key, "gone-1") != "gone-1"
        # The old erasure's reply named its customer: it is gone; the other keeps its customer.
        assert _rows(database, "SELECT rpc, request_id, customer_id, request_digest FROM idempotency") == [
            ("CreateCustomer", "r-1", "kept-1", None)
        ]
        assert "customer_requests" not in sa.inspect(database.engine).get_table_names()
    finally:
        database.close()


def test_consent_erasure_changes_name_a_pseudonym_and_customer_replies_are_dropped(database_url):
    database = Database(database_url, "consent", CONSENT_MIGRATIONS)
    try:
        _upgrade(database, CONSENT_MIGRATIONS, "0003")
        database.transaction(
            lambda c: [
                c.execute(
                    sa.text(
                        "INSERT INTO changes (revision, kind, customer_id, purpose, status, categories, "
                        "notice_version, changed_at_us) VALUES (7, 4, 'gone-1', '', 5, '[]', 0, 1), "
                        "(8, 1, 'kept-1', 'analytics', 1, '[]', 1, 2)"
                    )
                ),
                c.execute(
                    sa.text(
                        "INSERT INTO idempotency VALUES ('p', 'GrantConsent', 'g-1', :reply, 1),"
                        " ('admin', 'CreatePurpose', 'p-1', :reply, 2)"
                    ),
                    {"reply": b"reply"},
                ),
            ]
        )
        key = b"a" * 32
        database.migrate(customer_ref_key=key)
        assert _rows(
            database, "SELECT revision, customer_id, erased_revisions FROM changes ORDER BY revision"
        ) == [
            (7, "erased:" + keyed_hash(key, "gone-1"), "[]"),
            (8, "kept-1", None),
        ]
        assert _rows(database, "SELECT rpc FROM idempotency") == [("CreatePurpose",)]
    finally:
        database.close()
