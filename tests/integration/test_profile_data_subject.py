"""The profile service's DataSubjectService (export, erasure) over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, json_format
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.db import Database
from tests.conftest import error_reason, field_violations, rpc_error
from tests.integration.test_profile_interactions import (
    BROWSING,
    PURCHASES,
    event,
    purchase,
    start_suite,
    view,
)

CUSTOMER_ID = "CRM:000123"
EMAIL = "Taro.Yamada@example.com"
SEARCHES = "user.behavior.search_history"


def _customer() -> pb.Customer:
    return pb.Customer(
        display_name="Taro Yamada",
        email=EMAIL,
        phone="+81312345678",
        birth_year=1990,
        gender=pb.GENDER_MALE,
        region="JP-13",
        language_code="ja",
        attributes={
            "visits": pb.AttributeValue(int_value=2**40, data_category="user.behavior.store_visits"),
            "big": pb.AttributeValue(int_value=2**60 + 1, data_category="user.behavior.store_visits"),
            "tier": pb.AttributeValue(string_value="gold", data_category="user.behavior.purchase_history"),
        },
    )


def _identities() -> list[pb.Identifier]:
    return [
        pb.Identifier(type=pb.IDENTIFIER_TYPE_EMAIL, value=EMAIL),
        pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value="4000-1234", issuer="najimi-card"),
    ]


async def _profile(start_service, database_url=None):
    profile = await start_service("profile", database_url)
    return (
        profile,
        pb_grpc.ProfileServiceStub(profile.channel),
        privacy_grpc.DataSubjectServiceStub(profile.channel),
    )


async def _create(profile, stub, customer_id: str = CUSTOMER_ID, request_id: str = "create-1"):
    return await stub.CreateCustomer(
        pb.CreateCustomerRequest(
            request_id=request_id, customer_id=customer_id, customer=_customer(), identities=_identities()
        ),
        metadata=profile.auth("service:crm"),
    )


def _export(
    customer_id: str = CUSTOMER_ID, request_id: str = "dsr-1"
) -> privacy_pb.ExportCustomerDataRequest:
    return privacy_pb.ExportCustomerDataRequest(customer_id=customer_id, request_id=request_id)


def _erase(customer_id: str = CUSTOMER_ID, request_id: str = "dsr-1") -> privacy_pb.EraseCustomerDataRequest:
    return privacy_pb.EraseCustomerDataRequest(customer_id=customer_id, request_id=request_id)


def _tables(database_url: str) -> dict[str, list[dict[str, object]]]:
    """Every row of every table of the profile schema."""
    database = Database(database_url, "profile")

    def read(connection):
        names = [n for n in sa.inspect(connection).get_table_names() if n != "alembic_version"]
        return {
            name: [dict(row._mapping) for row in connection.execute(sa.text(f"SELECT * FROM {name}"))]  # noqa: S608
            for name in names
        }

    try:
        return database.transaction(read)
    finally:
        database.close()


async def test_export_returns_everything_held_with_pii_decrypted(start_service, database_url):
    profile, stub, data_subject = await _profile(start_service, database_url)
    created = await _create(profile, stub)
    assert created.customer.pii_masked  # the CRM sees masked PII; the data subject does not

    exported = await data_subject.ExportCustomerData(_export(), metadata=profile.auth("service:consent"))
    assert exported.service == "profile" and exported.export_time.seconds > 1_700_000_000
    document = json_format.MessageToDict(exported.document)
    assert document["customer_id"] == CUSTOMER_ID
    held = document["held"]
    customer = held["customer"]
    assert (customer["display_name"], customer["email"], customer["phone"]) == (
        "Taro Yamada",
        EMAIL,
        "+81312345678",
    )
    assert customer["birth_year"] == 1990 and customer["gender"] == "GENDER_MALE"
    assert customer["region"] == "JP-13" and customer["language_code"] == "ja"
    assert customer["attributes"]["visits"] == {
        "kind": "int",
        "value": 2**40,
        "data_category": "user.behavior.store_visits",
    }
    # Beyond 2^53 a double would round the value: it travels as a decimal string.
    assert customer["attributes"]["big"]["value"] == str(2**60 + 1)
    assert customer["attributes"]["tier"]["value"] == "gold"
    assert customer["create_time"].endswith("Z") and customer["revision"] == 1
    assert sorted((i["type"], i["value"], i["issuer"]) for i in held["identities"]) == [
        ("IDENTIFIER_TYPE_EMAIL", EMAIL.lower(), ""),
        ("IDENTIFIER_TYPE_LOYALTY_CARD", "4000-1234", "najimi-card"),
    ]
    assert all(i["linked_by"] == "service:crm" for i in held["identities"])
    [stored] = held["stored_responses"]
    assert (stored["rpc"], stored["request_id"], stored["caller"]) == (
        "CreateCustomer",
        "create-1",
        "service:crm",
    )
    assert stored["response"]["customer"]["customerId"] == CUSTOMER_ID
    assert held["erasure"] is None
    assert document["not_held_yet"] == {}
    assert held["events"] == [] and held["traits"] is None

    # Admin may export too; the same data gives the same document.
    again = await data_subject.ExportCustomerData(_export(request_id="dsr-2"), metadata=profile.auth("admin"))
    assert again.document == exported.document


async def test_an_unknown_customer_exports_an_empty_document(start_service, database_url):
    profile, _, data_subject = await _profile(start_service, database_url)
    exported = await data_subject.ExportCustomerData(
        _export("nobody"), metadata=profile.auth("service:consent")
    )
    assert json_format.MessageToDict(exported.document)["held"] == {
        "customer": None,
        "identities": [],
        "stored_responses": [],
        "events": [],
        "traits": None,
        "erasure": None,
    }


async def test_erasure_removes_the_customer_and_keeps_a_tombstone(start_service, database_url):
    profile, stub, data_subject = await _profile(start_service, database_url)
    await _create(profile, stub)
    consent = profile.auth("service:consent")

    erased = await data_subject.EraseCustomerData(_erase(), metadata=consent)
    assert erased.service == "profile" and erased.erase_time.seconds > 1_700_000_000
    assert dict(erased.erased_records) == {
        "customers": 1,
        "identities": 2,
        "stored_responses": 1,
        "events": 0,
        "traits": 0,
    }
    # A retry returns the first result and erases nothing more.
    assert await data_subject.EraseCustomerData(_erase(), metadata=consent) == erased
    # A new erasure of an erased customer succeeds with nothing left to erase.
    later = await data_subject.EraseCustomerData(_erase(request_id="dsr-2"), metadata=consent)
    assert dict(later.erased_records) == {
        "customers": 0,
        "identities": 0,
        "stored_responses": 0,
        "events": 0,
        "traits": 0,
    }
    assert later.erase_time.ToMicroseconds() > erased.erase_time.ToMicroseconds()

    admin = profile.auth("admin")
    error = await rpc_error(stub.GetCustomer(pb.GetCustomerRequest(customer_id=CUSTOMER_ID), metadata=admin))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "CUSTOMER_ERASED"
    error = await rpc_error(
        stub.UpdateCustomer(
            pb.UpdateCustomerRequest(
                customer=pb.Customer(customer_id=CUSTOMER_ID, region="JP"),
                update_mask=field_mask_pb2.FieldMask(paths=["region"]),
            ),
            metadata=admin,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "CUSTOMER_ERASED"
    # The id is never used again; a retry of the original creation does not bring it back.
    for request_id in ("create-2", "create-1"):
        error = await rpc_error(_create(profile, stub, request_id=request_id))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, request_id
        assert error_reason(error) == "CUSTOMER_ERASED"
    # The identifiers are free: another customer may be known by them now.
    other = await _create(profile, stub, customer_id="CRM:000124", request_id="create-3")
    assert len(other.identities) == 2

    exported = await data_subject.ExportCustomerData(_export(request_id="dsr-3"), metadata=consent)
    held = json_format.MessageToDict(exported.document)["held"]
    assert held["customer"] is None and held["identities"] == [] and held["stored_responses"] == []
    assert held["erasure"]["request_id"] == "dsr-1"

    tables = _tables(database_url)
    assert [r for r in tables["customers"] if r["customer_id"] == CUSTOMER_ID] == []
    assert [r for r in tables["identities"] if r["customer_id"] == CUSTOMER_ID] == []
    assert [r for r in tables["idempotency"] if r["customer_id"] == CUSTOMER_ID] == []
    # The tombstone keeps a keyed hash of the id, not the id.
    assert [r["request_id"] for r in tables["erasures"]] == ["dsr-1"]
    assert len(tables["erasures"][0]["customer_ref"]) == 64
    assert [r for r in tables["idempotency"] if r["request_id"] == "create-1"] == []
    # Nothing names the customer now, the erasures' own stored replies included.
    for name, rows in tables.items():
        for row in rows:
            assert not any(CUSTOMER_ID in str(value) for value in row.values()), (name, row)


async def test_erasing_an_unknown_customer_succeeds_with_zero_counts(start_service, database_url):
    profile, stub, data_subject = await _profile(start_service, database_url)
    erased = await data_subject.EraseCustomerData(_erase("cus_never_seen"), metadata=profile.auth("admin"))
    assert dict(erased.erased_records) == {
        "customers": 0,
        "identities": 0,
        "stored_responses": 0,
        "events": 0,
        "traits": 0,
    }
    # The id names an erased data subject: it cannot be created afterwards.
    error = await rpc_error(_create(profile, stub, customer_id="cus_never_seen"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "CUSTOMER_ERASED"


async def test_a_request_id_reused_for_another_customer_is_refused(start_service):
    profile, _, data_subject = await _profile(start_service)
    consent = profile.auth("service:consent")
    await data_subject.EraseCustomerData(_erase("c-1", "dsr-1"), metadata=consent)
    error = await rpc_error(data_subject.EraseCustomerData(_erase("c-2", "dsr-1"), metadata=consent))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
    assert "request_id" in field_violations(error)


async def test_creation_racing_erasure_never_outlives_it(start_service, database_url):
    profile, stub, data_subject = await _profile(start_service, database_url)
    ids = [f"race-{n}" for n in range(8)]

    async def create(customer_id: str) -> None:
        try:
            await stub.CreateCustomer(
                pb.CreateCustomerRequest(request_id=f"c-{customer_id}", customer_id=customer_id),
                metadata=profile.auth("service:crm"),
            )
        except grpc.aio.AioRpcError as error:
            assert error_reason(error) == "CUSTOMER_ERASED"

    await asyncio.gather(
        *[create(customer_id) for customer_id in ids],
        *[
            data_subject.EraseCustomerData(_erase(customer_id, f"e-{customer_id}"), metadata=profile.auth())
            for customer_id in ids
        ],
    )
    tables = _tables(database_url)
    assert len(tables["erasures"]) == len(ids)
    assert tables["customers"] == []


@pytest.mark.parametrize("principal", ["service:crm", "service:storefront", "service:recommendation"])
async def test_only_admin_and_consent_may_call(start_service, principal):
    profile, _, data_subject = await _profile(start_service)
    for call in (
        data_subject.ExportCustomerData(_export(), metadata=profile.auth(principal)),
        data_subject.EraseCustomerData(_erase(), metadata=profile.auth(principal)),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"


@pytest.mark.parametrize(
    ("customer_id", "request_id", "fields"),
    [
        ("", "dsr-1", {"customer_id"}),
        ("has space", "dsr-1", {"customer_id"}),
        ("c" * 129, "dsr-1", {"customer_id"}),
        ("c-1", "", {"request_id"}),
        ("c-1", "r" * 65, {"request_id"}),
        ("", "bad/id", {"customer_id", "request_id"}),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(start_service, customer_id, request_id, fields):
    profile, _, data_subject = await _profile(start_service)
    for call in (
        data_subject.ExportCustomerData(_export(customer_id, request_id), metadata=profile.auth()),
        data_subject.EraseCustomerData(_erase(customer_id, request_id), metadata=profile.auth()),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(error)) == fields


async def test_export_and_erasure_cover_the_customers_events_and_traits(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url, customers_=("c-other",))
    profile, stub = suite.profile, suite.stub
    data_subject = privacy_grpc.DataSubjectServiceStub(profile.channel)
    consent = profile.auth("service:consent")
    await _create(profile, stub)
    await suite.grant(CUSTOMER_ID, categories=(PURCHASES, BROWSING, SEARCHES))
    await suite.grant("c-other")
    statuses = await suite.ingest(
        view("e-1", CUSTOMER_ID),
        purchase("e-2", CUSTOMER_ID, items=("b", "c")),
        event("e-3", CUSTOMER_ID, pb.EVENT_TYPE_SEARCH, search_query="decaf beans"),
        view("e-4", "c-other"),
    )
    assert statuses == [pb.EVENT_RESULT_STATUS_ACCEPTED] * 4
    worker = profile.running.app.registrations[0].servicer.trait_worker
    assert await worker.wait_until_processed(timeout=10)

    exported = await data_subject.ExportCustomerData(_export(), metadata=consent)
    held = json_format.MessageToDict(exported.document)["held"]
    assert [e["event_id"] for e in held["events"]] == ["e-1", "e-2", "e-3"]  # commit order
    bought = held["events"][1]
    assert bought["customer_id"] == bought["resolved_customer_id"] == CUSTOMER_ID
    assert bought["event_type"] == "EVENT_TYPE_PURCHASE" and bought["channel"] == "CHANNEL_WEB"
    assert bought["data_category"] == PURCHASES and bought["receive_time"].endswith("Z")
    assert bought["value_micros"] == "1980000000" and bought["currency_code"] == "JPY"
    assert [item["item_id"] for item in bought["items"]] == ["b", "c"]
    assert held["events"][2]["search_query"] == "decaf beans"
    # Traits, computed from everything held (the customer has not consented to profiling).
    traits = held["traits"]
    assert traits["customer_id"] == CUSTOMER_ID
    assert traits["frequency"]["purchase_count"] == 1 and traits["recency"]["explanation"]
    assert traits["data_categories_used"] == [BROWSING, PURCHASES]
    assert {tuple(a["category_path"]) for a in traits["category_affinities"]} == {("kitchen", "coffee")}
    # The export is the subject's own data: it does not depend on what they consent to now.
    await suite.withdraw(CUSTOMER_ID)
    again = await data_subject.ExportCustomerData(_export(request_id="dsr-2"), metadata=consent)
    assert json_format.MessageToDict(again.document)["held"]["events"] == held["events"]
    assert json_format.MessageToDict(again.document)["held"]["traits"]["frequency"] == traits["frequency"]

    erased = await data_subject.EraseCustomerData(_erase(), metadata=consent)
    records = dict(erased.erased_records)
    assert records.pop("traits") > 0  # aggregate rows
    assert records == {"customers": 1, "identities": 2, "stored_responses": 1, "events": 3}
    assert await data_subject.EraseCustomerData(_erase(), metadata=consent) == erased
    after = await data_subject.ExportCustomerData(_export(request_id="dsr-3"), metadata=consent)
    assert json_format.MessageToDict(after.document)["held"]["events"] == []
    assert json_format.MessageToDict(after.document)["held"]["traits"] is None
    tables = _tables(database_url)
    assert [(row["event_id"], row["customer_id"]) for row in tables["events"]] == [("e-4", "c-other")]
    # Nothing names the customer but the tombstone and the erasure requests' records.
    for name, rows in tables.items():
        for row in rows:
            if any(CUSTOMER_ID in str(value) for value in row.values()):
                assert name == "erasures" or (name == "idempotency" and row["rpc"] == "EraseCustomerData")
    # The other customer's data is untouched, in the feed too.
    entries, _ = await suite.list_all()
    assert [(e.interaction.event_id, e.interaction.customer_id) for e in entries] == [("e-4", "c-other")]
