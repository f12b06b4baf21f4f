"""GetCustomer's cached answers follow every change: on one replica at once, and across
replicas of one PostgreSQL database through the change notices, even after the
listening connection was cut (services/profile/customer_cache.py, customer_changes.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, rpc_error

DEADLINE_SECONDS = 10.0
T = TypeVar("T")


async def create(stub, metadata, customer_id: str, region: str) -> pb.Customer:
    request = pb.CreateCustomerRequest(
        request_id=f"create-{customer_id}",
        customer_id=customer_id,
        customer=pb.Customer(display_name="Hanako Sato", region=region),
    )
    return (await stub.CreateCustomer(request, metadata=metadata)).customer


async def update_region(stub, metadata, customer_id: str, region: str) -> None:
    await stub.UpdateCustomer(
        pb.UpdateCustomerRequest(
            customer=pb.Customer(customer_id=customer_id, region=region),
            update_mask=field_mask_pb2.FieldMask(paths=["region"]),
        ),
        metadata=metadata,
    )


async def get(stub, metadata, customer_id: str) -> pb.Customer:
    return (
        await stub.GetCustomer(pb.GetCustomerRequest(customer_id=customer_id), metadata=metadata)
    ).customer


async def eventually(probe: Callable[[], Awaitable[T]], satisfied: Callable[[T], bool]) -> T:
    """Probes until `satisfied` (what another replica or connection does is asynchronous),
    at most DEADLINE_SECONDS; returns the last value probed."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        value = await probe()
        if satisfied(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def until_region(stub, metadata, customer_id: str, region: str) -> pb.Customer:
    return await eventually(lambda: get(stub, metadata, customer_id), lambda found: found.region == region)


async def test_a_masked_read_follows_every_change_on_the_same_replica(start_service, database_url):
    service = await start_service("profile", database_url)
    stub = pb_grpc.ProfileServiceStub(service.channel)
    admin, storefront = service.auth("admin"), service.auth("service:storefront")
    await create(stub, admin, "cus-target", "JP-13")
    await create(stub, admin, "cus-source", "JP-27")
    first = await get(stub, storefront, "cus-target")
    assert (first.region, first.display_name) == ("JP-13", "H*** S***")
    assert await get(stub, storefront, "cus-target") == first  # kept, and the same
    assert (await get(stub, storefront, "cus-source")).region == "JP-27"

    await update_region(stub, storefront, "cus-target", "JP-01")
    updated = await get(stub, storefront, "cus-target")
    assert updated.region == "JP-01" and updated.etag != first.etag

    await stub.LinkIdentity(
        pb.LinkIdentityRequest(
            request_id="link-1",
            customer_id="cus-target",
            identifier=pb.Identifier(type=pb.IDENTIFIER_TYPE_COOKIE_ID, value="cookie-1"),
        ),
        metadata=admin,
    )
    linked = await get(stub, storefront, "cus-target")
    assert linked.update_time.ToMicroseconds() > updated.update_time.ToMicroseconds()

    await stub.MergeCustomers(
        pb.MergeCustomersRequest(
            request_id="merge-1", source_customer_id="cus-source", target_customer_id="cus-target"
        ),
        metadata=admin,
    )
    assert list((await get(stub, storefront, "cus-target")).merged_from) == ["cus-source"]
    assert (await get(stub, storefront, "cus-source")).merged_into == "cus-target"

    # Erasing the alias removes it from its target's merged_from, and its own answer.
    await privacy_grpc.DataSubjectServiceStub(service.channel).EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="cus-source", request_id="erase-1"),
        metadata=service.auth("service:consent"),
    )
    assert list((await get(stub, storefront, "cus-target")).merged_from) == []
    error = await rpc_error(get(stub, storefront, "cus-source"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "CUSTOMER_ERASED"


def listening_backends(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        ).fetchall()
    return [pid for (pid,) in rows]


async def listening(url: str, excluding: set[int], replicas: int) -> list[int]:
    """Waits until `replicas` listening connections, none of them in `excluding`, are up."""

    async def probe() -> list[int]:
        return [pid for pid in await asyncio.to_thread(listening_backends, url) if pid not in excluding]

    return await eventually(probe, lambda found: len(found) >= replicas)


@pytest.mark.postgres
async def test_replicas_see_each_others_changes_even_after_losing_the_notices(
    start_service, postgres_cluster
):
    url = postgres_cluster.create_database("t_customer_cache")
    writer = await start_service("profile", url)
    reader = await start_service("profile", url)
    writer_stub, reader_stub = (
        pb_grpc.ProfileServiceStub(writer.channel),
        pb_grpc.ProfileServiceStub(reader.channel),
    )
    admin, storefront = writer.auth("admin"), writer.auth("service:storefront")
    listeners = await listening(url, set(), 2)
    assert len(listeners) == 2  # one per replica

    await create(writer_stub, admin, "cus-1", "JP-13")
    assert (await get(reader_stub, storefront, "cus-1")).region == "JP-13"  # now kept by the reader
    await update_region(writer_stub, storefront, "cus-1", "JP-01")
    assert (await until_region(reader_stub, storefront, "cus-1", "JP-01")).region == "JP-01"

    # Cut the listening connections: a change committed while nobody listens is never
    # announced, so the reader must not go on answering from what it kept before.
    assert (await get(reader_stub, storefront, "cus-1")).region == "JP-01"
    with psycopg.connect(url, autocommit=True) as connection:
        for pid in listeners:
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    gone = set(listeners)
    await eventually(lambda: asyncio.to_thread(listening_backends, url), lambda found: not gone & set(found))
    await update_region(writer_stub, storefront, "cus-1", "JP-47")
    assert (await until_region(reader_stub, storefront, "cus-1", "JP-47")).region == "JP-47"

    # The replicas listen again, and notices work as before.
    assert len(await listening(url, gone, 2)) == 2
    assert (await get(reader_stub, storefront, "cus-1")).region == "JP-47"
    await update_region(writer_stub, storefront, "cus-1", "JP-40")
    assert (await until_region(reader_stub, storefront, "cus-1", "JP-40")).region == "JP-40"
