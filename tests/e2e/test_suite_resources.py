"""The simplest resource of each service, end to end through real processes and a restart."""

from __future__ import annotations

import uuid

import grpc
import pytest
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as repl_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from tests.e2e.conftest import Suite


def _device_request() -> repl_pb.RegisterDeviceRequest:
    return repl_pb.RegisterDeviceRequest(
        request_id="e2e-device-1",
        customer_id="e2e-customer",
        manufacturer="Inkwell",
        model="IW-200",
        kind="printer",
        serial_number="SN-E2E-1",
        display_name="Printer",
        slots=[
            repl_pb.Slot(
                slot_id="black", item_id="ink-black", capacity=100.0, unit="percent", reorder_quantity=1
            )
        ],
    )


def _create_everything(suite: Suite) -> dict[str, object]:
    """Creates one resource in each service; returns what each Get must give back later."""
    created: dict[str, object] = {}
    with grpc.insecure_channel(suite.address("consent")) as channel:
        category = consent_grpc.ConsentServiceStub(channel).CreateDataCategory(
            consent_pb.CreateDataCategoryRequest(
                request_id="e2e-category",
                data_category=consent_pb.DataCategory(
                    name="user.behavior.wishlist", display_name="Wish list", description="Saved products."
                ),
            ),
            metadata=suite.auth(),
            timeout=10,
        )
        created["consent"] = category.data_category
    with grpc.insecure_channel(suite.address("profile")) as channel:
        customer = profile_grpc.ProfileServiceStub(channel).CreateCustomer(
            profile_pb.CreateCustomerRequest(
                request_id="e2e-customer",
                customer_id="e2e-customer",
                customer=profile_pb.Customer(display_name="Hana Sato", region="JP-27", language_code="ja"),
            ),
            metadata=suite.auth(),
            timeout=10,
        )
        created["profile"] = customer.customer
    with grpc.insecure_channel(suite.address("recommendation")) as channel:
        rec_grpc.RecommendationServiceStub(channel).UpsertItems(
            rec_pb.UpsertItemsRequest(
                request_id="e2e-items",
                items=[
                    rec_pb.Item(
                        item_id="ink-black",
                        title="Black ink",
                        category_path=["office", "ink"],
                        available=True,
                    )
                ],
            ),
            metadata=suite.auth("service:catalog"),
            timeout=10,
        )
        created["recommendation"] = "ink-black"
    with grpc.insecure_channel(suite.address("replenishment")) as channel:
        registered = repl_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
            _device_request(), metadata=suite.auth("service:storefront"), timeout=10
        )
        assert registered.device_token
        created["replenishment"] = registered.device
        created["device_token"] = registered.device_token
    return created


def _read_everything(suite: Suite, created: dict[str, object]) -> None:
    with grpc.insecure_channel(suite.address("consent")) as channel:
        listed = consent_grpc.ConsentServiceStub(channel).ListDataCategories(
            consent_pb.ListDataCategoriesRequest(page_size=1000),
            metadata=suite.auth("service:profile"),
            timeout=10,
        )
        assert created["consent"] in list(listed.data_categories)
    with grpc.insecure_channel(suite.address("profile")) as channel:
        got = profile_grpc.ProfileServiceStub(channel).GetCustomer(
            profile_pb.GetCustomerRequest(customer_id="e2e-customer"), metadata=suite.auth(), timeout=10
        )
        assert got.customer.display_name == "Hana Sato" and got.customer.region == "JP-27"
    with grpc.insecure_channel(suite.address("recommendation")) as channel:
        item = rec_grpc.RecommendationServiceStub(channel).GetItem(
            rec_pb.GetItemRequest(item_id="ink-black"), metadata=suite.auth("service:storefront"), timeout=10
        )
        assert item.item.title == "Black ink" and list(item.item.category_path) == ["office", "ink"]
    with grpc.insecure_channel(suite.address("replenishment")) as channel:
        device = created["replenishment"]
        got_device = repl_grpc.ReplenishmentServiceStub(channel).GetDevice(
            repl_pb.GetDeviceRequest(device_id=device.device_id),  # type: ignore[attr-defined]
            metadata=suite.auth("service:storefront"),
            timeout=10,
        )
        assert got_device.device.serial_number == "SN-E2E-1"
        assert [s.slot_id for s in got_device.device.slots] == ["black"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage_suite(request, tmp_path):
    database_url = ""
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_cluster").create_database(
            f"e2e_{uuid.uuid4().hex[:12]}"
        )
    suite = Suite(tmp_path, database_url=database_url).start_all()
    yield suite
    suite.stop_all()


def test_each_service_keeps_its_data_across_a_restart(storage_suite: Suite):
    created = _create_everything(storage_suite)
    _read_everything(storage_suite, created)
    for name in ("consent", "profile", "recommendation", "replenishment"):
        storage_suite.restart(name)
    _read_everything(storage_suite, created)


def test_a_device_token_may_not_call_an_admin_rpc(storage_suite: Suite):
    created = _create_everything(storage_suite)
    device_auth = (("authorization", f"Bearer {created['device_token']}"),)
    with grpc.insecure_channel(storage_suite.address("replenishment")) as channel:
        stub = repl_grpc.ReplenishmentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.ListDevices(repl_pb.ListDevicesRequest(), metadata=device_auth, timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ListDevices(
                repl_pb.ListDevicesRequest(), metadata=(("authorization", "Bearer forged"),), timeout=10
            )
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
