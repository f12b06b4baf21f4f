"""An erasure leaves nothing behind: one customer's data in every service, erased through
consent's data-subject request, then every database searched for what named them.

The suite runs as real processes, on SQLite and on PostgreSQL. After the ERASE request
reports SUCCEEDED, the customer's id, e-mail, phone, loyalty card, name and device serial
number are searched for:
- SQLite: every column of every table of every service's file, text and bytes alike
  (JSON and serialized protobufs are searched as bytes, without decoding), and the raw
  bytes of each .db file and its -wal and -shm files (deleted rows must not linger in
  free pages or old WAL frames);
- PostgreSQL: every column of every table of every service's schema (text, bytea, json,
  anything else as its text form). Dead tuples are not visible to SQL: what VACUUM does
  about them is in the README's erasure section;
- every other file of the data directory except the services' logs (*.log, not a
  database). No EXPORT file exists: an export lives in consent's database, searched above.

No searched value may be found anywhere. The references that stay are listed in
ALLOWED: keyed hashes that name no one, each checked to hold the documented pseudonym.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import json_format, timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as repl_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from services.profile.pii import PiiProtector
from shared.consent_cache import ConsentCache
from shared.settings import SERVICE_NAMES
from tests.e2e.conftest import Suite

CUSTOMER = "cus-erase-7f3a91"
EMAIL = "yui.erasure@example.com"
PHONE = "+819012345678"
CARD = "CARD-ERASE-0099"
SERIAL = "SN-ERASE-4242"
NAME = "Yui Erasure"
# What must not be found anywhere once the erasure has succeeded.
NEEDLES = {
    "customer id": CUSTOMER,
    "e-mail": EMAIL,
    "phone": PHONE,
    "loyalty card": CARD,
    "serial": SERIAL,
    "name": NAME,
}
PURPOSES = ("personalize.recommendations", "personalize.profiling")
CATEGORIES = ("user.behavior.purchase_history", "user.behavior.browsing_history")

# The allow-list: the references to the customer that outlive an erasure to do their
# job, each a keyed hash (HMAC-SHA256 under a key of the service), never the id. A
# searched value is never allowed anywhere, these columns included; the test checks
# that each of them holds the documented pseudonym of the erased customer.
AUDIT_REF = "audit"  # HMAC of the id under consent's audit key (NAJIMI_CONSENT_AUDIT_KEY)
ERASURE_REF = "erasure"  # HMAC of the id under a subkey of profile's PII key
ORDERS_REF = "orders"  # HMAC of the id under replenishment's pseudonym key (NAJIMI_PSEUDONYM_KEY)
ALLOWED = {
    # consent's audit log keeps the customer's entries, chained and verifiable.
    ("consent", "audit_log", "customer_id"): ("erased:", AUDIT_REF),
    ("consent", "audit_log", "customer_ref"): ("", AUDIT_REF),
    # The ERASURE change on the feed, which tells every cache to drop the customer.
    ("consent", "changes", "customer_id"): ("erased:", AUDIT_REF),
    # The data-subject requests, kept as the record of what was done.
    ("consent", "data_subject_requests", "customer_id"): ("erased:", AUDIT_REF),
    ("consent", "data_subject_requests", "customer_ref"): ("", AUDIT_REF),
    # profile's tombstone, which refuses the erased id for good.
    ("profile", "erasures", "customer_ref"): ("", ERASURE_REF),
    # replenishment's orders and their events, kept for accounting (README, Replenishment).
    ("replenishment", "orders", "customer_id"): ("erased:", ORDERS_REF),
    ("replenishment", "order_events", "customer_id"): ("erased:", ORDERS_REF),
}


# -- giving the customer data everywhere --------------------------------------------------


def _metadata(suite: Suite, principal: str) -> tuple[tuple[str, str], ...]:
    return suite.auth(principal)


async def _consent(suite: Suite, storefront) -> None:
    async with grpc.aio.insecure_channel(suite.address("consent")) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)
        for index, purpose in enumerate(PURPOSES):
            granted = await stub.GrantConsent(
                consent_pb.GrantConsentRequest(
                    customer_id=CUSTOMER,
                    purpose=purpose,
                    data_categories=list(CATEGORIES),
                    notice_version=1,
                    collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
                    jurisdiction="JP",
                    request_id=f"grant-{index}",
                ),
                metadata=storefront,
                timeout=10,
            )
            assert granted.receipt.receipt_id


async def _profile(suite: Suite, storefront) -> None:
    async with grpc.aio.insecure_channel(suite.address("profile")) as channel:
        stub = profile_grpc.ProfileServiceStub(channel)
        await stub.CreateCustomer(
            profile_pb.CreateCustomerRequest(
                request_id="signup-1",
                customer_id=CUSTOMER,
                customer=profile_pb.Customer(
                    display_name=NAME,
                    email=EMAIL,
                    phone=PHONE,
                    birth_year=1991,
                    region="JP-13",
                    language_code="ja",
                ),
                identities=[profile_pb.Identifier(type=profile_pb.IDENTIFIER_TYPE_LOYALTY_CARD, value=CARD)],
            ),
            metadata=storefront,
            timeout=10,
        )
        for index, (kind, value) in enumerate(
            [(profile_pb.IDENTIFIER_TYPE_EMAIL, EMAIL), (profile_pb.IDENTIFIER_TYPE_PHONE, PHONE)]
        ):
            await stub.LinkIdentity(
                profile_pb.LinkIdentityRequest(
                    request_id=f"link-{index}",
                    customer_id=CUSTOMER,
                    identifier=profile_pb.Identifier(type=kind, value=value),
                ),
                metadata=storefront,
                timeout=10,
            )
        # Events name the customer by loyalty card; they are collected once profile's
        # consent cache has the grants (it follows the feed), so send until accepted.
        now = int(time.time())
        events = [
            profile_pb.Event(
                event_id=f"pos-{n}",
                identifier=profile_pb.Identifier(type=profile_pb.IDENTIFIER_TYPE_LOYALTY_CARD, value=CARD),
                channel=profile_pb.CHANNEL_STORE,
                event_type=profile_pb.EVENT_TYPE_STORE_PURCHASE,
                occur_time=timestamp_pb2.Timestamp(seconds=now - 86_400 * (10 - n)),
                store_id="tokyo-1",
                order_id=f"R-{n}",
                value_micros=1_200_000_000,
                currency_code="JPY",
                items=[
                    profile_pb.EventItem(
                        item_id="coffee-beans", category_path=["kitchen", "coffee"], quantity=1
                    )
                ],
            )
            for n in range(3)
        ]
        deadline = time.monotonic() + 30
        while True:
            ingested = await stub.IngestEvents(
                profile_pb.IngestEventsRequest(events=events), metadata=storefront, timeout=10
            )
            statuses = {result.status for result in ingested.results}
            if statuses <= {
                profile_pb.EVENT_RESULT_STATUS_ACCEPTED,
                profile_pb.EVENT_RESULT_STATUS_DUPLICATE,
            }:
                break
            assert time.monotonic() < deadline, f"events not accepted: {ingested}"
            await asyncio.sleep(0.1)
        # The trait worker follows the events: wait until the traits are computed.
        while True:
            traits = (
                await stub.GetTraits(
                    profile_pb.GetTraitsRequest(customer_id=CUSTOMER), metadata=storefront, timeout=10
                )
            ).traits
            if traits.HasField("frequency") and traits.category_affinities:
                break
            assert time.monotonic() < deadline, f"traits not computed: {traits}"
            await asyncio.sleep(0.1)


async def _replenishment(suite: Suite, storefront) -> None:
    async with grpc.aio.insecure_channel(suite.address("replenishment")) as channel:
        registered = await repl_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
            repl_pb.RegisterDeviceRequest(
                request_id="reg-1",
                customer_id=CUSTOMER,
                manufacturer="Kobe Roast",
                model="KR-1",
                kind="coffee_machine",
                serial_number=SERIAL,
                display_name="Kitchen coffee machine",
                slots=[
                    repl_pb.Slot(
                        slot_id="beans",
                        item_id="coffee-beans",
                        capacity=1000,
                        unit="g",
                        reorder_quantity=1,
                        unit_price_micros=12_500_000,
                        currency_code="EUR",
                    ),
                    repl_pb.Slot(
                        slot_id="descaler",
                        item_id="coffee-descaler",
                        capacity=500,
                        unit="ml",
                        reorder_quantity=1,
                    ),
                ],
            ),
            metadata=storefront,
            timeout=10,
        )
        assert len(registered.device.slots) == 2
        # An order, kept for accounting after the erasure, with the customer pseudonymised.
        ordered = await repl_grpc.ReplenishmentServiceStub(channel).ReplenishSlot(
            repl_pb.ReplenishSlotRequest(
                request_id="order-1", device_id=registered.device.device_id, slot_id="beans"
            ),
            metadata=storefront,
            timeout=10,
        )
        assert ordered.outcome == repl_pb.REPLENISH_OUTCOME_ORDER_PLACED


async def _recommendation_copy(suite: Suite) -> None:
    """Waits until the recommender's interaction copy (fed by profile's feed) holds the
    customer's purchases, so the erasure has them to remove."""
    async with grpc.aio.insecure_channel(suite.address("recommendation")) as channel:
        stub = privacy_grpc.DataSubjectServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            exported = await stub.ExportCustomerData(
                privacy_pb.ExportCustomerDataRequest(customer_id=CUSTOMER, request_id="copy-check"),
                metadata=_metadata(suite, "admin"),
                timeout=10,
            )
            held = json_format.MessageToDict(exported.document)["held"]
            if len(held.get("interactions", [])) == 3:
                return
            assert time.monotonic() < deadline, f"the recommender's copy never got the events: {held}"
            await asyncio.sleep(0.1)


async def _data_subject_request(suite: Suite, kind: int, request_id: str) -> consent_pb.DataSubjectRequest:
    """Creates the request and follows it until it has finished."""
    crm = _metadata(suite, "service:crm")
    async with grpc.aio.insecure_channel(suite.address("consent")) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)
        created = (
            await stub.CreateDataSubjectRequest(
                consent_pb.CreateDataSubjectRequestRequest(
                    customer_id=CUSTOMER, type=kind, request_id=request_id
                ),
                metadata=crm,
                timeout=10,
            )
        ).data_subject_request
        deadline = time.monotonic() + 60
        while True:
            found = (
                await stub.GetDataSubjectRequest(
                    consent_pb.GetDataSubjectRequestRequest(
                        data_subject_request_id=created.data_subject_request_id
                    ),
                    metadata=crm,
                    timeout=10,
                )
            ).data_subject_request
            if found.state in (
                consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED,
                consent_pb.DATA_SUBJECT_REQUEST_STATE_FAILED,
            ):
                return found
            assert time.monotonic() < deadline, f"request {request_id} did not finish: {found}"
            await asyncio.sleep(0.1)


async def _poll(condition, what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# -- searching ----------------------------------------------------------------------------


def _found_in(value: object) -> list[str]:
    """The needles `value` holds, compared case-insensitively; bytes are searched as bytes."""
    if value is None or isinstance(value, bool | int | float):
        return []
    if isinstance(value, memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        haystack = value.lower()
        return [name for name, needle in NEEDLES.items() if needle.lower().encode() in haystack]
    text = (json.dumps(value) if isinstance(value, dict | list) else str(value)).lower()
    return [name for name, needle in NEEDLES.items() if needle.lower() in text]


Cell = tuple[str, str, str, object]  # service, table, column, value


def _sqlite_cells(data_dir: Path) -> Iterator[Cell]:
    for service in SERVICE_NAMES:
        connection = sqlite3.connect(f"file:{data_dir / f'{service}.db'}?mode=ro", uri=True)
        try:
            tables = [
                row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            for table in tables:
                cursor = connection.execute(f'SELECT * FROM "{table}"')  # noqa: S608
                columns = [d[0] for d in cursor.description]
                for row in cursor.fetchall():
                    yield from (
                        (service, table, column, value) for column, value in zip(columns, row, strict=True)
                    )
        finally:
            connection.close()
        # The files themselves: deleted rows must not linger in free pages or old WAL frames.
        for suffix in ("", "-wal", "-shm"):
            file = data_dir / f"{service}.db{suffix}"
            if file.exists():
                yield service, file.name, "<raw bytes>", file.read_bytes()


def _postgres_cells(database_url: str) -> Iterator[Cell]:
    with psycopg.connect(database_url) as connection:
        for service in SERVICE_NAMES:
            tables = connection.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = %s AND table_type = 'BASE TABLE'",
                (service,),
            ).fetchall()
            assert tables, f"schema {service} has no tables"
            for (table,) in tables:
                cursor = connection.execute(f'SELECT * FROM "{service}"."{table}"')  # noqa: S608
                columns = [d.name for d in cursor.description or ()]
                for row in cursor.fetchall():
                    yield from (
                        (service, table, column, value) for column, value in zip(columns, row, strict=True)
                    )


def _other_files(data_dir: Path) -> Iterator[Cell]:
    """Every file of the data directory but the logs and the databases (searched as cells)."""
    database_files = {f"{s}.db{suffix}" for s in SERVICE_NAMES for suffix in ("", "-wal", "-shm", "-journal")}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and path.suffix != ".log" and path.name not in database_files:
            yield "data_dir", str(path.relative_to(data_dir)), "<raw bytes>", path.read_bytes()


def _cells(suite: Suite) -> list[Cell]:
    cells = list(_other_files(suite.data_dir))
    if suite.database_url:
        return cells + list(_postgres_cells(suite.database_url))
    return cells + list(_sqlite_cells(suite.data_dir))


def _findings(cells: list[Cell]) -> set[tuple[str, str, str, str]]:
    """(service, table, column, what) of every searched value found; the allow-list excuses none."""
    return {
        (service, table, column, name) for service, table, column, value in cells for name in _found_in(value)
    }


def _pseudonyms(data_dir: Path) -> dict[str, str]:
    """The erased customer's keyed hashes, computed from the keys the services generated."""
    audit_key = base64.b64decode((data_dir / "consent-audit.key").read_text())
    pii_key = base64.b64decode((data_dir / "profile-pii.key").read_text())
    return {
        AUDIT_REF: hmac.new(audit_key, CUSTOMER.encode(), hashlib.sha256).hexdigest(),
        ERASURE_REF: PiiProtector(pii_key).erasure_ref(CUSTOMER),
        ORDERS_REF: hmac.new(
            base64.b64decode((data_dir / "replenishment-pseudonym.key").read_text()),
            CUSTOMER.encode(),
            hashlib.sha256,
        ).hexdigest(),
    }


def _missing_references(cells: list[Cell], data_dir: Path) -> list[tuple[str, str, str]]:
    """The allow-listed columns that do not hold the documented pseudonym of the customer."""
    pseudonyms = _pseudonyms(data_dir)
    held = {
        (service, table, column, value) for service, table, column, value in cells if isinstance(value, str)
    }
    return [
        place for place, (prefix, ref) in ALLOWED.items() if (*place, prefix + pseudonyms[ref]) not in held
    ]


# -- the test -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def erasure_suite(request, tmp_path) -> Iterator[Suite]:
    database_url = ""
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_cluster").create_database(
            f"erase_{uuid.uuid4().hex[:12]}"
        )
    suite = Suite(tmp_path, database_url=database_url).start_all()
    yield suite
    suite.stop_all()


async def test_an_erasure_leaves_nothing_behind(erasure_suite: Suite):
    suite = erasure_suite
    storefront = _metadata(suite, "service:storefront")
    # Another service's consent cache, following the feed the whole time.
    watcher = ConsentCache(suite.address("consent"), suite.tokens["service:recommendation"])
    watcher.start()
    try:
        assert await watcher.wait_synced(30)
        await _consent(suite, storefront)
        await _profile(suite, storefront)
        await _replenishment(suite, storefront)
        await _recommendation_copy(suite)
        await _poll(lambda: watcher.check(CUSTOMER, PURPOSES[0]).allowed, "the watcher never saw the grant")
        # An export first: its document (with the PII profile keeps encrypted) is kept by
        # consent, and must go too.
        exported = await _data_subject_request(suite, consent_pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, "export-1")
        assert exported.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED
        # Everything is really there: the search finds each value before the erasure.
        before = {finding[3] for finding in _findings(_cells(suite))}
        assert before == set(NEEDLES), before
        erased = await _data_subject_request(suite, consent_pb.DATA_SUBJECT_REQUEST_TYPE_ERASE, "erase-1")
        assert erased.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED, erased
        # The watcher learnt of the erasure live, although the change names a pseudonym.
        await _poll(
            lambda: not watcher.index.purposes_of(CUSTOMER), "the watcher kept the erased customer's consent"
        )
    finally:
        await watcher.stop()

    # The last writes (the request's completion, with its scrub) may still be committing.
    deadline = time.monotonic() + 15
    cells = _cells(suite)
    while _findings(cells) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        cells = _cells(suite)
    assert _findings(cells) == set(), sorted(_findings(cells))
    assert _missing_references(cells, suite.data_dir) == []
