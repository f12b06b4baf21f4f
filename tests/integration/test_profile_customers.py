"""Profile customers through a real in-process gRPC server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.db import Database
from tests.conftest import error_reason, field_violations, rpc_error

THIS_YEAR = dt.datetime.now(dt.UTC).year


def full_customer() -> pb.Customer:
    return pb.Customer(
        display_name="Taro Yamada",
        email="Taro.Yamada@example.com",
        phone="+81312345678",
        birth_year=THIS_YEAR - 30,
        gender=pb.GENDER_MALE,
        region="JP-13",
        language_code="ja",
        signup_time=timestamp_pb2.Timestamp(seconds=1_600_000_000, nanos=123_456_000),
        attributes={
            "loyalty_tier": pb.AttributeValue(
                string_value="gold", data_category="user.behavior.purchase_history"
            ),
            "visits": pb.AttributeValue(int_value=2**40, data_category="user.behavior.store_visits"),
            "score": pb.AttributeValue(double_value=0.25, data_category="user.demographic.profile"),
            "pet_owner": pb.AttributeValue(bool_value=True, data_category="user.demographic.profile"),
            "first_visit": pb.AttributeValue(
                point_in_time=timestamp_pb2.Timestamp(seconds=1_500_000_000),
                data_category="user.behavior.store_visits",
            ),
        },
    )


def identifiers() -> list[pb.Identifier]:
    return [
        pb.Identifier(type=pb.IDENTIFIER_TYPE_EMAIL, value=" Taro.Yamada@Example.com "),
        pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value="4000-1234", issuer="najimi-card"),
    ]


async def test_create_and_get_a_customer(start_service, database_url):
    profile = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    created = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id="req-1", customer=full_customer(), identities=identifiers()),
        metadata=profile.auth("admin"),
    )
    customer = created.customer
    assert customer.customer_id.startswith("cus_") and len(customer.customer_id) == 36
    assert customer.display_name == "Taro Yamada" and customer.email == "Taro.Yamada@example.com"
    assert customer.phone == "+81312345678" and not customer.pii_masked
    assert customer.age_range == "25-34" and not customer.HasField("birth_year")
    assert customer.gender == pb.GENDER_MALE and customer.region == "JP-13" and customer.language_code == "ja"
    assert customer.signup_time.ToMicroseconds() == 1_600_000_000_123_456
    assert customer.attributes == full_customer().attributes
    assert customer.create_time == customer.update_time and customer.create_time.seconds > 1_700_000_000
    assert customer.etag
    assert [i.identifier.value for i in created.identities] == ["taro.yamada@example.com", "4000-1234"]
    assert {i.customer_id for i in created.identities} == {customer.customer_id}
    assert all(i.identity_id and i.linked_by == "admin" and not i.verified for i in created.identities)
    assert created.identities[1].identifier.issuer == "najimi-card"

    got = await stub.GetCustomer(
        pb.GetCustomerRequest(customer_id=customer.customer_id), metadata=profile.auth("admin")
    )
    assert got.customer == customer


async def test_a_chosen_customer_id_is_kept_and_signup_defaults_to_creation(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    created = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id="r", customer_id="CRM:000123"),
        metadata=profile.auth("service:crm"),
    )
    assert created.customer.customer_id == "CRM:000123"
    assert created.customer.signup_time == created.customer.create_time
    assert created.customer.age_range == "" and created.customer.gender == pb.GENDER_UNSPECIFIED


async def test_pii_is_masked_unless_the_caller_is_admin(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    created = await stub.CreateCustomer(
        pb.CreateCustomerRequest(
            request_id="req-1",
            customer=pb.Customer(
                display_name="山田 太郎", email="jane.doe@example.com", phone="+81312345678"
            ),
            identities=[
                pb.Identifier(type=pb.IDENTIFIER_TYPE_EMAIL, value="jane.doe@example.com"),
                pb.Identifier(type=pb.IDENTIFIER_TYPE_PHONE, value="+81312345678"),
                pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value="ck-42"),
            ],
        ),
        metadata=profile.auth("service:storefront"),
    )
    masked = created.customer
    assert (masked.display_name, masked.email, masked.phone) == (
        "山*** 太***",
        "j***@example.com",
        "+81*******78",
    )
    assert masked.pii_masked
    assert [i.identifier.value for i in created.identities] == ["j***@example.com", "+81*******78", "ck-42"]

    request = pb.GetCustomerRequest(customer_id=masked.customer_id)
    for principal in ("service:storefront", "service:crm"):
        got = (await stub.GetCustomer(request, metadata=profile.auth(principal))).customer
        assert (got.display_name, got.email, got.phone, got.pii_masked) == (
            "山*** 太***",
            "j***@example.com",
            "+81*******78",
            True,
        )
    name = (await stub.GetCustomer(request, metadata=profile.auth("admin"))).customer
    assert (name.display_name, name.email, name.phone, name.pii_masked) == (
        "山田 太郎",
        "jane.doe@example.com",
        "+81312345678",
        False,
    )

    masked_back = pb.CreateCustomerRequest(request_id="req-2", customer=pb.Customer(email=masked.email))
    error = await rpc_error(stub.CreateCustomer(masked_back, metadata=profile.auth("service:storefront")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "customer.email" in field_violations(error)


async def test_pii_is_encrypted_at_rest(start_service, database_url):
    profile = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    created = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id="req-1", customer=full_customer(), identities=identifiers()),
        metadata=profile.auth("admin"),
    )
    plaintexts = [
        b"Taro Yamada",
        b"Taro.Yamada@example.com",
        b"taro.yamada@example.com",
        b"+81312345678",
        b"4000-1234",
    ]
    birth_year = THIS_YEAR - 30
    database = Database(database_url, "profile")
    try:
        tables = database.transaction(
            lambda c: {
                name: [tuple(row) for row in c.execute(sa.text(f"SELECT * FROM {name}"))]  # noqa: S608
                for name in ("customers", "identities", "idempotency")
            }
        )
    finally:
        database.close()
    assert (
        len(tables["customers"]) == 1 and len(tables["identities"]) == 2 and len(tables["idempotency"]) == 1
    )
    values = [value for rows in tables.values() for row in rows for value in row]
    # Integers (times in microseconds, counters) are left out of the byte search: their digits
    # can hold a year by chance. No integer column may be the birth year itself.
    stored = b"".join(
        value if isinstance(value, bytes) else str(value).encode()
        for value in values
        if not isinstance(value, int)
    )
    assert created.customer.customer_id.encode() in stored  # the search below does find what is there
    for plaintext in [*plaintexts, str(birth_year).encode()]:
        assert plaintext not in stored
    assert birth_year not in [value for value in values if isinstance(value, int)]


async def test_customers_survive_a_restart(start_service, database_url, tmp_path):
    first = await start_service("profile", database_url)
    created = await pb_grpc.ProfileServiceStub(first.channel).CreateCustomer(
        pb.CreateCustomerRequest(request_id="req-1", customer=full_customer(), identities=identifiers()),
        metadata=first.auth("admin"),
    )
    await first.running.stop(0)
    assert (tmp_path / "profile-pii.key").stat().st_mode & 0o777 == 0o600

    second = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(second.channel)
    got = await stub.GetCustomer(
        pb.GetCustomerRequest(customer_id=created.customer.customer_id), metadata=second.auth("admin")
    )
    assert got.customer == created.customer
    retried = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id="req-1", customer=full_customer(), identities=identifiers()),
        metadata=second.auth("admin"),
    )
    assert retried == created


async def test_a_retry_returns_the_first_result_and_creates_nothing_more(start_service, database_url):
    profile = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    request = pb.CreateCustomerRequest(request_id="req-7", customer=full_customer(), identities=identifiers())
    first = await stub.CreateCustomer(request, metadata=profile.auth("service:storefront"))
    again = await stub.CreateCustomer(request, metadata=profile.auth("service:storefront"))
    assert again == first

    # Another caller's request ids are its own: the same id creates its own customer.
    other = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id="req-7", customer=pb.Customer(region="JP")),
        metadata=profile.auth("service:crm"),
    )
    assert other.customer.customer_id != first.customer.customer_id

    database = Database(database_url, "profile")
    try:
        count = database.transaction(lambda c: c.execute(sa.text("SELECT count(*) FROM customers")).scalar())
    finally:
        database.close()
    assert count == 2


async def test_racing_copies_of_one_request_create_one_customer(start_service, database_url):
    profile = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    request = pb.CreateCustomerRequest(request_id="race", customer=full_customer(), identities=identifiers())
    results = await asyncio.gather(
        *[stub.CreateCustomer(request, metadata=profile.auth("service:store")) for _ in range(8)]
    )
    assert all(result == results[0] for result in results)
    database = Database(database_url, "profile")
    try:
        count = database.transaction(lambda c: c.execute(sa.text("SELECT count(*) FROM customers")).scalar())
    finally:
        database.close()
    assert count == 1


async def test_taken_ids_and_identifiers_are_already_exists_and_create_nothing(start_service, database_url):
    profile = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    metadata = profile.auth("service:crm")
    first = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id="a", customer_id="crm-1", identities=identifiers()),
        metadata=metadata,
    )

    error = await rpc_error(
        stub.CreateCustomer(pb.CreateCustomerRequest(request_id="b", customer_id="crm-1"), metadata=metadata)
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(error) == "CUSTOMER_ID_TAKEN"

    # The same e-mail in another case is the same identifier.
    clash = pb.CreateCustomerRequest(
        request_id="c",
        customer_id="crm-2",
        identities=[
            pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value="ck-1"),
            pb.Identifier(type=pb.IDENTIFIER_TYPE_EMAIL, value="TARO.YAMADA@EXAMPLE.COM"),
        ],
    )
    error = await rpc_error(stub.CreateCustomer(clash, metadata=metadata))
    assert (
        error.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(error) == "IDENTITY_LINKED_ELSEWHERE"
    )
    assert "identities[1]" in error.details()
    missing = await rpc_error(
        stub.GetCustomer(pb.GetCustomerRequest(customer_id="crm-2"), metadata=profile.auth("admin"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    # The cookie of the failed request was not linked: it is free for another customer.
    fine = await stub.CreateCustomer(
        pb.CreateCustomerRequest(
            request_id="d", identities=[pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value="ck-1")]
        ),
        metadata=metadata,
    )
    assert fine.customer.customer_id not in ("crm-1", "crm-2", first.customer.customer_id)


def _invalid_create_requests() -> list[tuple[pb.CreateCustomerRequest, str]]:
    def with_customer(**fields: object) -> pb.CreateCustomerRequest:
        return pb.CreateCustomerRequest(request_id="r", customer=pb.Customer(**fields))  # type: ignore[arg-type]

    def with_attribute(value: pb.AttributeValue, key: str = "tier") -> pb.CreateCustomerRequest:
        return with_customer(attributes={key: value})

    def with_identities(*identities: pb.Identifier) -> pb.CreateCustomerRequest:
        return pb.CreateCustomerRequest(request_id="r", identities=list(identities))

    category = "user.demographic.profile"
    email = pb.IDENTIFIER_TYPE_EMAIL
    return [
        (pb.CreateCustomerRequest(), "request_id"),
        (pb.CreateCustomerRequest(request_id="has space"), "request_id"),
        (pb.CreateCustomerRequest(request_id="r" * 65), "request_id"),
        (pb.CreateCustomerRequest(request_id="r", customer_id="c" * 65), "customer_id"),
        (pb.CreateCustomerRequest(request_id="r", customer_id="a/b"), "customer_id"),
        (with_customer(display_name="x" * 201), "customer.display_name"),
        (with_customer(display_name="a\x00b"), "customer.display_name"),
        (with_customer(email="not-an-email"), "customer.email"),
        (with_customer(email="a@b.c" + "c" * 250), "customer.email"),
        (with_customer(phone="03-1234-5678"), "customer.phone"),
        (with_customer(birth_year=1899), "customer.birth_year"),
        (with_customer(birth_year=THIS_YEAR + 1), "customer.birth_year"),
        (with_customer(gender=99), "customer.gender"),
        (with_customer(region="Tokyo"), "customer.region"),
        (with_customer(language_code="english!"), "customer.language_code"),
        (with_customer(signup_time=timestamp_pb2.Timestamp(seconds=4_000_000_000)), "customer.signup_time"),
        (with_customer(signup_time=timestamp_pb2.Timestamp(seconds=1, nanos=-5)), "customer.signup_time"),
        (with_attribute(pb.AttributeValue(string_value="x"), key="Bad Key"), "customer.attributes.Bad Key"),
        (with_attribute(pb.AttributeValue(data_category=category)), "customer.attributes.tier"),
        (
            with_attribute(pb.AttributeValue(string_value="x" * 1025, data_category=category)),
            "customer.attributes.tier.string_value",
        ),
        (
            with_attribute(pb.AttributeValue(double_value=float("nan"), data_category=category)),
            "customer.attributes.tier.double_value",
        ),
        (
            with_attribute(
                pb.AttributeValue(
                    point_in_time=timestamp_pb2.Timestamp(seconds=10**12), data_category=category
                )
            ),
            "customer.attributes.tier.point_in_time",
        ),
        (with_attribute(pb.AttributeValue(int_value=1)), "customer.attributes.tier.data_category"),
        (
            with_attribute(pb.AttributeValue(int_value=1, data_category="User Contact")),
            "customer.attributes.tier.data_category",
        ),
        (
            with_attribute(pb.AttributeValue(string_value="a@b.co", data_category="user.contact.email")),
            "customer.attributes.tier.data_category",
        ),
        (
            with_customer(
                attributes={
                    f"a{i}": pb.AttributeValue(int_value=i, data_category=category) for i in range(101)
                }
            ),
            "customer.attributes",
        ),
        (with_identities(pb.Identifier(value="x")), "identities[0].type"),
        (with_identities(pb.Identifier(type=99, value="x")), "identities[0].type"),
        (with_identities(pb.Identifier(type=email)), "identities[0].value"),
        (with_identities(pb.Identifier(type=email, value="nope")), "identities[0].value"),
        (with_identities(pb.Identifier(type=pb.IDENTIFIER_TYPE_PHONE, value="12345")), "identities[0].value"),
        (
            with_identities(pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value="x" * 257)),
            "identities[0].value",
        ),
        (
            with_identities(
                pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value="x"),
                pb.Identifier(type=pb.IDENTIFIER_TYPE_EXTERNAL_ID, value="42"),
            ),
            "identities[1].issuer",
        ),
        (with_identities(pb.Identifier(type=email, value="a@b.co", issuer="x")), "identities[0].issuer"),
        (
            with_identities(
                pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value="1", issuer="Bad Issuer")
            ),
            "identities[0].issuer",
        ),
        (
            with_identities(
                pb.Identifier(type=email, value="a@b.co"), pb.Identifier(type=email, value="A@B.CO")
            ),
            "identities[1]",
        ),
        (
            with_identities(
                *[pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value=str(i)) for i in range(101)]
            ),
            "identities",
        ),
    ]


@pytest.mark.parametrize(("request_message", "field"), _invalid_create_requests())
async def test_bad_create_input_is_invalid_argument_naming_the_field(start_service, request_message, field):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    error = await rpc_error(stub.CreateCustomer(request_message, metadata=profile.auth("admin")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error), field_violations(error)


async def test_every_violation_of_a_request_is_reported_at_once(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    request = pb.CreateCustomerRequest(customer=pb.Customer(email="x", phone="y", region="z"))
    error = await rpc_error(stub.CreateCustomer(request, metadata=profile.auth("admin")))
    assert {"request_id", "customer.email", "customer.phone", "customer.region"} <= set(
        field_violations(error)
    )


async def test_bad_get_input_and_unknown_customers(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    for request, field in [
        (pb.GetCustomerRequest(), "customer_id"),
        (pb.GetCustomerRequest(customer_id="a b"), "customer_id"),
        (pb.GetCustomerRequest(customer_id="c" * 65), "customer_id"),
        (pb.GetCustomerRequest(customer_id="c", purpose="Not A Purpose"), "purpose"),
    ]:
        error = await rpc_error(stub.GetCustomer(request, metadata=profile.auth("admin")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error)

    error = await rpc_error(
        stub.GetCustomer(
            pb.GetCustomerRequest(customer_id="c"), metadata=profile.auth("service:recommendation")
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "PURPOSE_REQUIRED"
    assert "purpose" in field_violations(error)

    error = await rpc_error(
        stub.GetCustomer(pb.GetCustomerRequest(customer_id="nobody"), metadata=profile.auth("admin"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "CUSTOMER_NOT_FOUND"


async def test_principals_not_allowed_are_denied(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    create = pb.CreateCustomerRequest(request_id="r")
    for principal in ("service:fulfilment", "service:recommendation", "service:replenishment"):
        error = await rpc_error(stub.CreateCustomer(create, metadata=profile.auth(principal)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(
        stub.GetCustomer(pb.GetCustomerRequest(customer_id="c"), metadata=profile.auth("service:fulfilment"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(stub.CreateCustomer(create))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
