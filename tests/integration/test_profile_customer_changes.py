"""UpdateCustomer and ListCustomers through a real in-process gRPC server, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, field_violations, rpc_error

CATEGORY = "user.demographic.profile"


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def create(stub, metadata, request_id: str, **fields) -> pb.Customer:
    response = await stub.CreateCustomer(
        pb.CreateCustomerRequest(request_id=request_id, customer=pb.Customer(**fields)), metadata=metadata
    )
    return response.customer


async def test_update_changes_only_the_named_fields_and_survives_a_restart(start_service, database_url):
    first = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(first.channel)
    admin = first.auth("admin")
    created = await create(
        stub,
        admin,
        "r1",
        display_name="Hanako Sato",
        email="hanako@example.com",
        birth_year=1990,
        region="JP-13",
        attributes={
            "tier": pb.AttributeValue(string_value="silver", data_category=CATEGORY),
            "pets": pb.AttributeValue(int_value=2, data_category=CATEGORY),
        },
    )
    change = pb.Customer(
        customer_id=created.customer_id,
        etag=created.etag,
        email="hanako.sato@example.com",
        region="JP-27",
        gender=pb.GENDER_FEMALE,  # not named: ignored
        attributes={"tier": pb.AttributeValue(string_value="gold", data_category=CATEGORY)},
    )
    updated = (
        await stub.UpdateCustomer(
            pb.UpdateCustomerRequest(
                customer=change,
                update_mask=mask("email", "region", "attributes.tier", "attributes.pets", "birth_year"),
            ),
            metadata=admin,
        )
    ).customer
    assert (updated.email, updated.region, updated.display_name) == (
        "hanako.sato@example.com",
        "JP-27",
        "Hanako Sato",
    )
    assert updated.gender == pb.GENDER_UNSPECIFIED and updated.age_range == ""
    assert dict(updated.attributes) == {
        "tier": pb.AttributeValue(string_value="gold", data_category=CATEGORY)
    }
    assert updated.etag != created.etag and updated.create_time == created.create_time
    assert updated.update_time.ToMicroseconds() >= created.update_time.ToMicroseconds()

    # The etag of the first read is stale now.
    error = await rpc_error(
        stub.UpdateCustomer(
            pb.UpdateCustomerRequest(customer=change, update_mask=mask("region")), metadata=admin
        )
    )
    assert error.code() == grpc.StatusCode.ABORTED and error_reason(error) == "ETAG_MISMATCH"

    await first.running.stop(0)
    second = await start_service("profile", database_url)
    got = await pb_grpc.ProfileServiceStub(second.channel).GetCustomer(
        pb.GetCustomerRequest(customer_id=created.customer_id), metadata=second.auth("admin")
    )
    assert got.customer == updated


async def test_a_masked_profile_read_back_with_a_narrow_mask_keeps_the_pii(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    crm = profile.auth("service:crm")
    created = await create(
        stub, crm, "r1", display_name="Jane Doe", email="jane@example.com", phone="+81312345678"
    )
    assert created.pii_masked
    read_back = pb.Customer()
    read_back.CopyFrom(created)
    read_back.language_code = "en-GB"
    updated = (
        await stub.UpdateCustomer(
            pb.UpdateCustomerRequest(customer=read_back, update_mask=mask("language_code")), metadata=crm
        )
    ).customer
    assert updated.language_code == "en-GB" and updated.email == "j***@example.com"
    real = (
        await stub.GetCustomer(
            pb.GetCustomerRequest(customer_id=created.customer_id), metadata=profile.auth("admin")
        )
    ).customer
    assert (real.display_name, real.email, real.phone) == ("Jane Doe", "jane@example.com", "+81312345678")

    # Writing the masked values back is refused.
    for field in ("display_name", "email", "phone"):
        error = await rpc_error(
            stub.UpdateCustomer(
                pb.UpdateCustomerRequest(customer=read_back, update_mask=mask(field)), metadata=crm
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and f"customer.{field}" in field_violations(
            error
        )


async def test_clearing_signup_time_falls_back_to_the_creation_time(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    created = await create(
        stub, profile.auth(), "r1", signup_time=timestamp_pb2.Timestamp(seconds=1_000_000_000)
    )
    updated = (
        await stub.UpdateCustomer(
            pb.UpdateCustomerRequest(
                customer=pb.Customer(customer_id=created.customer_id), update_mask=mask("signup_time")
            ),
            metadata=profile.auth(),
        )
    ).customer
    assert updated.signup_time == created.create_time


@pytest.mark.parametrize(
    ("customer", "paths", "field"),
    [
        (pb.Customer(), ("region",), "customer.customer_id"),
        (pb.Customer(customer_id="a b"), ("region",), "customer.customer_id"),
        (pb.Customer(customer_id="c"), (), "update_mask"),
        (pb.Customer(customer_id="c"), ("*",), "update_mask"),
        (pb.Customer(customer_id="c"), ("age_range",), "update_mask"),
        (pb.Customer(customer_id="c"), ("customer_id",), "update_mask"),
        (pb.Customer(customer_id="c"), ("region.x",), "update_mask"),
        (pb.Customer(customer_id="c"), ("attributes.Bad Key",), "update_mask"),
        (pb.Customer(customer_id="c", region="Osaka"), ("region",), "customer.region"),
        (pb.Customer(customer_id="c", birth_year=1800), ("birth_year",), "customer.birth_year"),
        (
            pb.Customer(customer_id="c", attributes={"tier": pb.AttributeValue(string_value="x")}),
            ("attributes.tier",),
            "customer.attributes.tier.data_category",
        ),
    ],
)
async def test_bad_update_input_is_invalid_argument_naming_the_field(start_service, customer, paths, field):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    error = await rpc_error(
        stub.UpdateCustomer(
            pb.UpdateCustomerRequest(customer=customer, update_mask=mask(*paths)), metadata=profile.auth()
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error), field_violations(error)


async def test_updating_an_unknown_customer_is_not_found(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    error = await rpc_error(
        stub.UpdateCustomer(
            pb.UpdateCustomerRequest(
                customer=pb.Customer(customer_id="nobody", region="JP"), update_mask=mask("region")
            ),
            metadata=profile.auth(),
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "CUSTOMER_NOT_FOUND"


async def test_list_pages_through_customers_in_id_order(start_service, database_url):
    profile = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    ids = []
    for number in range(5):
        customer = await create(stub, profile.auth(), f"r{number}", email=f"c{number}@example.com")
        ids.append(customer.customer_id)

    seen, token = [], ""
    while True:
        page = await stub.ListCustomers(
            pb.ListCustomersRequest(page_size=2, page_token=token),
            metadata=profile.auth("service:storefront"),
        )
        assert len(page.customers) <= 2 and all(c.pii_masked for c in page.customers)
        seen += [c.customer_id for c in page.customers]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(ids)

    # Only customers changed at or after min_update_time.
    newest = await stub.GetCustomer(pb.GetCustomerRequest(customer_id=ids[-1]), metadata=profile.auth())
    later = await stub.ListCustomers(
        pb.ListCustomersRequest(min_update_time=newest.customer.update_time), metadata=profile.auth()
    )
    assert ids[-1] in [c.customer_id for c in later.customers]
    assert {c.customer_id for c in later.customers} <= set(ids)
    assert all(
        c.update_time.ToMicroseconds() >= newest.customer.update_time.ToMicroseconds()
        for c in later.customers
    )
    assert not later.customers[0].pii_masked


async def test_bad_list_input_is_invalid_argument_naming_the_field(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    for number in range(3):
        await create(stub, profile.auth(), f"r{number}")
    first = await stub.ListCustomers(pb.ListCustomersRequest(page_size=1), metadata=profile.auth())
    for request, field in [
        (pb.ListCustomersRequest(page_size=-1), "page_size"),
        (pb.ListCustomersRequest(page_size=1001), "page_size"),
        (pb.ListCustomersRequest(page_token="not-a-token"), "page_token"),
        (
            pb.ListCustomersRequest(page_size=1, page_token=first.next_page_token, show_merged=True),
            "page_token",
        ),
        (pb.ListCustomersRequest(min_update_time=timestamp_pb2.Timestamp(nanos=-1)), "min_update_time"),
        (pb.ListCustomersRequest(purpose="NOT VALID"), "purpose"),
    ]:
        error = await rpc_error(stub.ListCustomers(request, metadata=profile.auth()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error), (field, field_violations(error))
    error = await rpc_error(
        stub.ListCustomers(pb.ListCustomersRequest(), metadata=profile.auth("service:recommendation"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "PURPOSE_REQUIRED"
    error = await rpc_error(
        stub.ListCustomers(pb.ListCustomersRequest(), metadata=profile.auth("service:fulfilment"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(
        stub.UpdateCustomer(pb.UpdateCustomerRequest(), metadata=profile.auth("service:recommendation"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
