"""Consent vocabulary through a real in-process gRPC server, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, field_violations, rpc_error

DESIGN_PURPOSES = {
    "personalize.recommendations",
    "personalize.profiling",
    "replenishment.automatic_ordering",
    "marketing.communications",
    "analytics",
}
DESIGN_CATEGORIES = {
    "user.demographic.age_range",
    "user.demographic.gender",
    "user.location.imprecise",
    "user.behavior.purchase_history",
    "user.behavior.browsing_history",
    "user.behavior.search_history",
    "user.behavior.store_visits",
    "user.device.telemetry",
    "user.contact",
}


async def test_vocabulary_is_served_and_paged(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    names, token = [], ""
    while True:
        page = await stub.ListPurposes(
            pb.ListPurposesRequest(page_size=2, page_token=token), metadata=consent.auth("service:profile")
        )
        assert len(page.purposes) <= 2
        names += [p.name for p in page.purposes]
        token = page.next_page_token
        if not token:
            break
    assert set(names) == DESIGN_PURPOSES and names == sorted(names)
    categories = await stub.ListDataCategories(pb.ListDataCategoriesRequest(), metadata=consent.auth())
    assert {c.name for c in categories.data_categories} == DESIGN_CATEGORIES
    assert all(c.description for c in categories.data_categories)
    recommendations = next(
        p
        for p in (await stub.ListPurposes(pb.ListPurposesRequest(), metadata=consent.auth())).purposes
        if p.name == "personalize.recommendations"
    )
    assert "user.behavior.purchase_history" in recommendations.data_categories
    assert {u.service for u in recommendations.data_uses} == {"profile", "recommendation"}


async def test_bad_paging_is_invalid_argument_naming_the_field(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    for request, field in [
        (pb.ListPurposesRequest(page_size=-1), "page_size"),
        (pb.ListPurposesRequest(page_size=1001), "page_size"),
        (pb.ListPurposesRequest(page_token="not-a-token"), "page_token"),
    ]:
        error = await rpc_error(stub.ListPurposes(request, metadata=consent.auth()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error)
    error = await rpc_error(
        stub.ListDataCategories(pb.ListDataCategoriesRequest(page_size=5000), metadata=consent.auth())
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in field_violations(error)


def _category(name: str = "user.behavior.wishlist") -> pb.DataCategory:
    return pb.DataCategory(
        name=name, display_name="Wish list", description="The products you saved for later."
    )


async def test_admin_adds_a_data_category_once_and_it_survives_a_restart(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    request = pb.CreateDataCategoryRequest(data_category=_category(), request_id="req-1")
    first = await stub.CreateDataCategory(request, metadata=consent.auth())
    retry = await stub.CreateDataCategory(request, metadata=consent.auth())
    assert first == retry and first.data_category.name == "user.behavior.wishlist"
    assert first.data_category.create_time.seconds > 0
    duplicate = await rpc_error(
        stub.CreateDataCategory(
            pb.CreateDataCategoryRequest(data_category=_category(), request_id="req-2"),
            metadata=consent.auth(),
        )
    )
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(duplicate) == "DATA_CATEGORY_EXISTS"
    await consent.running.stop(0)

    again = await start_service("consent", database_url)
    listed = await pb_grpc.ConsentServiceStub(again.channel).ListDataCategories(
        pb.ListDataCategoriesRequest(page_size=1000), metadata=again.auth()
    )
    assert [c for c in listed.data_categories if c.name == "user.behavior.wishlist"] == [first.data_category]


async def test_data_category_input_is_checked_field_by_field(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    cases = [
        (pb.CreateDataCategoryRequest(data_category=_category(), request_id=""), "request_id"),
        (pb.CreateDataCategoryRequest(data_category=_category(), request_id="bad id!"), "request_id"),
        (
            pb.CreateDataCategoryRequest(data_category=_category("User.Bad"), request_id="r"),
            "data_category.name",
        ),
        (pb.CreateDataCategoryRequest(data_category=_category("a..b"), request_id="r"), "data_category.name"),
        (
            pb.CreateDataCategoryRequest(
                data_category=pb.DataCategory(name="user.x", description="d"), request_id="r"
            ),
            "data_category.display_name",
        ),
    ]
    for request, field in cases:
        error = await rpc_error(stub.CreateDataCategory(request, metadata=consent.auth()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(error)


async def test_only_admin_manages_the_vocabulary(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    error = await rpc_error(
        stub.CreateDataCategory(
            pb.CreateDataCategoryRequest(data_category=_category(), request_id="r"),
            metadata=consent.auth("service:storefront"),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
