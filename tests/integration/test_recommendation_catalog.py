"""The recommendation catalog (UpsertItems, GetItem, ListItems) through a real in-process
gRPC server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, field_violations, rpc_error

CATALOG = "service:catalog"
CREATED = pb.UPSERT_ITEM_OUTCOME_CREATED
UPDATED = pb.UPSERT_ITEM_OUTCOME_UPDATED
UNCHANGED = pb.UPSERT_ITEM_OUTCOME_UNCHANGED


def beans(**changes: object) -> pb.Item:
    fields: dict[str, object] = dict(
        item_id="sku-beans-1",
        title="Single-origin coffee beans",
        category_path=["grocery", "coffee", "beans"],
        brand="acme",
        price_micros=12_500_000,
        currency_code="EUR",
        tags=["organic", "fair-trade"],
        available=True,
        attributes={"size": "250g", "roast": "medium"},
    )
    fields.update(changes)
    return pb.Item(**fields)  # type: ignore[arg-type]


def content(item: pb.Item) -> pb.Item:
    """The item without its output-only times."""
    copy = pb.Item()
    copy.CopyFrom(item)
    copy.ClearField("create_time")
    copy.ClearField("update_time")
    return copy


async def upsert(stub, service, request_id: str, *items: pb.Item, principal: str = CATALOG):
    return await stub.UpsertItems(
        pb.UpsertItemsRequest(request_id=request_id, items=list(items)), metadata=service.auth(principal)
    )


async def get(stub, service, item_id: str) -> pb.Item:
    return (await stub.GetItem(pb.GetItemRequest(item_id=item_id), metadata=service.auth(CATALOG))).item


async def test_upsert_creates_updates_and_leaves_unchanged(start_service, database_url):
    service = await start_service("recommendation", database_url)
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    filter_item = pb.Item(
        item_id="sku-filter-2", title="Water filter", category_path=["home"], available=True
    )
    first = await upsert(stub, service, "batch-1", beans(), filter_item)
    assert [(r.item_id, r.outcome) for r in first.results] == [
        ("sku-beans-1", CREATED),
        ("sku-filter-2", CREATED),
    ]

    stored = await get(stub, service, "sku-beans-1")
    assert content(stored) == beans()
    assert stored.create_time == stored.update_time == first.results[0].update_time
    assert stored.create_time.seconds > 0

    # Fully replaced as sent: fields left empty become empty; attribute order does not matter.
    changed = pb.Item(item_id="sku-beans-1", title="Coffee beans", available=False)
    same_filter = pb.Item()
    same_filter.CopyFrom(filter_item)
    new = pb.Item(item_id="sku-beans-0", title="Decaf beans", category_path=["grocery", "coffee"])
    second = await upsert(stub, service, "batch-2", changed, same_filter, new)
    assert [(r.item_id, r.outcome) for r in second.results] == [
        ("sku-beans-1", UPDATED),
        ("sku-filter-2", UNCHANGED),
        ("sku-beans-0", CREATED),
    ]
    updated = await get(stub, service, "sku-beans-1")
    assert content(updated) == changed
    assert updated.create_time == stored.create_time
    assert updated.update_time.ToMicroseconds() > stored.update_time.ToMicroseconds()
    assert second.results[0].update_time == updated.update_time
    # UNCHANGED leaves update_time as it was and reports it.
    assert second.results[1].update_time == first.results[1].update_time
    assert (await get(stub, service, "sku-filter-2")).update_time == first.results[1].update_time

    # A case change of a tag or a reordering of tags is a change of what GetItem returns.
    await upsert(stub, service, "batch-3", beans())
    third = await upsert(stub, service, "batch-4", beans(tags=["fair-trade", "Organic"]), beans(item_id="x"))
    assert [r.outcome for r in third.results] == [UPDATED, CREATED]
    fourth = await upsert(stub, service, "batch-5", beans(tags=["fair-trade", "Organic"]))
    assert fourth.results[0].outcome == UNCHANGED


async def test_a_retry_with_the_same_request_id_returns_the_first_result(start_service, database_url):
    service = await start_service("recommendation", database_url)
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    first = await upsert(stub, service, "feed-2026-01-01T00:00", beans())
    retry = await upsert(stub, service, "feed-2026-01-01T00:00", beans())
    assert retry == first and retry.results[0].outcome == CREATED
    # A changed payload under a used id is refused, and writes nothing.
    error = await rpc_error(upsert(stub, service, "feed-2026-01-01T00:00", beans(title="Other title")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
    assert "request_id" in field_violations(error)
    assert (await get(stub, service, "sku-beans-1")).title == beans().title
    # A new id is a new call.
    again = await upsert(stub, service, "feed-2026-01-02T00:00", beans())
    assert again.results[0].outcome == UNCHANGED
    # Request ids belong to the caller: admin's "feed-2026-01-01T00:00" is another call.
    admins = await upsert(stub, service, "feed-2026-01-01T00:00", beans(title="Renamed"), principal="admin")
    assert admins.results[0].outcome == UPDATED


async def test_concurrent_batches_neither_fail_nor_create_twice(start_service, database_url):
    service = await start_service("recommendation", database_url)
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    batch = [beans(item_id=f"sku-{n:03d}") for n in range(50)]
    different_ids = await asyncio.gather(*(upsert(stub, service, f"race-{n}", *batch) for n in range(6)))
    outcomes = sorted(tuple(r.outcome for r in response.results) for response in different_ids)
    assert outcomes == [(CREATED,) * 50] + [(UNCHANGED,) * 50] * 5
    fresh = [beans(item_id=f"new-{n:03d}") for n in range(50)]
    same_id = await asyncio.gather(*(upsert(stub, service, "one-id", *fresh) for _ in range(6)))
    assert all(response == same_id[0] for response in same_id)
    assert {r.outcome for r in same_id[0].results} == {CREATED}


async def test_the_catalog_survives_a_restart(start_service, database_url):
    first = await start_service("recommendation", database_url)
    stub = pb_grpc.RecommendationServiceStub(first.channel)
    written = await upsert(stub, first, "before-restart", beans())
    before = await get(stub, first, "sku-beans-1")
    await first.running.stop(0)

    second = await start_service("recommendation", database_url)
    stub = pb_grpc.RecommendationServiceStub(second.channel)
    assert await get(stub, second, "sku-beans-1") == before
    assert await upsert(stub, second, "before-restart", beans()) == written
    assert (await upsert(stub, second, "after-restart", beans())).results[0].outcome == UNCHANGED


async def test_list_items_pages_by_id_and_filters_by_category_and_availability(start_service, database_url):
    service = await start_service("recommendation", database_url)
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    paths = {
        "a-beans": (["grocery", "coffee", "beans"], True),
        "b-coffee": (["grocery", "coffee"], False),
        "c-machine": (["grocery", "coffee-machines"], True),
        "d-home": (["home"], True),
        "e-none": ([], True),
        "f-ground": (["grocery", "coffee", "ground"], True),
        "g-upper": (["Grocery", "coffee"], True),
    }
    await upsert(
        stub,
        service,
        "seed",
        *(pb.Item(item_id=i, title=i, category_path=p, available=a) for i, (p, a) in paths.items()),
    )

    async def list_all(**filters: object) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            page = await stub.ListItems(
                pb.ListItemsRequest(page_size=2, page_token=token, **filters),  # type: ignore[arg-type]
                metadata=service.auth("service:storefront"),
            )
            assert 0 < len(page.items) <= 2
            ids += [item.item_id for item in page.items]
            token = page.next_page_token
            if not token:
                return ids

    assert await list_all() == sorted(paths)
    assert await list_all(category_prefix="grocery/coffee") == ["a-beans", "b-coffee", "f-ground"]
    assert await list_all(category_prefix="grocery/coffee", available_only=True) == ["a-beans", "f-ground"]
    assert await list_all(category_prefix="grocery") == ["a-beans", "b-coffee", "c-machine", "f-ground"]
    assert await list_all(category_prefix="Grocery") == ["g-upper"]
    assert await list_all(available_only=True) == sorted(set(paths) - {"b-coffee"})
    empty = await stub.ListItems(pb.ListItemsRequest(category_prefix="toys"), metadata=service.auth())
    assert list(empty.items) == [] and empty.next_page_token == ""

    # A full last page says so: no token pointing at an empty page.
    everything = await stub.ListItems(pb.ListItemsRequest(page_size=len(paths)), metadata=service.auth())
    assert len(everything.items) == len(paths) and everything.next_page_token == ""
    assert everything.items[0] == await get(stub, service, "a-beans")

    # A token is bound to the filters it was issued for.
    first = await stub.ListItems(pb.ListItemsRequest(page_size=1), metadata=service.auth())
    error = await rpc_error(
        stub.ListItems(
            pb.ListItemsRequest(page_size=1, page_token=first.next_page_token, available_only=True),
            metadata=service.auth(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "INVALID_PAGE_TOKEN" and "page_token" in field_violations(error)


async def test_a_page_too_large_for_one_message_is_split(start_service, database_url):
    service = await start_service("recommendation", database_url, max_message_bytes=64 * 1024)
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    big = {f"k{n:02d}": "v" * 1024 for n in range(10)}  # about 10 KiB per item
    for batch in range(4):  # requests are bound by the same limit
        await upsert(
            stub,
            service,
            f"big-{batch}",
            *(
                pb.Item(item_id=f"big-{n:02d}", title="t", attributes=big)
                for n in range(batch * 3, batch * 3 + 3)
            ),
        )
    ids: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListItems(
            pb.ListItemsRequest(page_size=1000, page_token=token), metadata=service.auth()
        )
        assert page.ByteSize() <= 64 * 1024
        ids += [item.item_id for item in page.items]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert ids == [f"big-{n:02d}" for n in range(12)] and pages > 1


async def test_an_unknown_item_is_not_found(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    error = await rpc_error(stub.GetItem(pb.GetItemRequest(item_id="no-such-item"), metadata=service.auth()))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "ITEM_NOT_FOUND"


LONG = "x" * 300

BAD_UPSERTS = [
    (dict(request_id=""), "request_id"),
    (dict(request_id="has space"), "request_id"),
    (dict(request_id="r" * 65), "request_id"),
    (dict(items=[]), "items"),
    (dict(items=[beans(item_id=f"i{n}") for n in range(1001)]), "items"),
    (dict(items=[beans(), beans(title="same id")]), "items[1].item_id"),
    (dict(items=[beans(item_id="")]), "items[0].item_id"),
    (dict(items=[beans(item_id="white space")]), "items[0].item_id"),
    (dict(items=[beans(item_id="i" * 129)]), "items[0].item_id"),
    (dict(items=[beans(title="")]), "items[0].title"),
    (dict(items=[beans(title="   ")]), "items[0].title"),
    (dict(items=[beans(title="t" * 257)]), "items[0].title"),
    (dict(items=[beans(title="nul\x00byte")]), "items[0].title"),
    (dict(items=[beans(category_path=[str(n) for n in range(9)])]), "items[0].category_path"),
    (dict(items=[beans(category_path=["grocery", ""])]), "items[0].category_path[1]"),
    (dict(items=[beans(category_path=["grocery/coffee"])]), "items[0].category_path[0]"),
    (dict(items=[beans(category_path=["c" * 129])]), "items[0].category_path[0]"),
    (dict(items=[beans(brand="b" * 129)]), "items[0].brand"),
    (dict(items=[beans(price_micros=-1)]), "items[0].price_micros"),
    (dict(items=[beans(currency_code="")]), "items[0].currency_code"),
    (dict(items=[beans(currency_code="eur")]), "items[0].currency_code"),
    (dict(items=[beans(currency_code="EURO")]), "items[0].currency_code"),
    (dict(items=[beans(tags=[f"t{n}" for n in range(33)])]), "items[0].tags"),
    (dict(items=[beans(tags=[""])]), "items[0].tags[0]"),
    (dict(items=[beans(tags=["ok", "t" * 65])]), "items[0].tags[1]"),
    (dict(items=[beans(tags=["Organic", "organic"])]), "items[0].tags[1]"),
    (dict(items=[beans(attributes={f"k{n}": "v" for n in range(65)})]), "items[0].attributes"),
    (dict(items=[beans(attributes={"": "v"})]), "items[0].attributes"),
    (dict(items=[beans(attributes={"k" * 65: "v"})]), "items[0].attributes"),
    (dict(items=[beans(attributes={"size": "v" * 1025})]), 'items[0].attributes["size"]'),
]


@pytest.mark.parametrize(("fields", "field"), BAD_UPSERTS, ids=[f for _, f in BAD_UPSERTS])
async def test_bad_upserts_are_invalid_argument_naming_the_field_and_write_nothing(
    start_service, fields, field
):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    request = pb.UpsertItemsRequest(request_id="bad", items=[pb.Item(item_id="good", title="Good")])
    for name, value in fields.items():
        request.ClearField(name)
        if name == "items":
            request.items.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    error = await rpc_error(stub.UpsertItems(request, metadata=service.auth(CATALOG)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error), field_violations(error)
    listed = await stub.ListItems(pb.ListItemsRequest(), metadata=service.auth())
    assert list(listed.items) == []


async def test_every_fault_of_a_batch_is_named_and_nothing_is_written(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    error = await rpc_error(
        upsert(
            stub,
            service,
            "mixed",
            beans(item_id="fine"),
            beans(item_id="bad", title="", price_micros=-5, tags=["a", "A"]),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"items[1].title", "items[1].price_micros", "items[1].tags[1]"} <= set(field_violations(error))
    assert not any(f.startswith("items[0]") for f in field_violations(error))
    missing = await rpc_error(stub.GetItem(pb.GetItemRequest(item_id="fine"), metadata=service.auth()))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_a_batch_with_faults_everywhere_still_gets_a_readable_invalid_argument(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    items = [pb.Item(item_id=f"i{n}", title="", price_micros=-1, currency_code="eu") for n in range(1000)]
    error = await rpc_error(upsert(stub, service, "all-bad", *items))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert "items[0].title" in violations and "more violations" in violations["items"]


@pytest.mark.parametrize(
    ("request_", "field", "reason"),
    [
        (pb.ListItemsRequest(page_size=-1), "page_size", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(page_size=1001), "page_size", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(category_prefix="grocery//coffee"), "category_prefix", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(category_prefix="/grocery"), "category_prefix", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(category_prefix="grocery/"), "category_prefix", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(category_prefix="/".join("abcdefghi")), "category_prefix", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(category_prefix="c" * 129), "category_prefix", "INVALID_ARGUMENT"),
        (pb.ListItemsRequest(page_token="not-a-token"), "page_token", "INVALID_PAGE_TOKEN"),
        (pb.ListItemsRequest(page_token="e30="), "page_token", "INVALID_PAGE_TOKEN"),
    ],
)
async def test_bad_list_requests_are_invalid_argument_naming_the_field(
    start_service, request_, field, reason
):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    error = await rpc_error(stub.ListItems(request_, metadata=service.auth()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error) and error_reason(error) == reason


@pytest.mark.parametrize("item_id", ["", "white space", "i" * 129, "slash/id"])
async def test_bad_item_ids_are_invalid_argument(start_service, item_id):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    error = await rpc_error(stub.GetItem(pb.GetItemRequest(item_id=item_id), metadata=service.auth()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in field_violations(error)
