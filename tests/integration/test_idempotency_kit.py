"""shared/idempotency.py on both back ends: retries, reused ids, erasure, retention."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb

from shared.db import Database
from shared.errors import InvalidArgument
from shared.idempotency import HOUR_US, Idempotency, idempotency, metadata

KEY = b"k" * 32


class Clock:
    """An injected clock: the test moves time, no sleeping."""

    def __init__(self, now_us: int = 1_800_000_000_000_000):
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


@pytest.fixture
def database(database_url):
    database = Database(database_url, "kit")
    metadata.create_all(database.engine)
    yield database
    database.close()


def _grant(customer_id: str = "c-1", request_id: str = "r-1") -> consent_pb.GrantConsentRequest:
    return consent_pb.GrantConsentRequest(customer_id=customer_id, purpose="analytics", request_id=request_id)


def _rows(database: Database) -> list[sa.Row]:
    return database.transaction(lambda c: list(c.execute(sa.select(idempotency))), write=False)


def test_a_retry_gets_the_first_reply_and_a_different_request_is_refused(database):
    kit = Idempotency(KEY, 168)
    calls: list[str] = []

    def carry_out(reply: bytes):
        def work(_connection) -> bytes:
            calls.append(reply.decode())
            return reply

        return work

    first = database.transaction(
        lambda c: kit.run(c, "p", "GrantConsent", _grant(), carry_out(b"one"), "c-1")
    )
    retry = database.transaction(
        lambda c: kit.run(c, "p", "GrantConsent", _grant(), carry_out(b"two"), "c-1")
    )
    assert first == (b"one", True) and retry == (b"one", False) and calls == ["one"]
    with pytest.raises(InvalidArgument) as reused:
        database.transaction(lambda c: kit.once(c, "p", "GrantConsent", _grant("c-2"), carry_out(b"three")))
    assert (
        reused.value.reason == "REQUEST_ID_REUSED" and reused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert [v.field for v in reused.value.violations] == ["request_id"]
    # Request ids belong to the principal and the RPC.
    assert (
        database.transaction(lambda c: kit.once(c, "q", "GrantConsent", _grant("c-2"), carry_out(b"four")))
        == b"four"
    )
    [row, _] = sorted(_rows(database), key=lambda r: r.principal)
    # The digest is keyed: another key gives another digest, and it is not a plain hash of the request.
    assert bytes(row.request_digest) == kit.digest(_grant()) != Idempotency(b"x" * 32, 1).digest(_grant())
    assert row.customer_id == "c-1"


def test_the_request_id_is_not_part_of_the_digest(database):
    kit = Idempotency(KEY, 168)
    assert kit.digest(_grant(request_id="a")) == kit.digest(_grant(request_id="b"))
    assert kit.digest(_grant()) != kit.digest(_grant(customer_id="c-2"))


def test_sealed_replies_are_stored_sealed_and_opened_for_retries_and_exports(database):
    def seal(reply: bytes, context: str) -> bytes:
        return b"sealed:" + context.encode() + b":" + reply[::-1]

    def unseal(stored: bytes, context: str) -> bytes:
        prefix = b"sealed:" + context.encode() + b":"
        assert stored.startswith(prefix), "opened under another context"
        return stored[len(prefix) :][::-1]

    kit = Idempotency(KEY, 168, seal, unseal)
    database.transaction(lambda c: kit.once(c, "p", "GrantConsent", _grant(), lambda _c: b"secret", "c-1"))
    assert b"secret" not in bytes(_rows(database)[0].response)
    assert database.transaction(lambda c: kit.recall(c, "p", "GrantConsent", _grant())) == b"secret"
    [stored] = database.transaction(lambda c: kit.replies_about(c, ["c-1", "c-9"]), write=False)
    assert (stored.principal, stored.rpc, stored.request_id, stored.response) == (
        "p",
        "GrantConsent",
        "r-1",
        b"secret",
    )


def test_forgetting_a_customer_deletes_only_their_replies(database):
    kit = Idempotency(KEY, 168)
    for customer_id, request_id in (("c-1", "r-1"), ("c-1", "r-2"), ("c-2", "r-3")):
        database.transaction(
            lambda c, i=customer_id, r=request_id: kit.once(
                c, "p", "GrantConsent", _grant(i, r), lambda _c: i.encode(), i
            )
        )
    erase = privacy_pb.EraseCustomerDataRequest(customer_id="c-1", request_id="e-1")
    database.transaction(lambda c: kit.once(c, "p", "EraseCustomerData", erase, lambda _c: b"counts"))
    assert database.transaction(lambda c: kit.forget_customers(c, ["c-1"])) == 2
    assert sorted((row.request_id, row.customer_id) for row in _rows(database)) == [
        ("e-1", None),
        ("r-3", "c-2"),
    ]


def test_rows_past_the_retention_are_purged_by_a_later_write(database):
    clock = Clock()
    kit = Idempotency(KEY, retention_hours=2, clock=clock)
    database.transaction(
        lambda c: kit.once(c, "p", "GrantConsent", _grant(request_id="old"), lambda _c: b"1")
    )
    clock.now_us += HOUR_US
    database.transaction(
        lambda c: kit.once(c, "p", "GrantConsent", _grant(request_id="young"), lambda _c: b"2")
    )
    assert {row.request_id for row in _rows(database)} == {"old", "young"}
    clock.now_us += HOUR_US + 1  # "old" is now past two hours, "young" is not
    database.transaction(
        lambda c: kit.once(c, "p", "GrantConsent", _grant(request_id="new"), lambda _c: b"3")
    )
    assert {row.request_id for row in _rows(database)} == {"young", "new"}
    # An expired request id is a new request, purged or not: it is carried out again.
    clock.now_us += 2 * HOUR_US
    again = database.transaction(
        lambda c: kit.run(c, "p", "GrantConsent", _grant(request_id="young"), lambda _c: b"4")
    )
    assert again == (b"4", True)
