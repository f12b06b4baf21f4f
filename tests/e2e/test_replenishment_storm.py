"""Exactly once under a storm: 50 device clients, retries, and a SIGKILL mid-storm.

Fifty concurrent clients call `Replenish` and `ReportTelemetry` for ONE slot of one
device, on the real service process (SQLite and PostgreSQL). Request ids and reading
ids are drawn from shared pools, so many calls are retries of others (also across
clients), and every call that gets no answer (the process is gone) is retried with the
same ids until it gets one. Once the storm is under way the replenishment process is
killed with SIGKILL and started again. Afterwards:

- exactly one order exists for the slot, and it is open;
- every reading any client saw acknowledged (ACCEPTED or DUPLICATE) is stored;
- every answer to one request_id is the same answer (the first one, stored with it);
- a request_id reused for a different request is INVALID_ARGUMENT REQUEST_ID_REUSED.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from services.replenishment.store import orders, readings
from shared.db import Database, now_micros
from tests.conftest import error_reason
from tests.e2e.conftest import Suite

CLIENTS = 50
CALLS_PER_CLIENT = 12  # half Replenish, half ReportTelemetry
KILL_AFTER_ANSWERS = 150
CUSTOMER = "cus-storm"
PURPOSE = "replenishment.automatic_ordering"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storm_suite(request, tmp_path) -> Iterator[Suite]:
    database_url = ""
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_cluster").create_database(
            f"storm_{uuid.uuid4().hex[:12]}"
        )
    suite = Suite(
        tmp_path,
        database_url=database_url,
        extra_env={
            "NAJIMI_REPLENISHMENT_TELEMETRY_READINGS_PER_SECOND": "100000",
            "NAJIMI_ACCESS_LOG": "false",
        },
    )
    suite.start("consent")
    suite.start("replenishment")
    yield suite
    suite.stop_all()


def _stamp(micros: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


async def _setup(suite: Suite) -> tuple[str, str]:
    """A device with two AUTO slots, its token, and the customer's consent (seen by the service)."""
    async with grpc.aio.insecure_channel(suite.address("consent")) as channel:
        await consent_grpc.ConsentServiceStub(channel).GrantConsent(
            consent_pb.GrantConsentRequest(
                customer_id=CUSTOMER,
                purpose=PURPOSE,
                data_categories=["user.device.telemetry"],
                notice_version=1,
                collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
                jurisdiction="DE",
                request_id="grant",
            ),
            metadata=suite.auth("service:storefront"),
            timeout=10,
        )
    slot = dict(
        item_id="ink",
        capacity=100.0,
        unit="ml",
        unit_price_micros=10_000_000,
        currency_code="EUR",
        policy=pb.SLOT_POLICY_AUTO,
        lead_time=duration_pb2.Duration(seconds=3 * 86_400),
    )
    async with grpc.aio.insecure_channel(suite.address("replenishment")) as channel:
        registered = await pb_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
            pb.RegisterDeviceRequest(
                request_id="reg",
                customer_id=CUSTOMER,
                manufacturer="acme",
                model="inkjet",
                kind="printer",
                serial_number="SN-STORM",
                slots=[pb.Slot(slot_id="black", **slot), pb.Slot(slot_id="probe", **slot)],  # type: ignore[arg-type]
            ),
            metadata=suite.auth("service:storefront"),
            timeout=10,
        )
        device_id = registered.device.device_id
        token = registered.device_token
        # The grant travels to the service's consent cache: probe on the other slot.
        devices = device_grpc.DeviceServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = await devices.Replenish(
                    device_pb.ReplenishRequest(
                        request_id=f"probe-{time.monotonic_ns()}", device_id=device_id, slot_id="probe"
                    ),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
                if answer.outcome.outcome != device_pb.REPLENISH_OUTCOME_CONSENT_REQUIRED:
                    break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert time.monotonic() < deadline, "the consent grant never reached the replenishment service"
            await asyncio.sleep(0.05)
    return device_id, token


class Storm:
    def __init__(self, suite: Suite, device_id: str, token: str):
        self.suite = suite
        self.device_id = device_id
        self.auth = (("authorization", f"Bearer {token}"),)
        self.answers: dict[str, list[bytes]] = defaultdict(list)  # request_id -> every answer
        self.acknowledged: set[str] = set()
        self.answered = 0
        self.retries = 0
        self.storm_under_way = asyncio.Event()  # KILL_AFTER_ANSWERS answers were received
        self.killed = asyncio.Event()
        self.restarted = asyncio.Event()
        self.start_us = now_micros()

    async def call(self, make_call) -> object:
        """Calls until answered: the same request again after UNAVAILABLE (the process is gone)."""
        while True:
            address = self.suite.address("replenishment")
            async with grpc.aio.insecure_channel(address) as channel:
                try:
                    answer = await make_call(channel)
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                    self.retries += 1
                    await asyncio.sleep(0.05 + random.random() * 0.1)
                    continue
            self.answered += 1
            if self.answered >= KILL_AFTER_ANSWERS:
                self.storm_under_way.set()
            return answer

    async def replenish(self, request_id: str) -> None:
        request = device_pb.ReplenishRequest(request_id=request_id, device_id=self.device_id, slot_id="black")
        answer = await self.call(
            lambda channel: device_grpc.DeviceServiceStub(channel).Replenish(
                request, metadata=self.auth, timeout=10
            )
        )
        self.answers[request_id].append(answer.SerializeToString())  # type: ignore[attr-defined]

    async def report(self, reading_ids: list[str]) -> None:
        batch = [
            device_pb.Reading(
                reading_id=reading_id,
                slot_id="black",
                level=8.0 + (hash(reading_id) % 400) / 100,  # 8 to 12 ml of 100: due, no refill
                measure_time=_stamp(self.start_us - (hash(reading_id) % 3_600) * 1_000_000),
            )
            for reading_id in reading_ids
        ]
        request = device_pb.ReportTelemetryRequest(device_id=self.device_id, readings=batch)
        answer = await self.call(
            lambda channel: device_grpc.DeviceServiceStub(channel).ReportTelemetry(
                request, metadata=self.auth, timeout=10
            )
        )
        for result in answer.results:  # type: ignore[attr-defined]
            if result.status in (device_pb.READING_STATUS_ACCEPTED, device_pb.READING_STATUS_DUPLICATE):
                self.acknowledged.add(result.reading_id)

    async def client(self, number: int) -> None:
        rng = random.Random(number)
        for call in range(CALLS_PER_CLIENT):
            if call % 2 == 0:
                # 20 request ids shared by 50 clients: most calls repeat another's request.
                await self.replenish(f"rq-{rng.randrange(20)}")
            else:
                # Reading ids from a pool too: some are sent by several clients.
                await self.report([f"rd-{rng.randrange(400)}" for _ in range(5)])

    async def killer(self) -> None:
        await self.storm_under_way.wait()
        self.suite.processes["replenishment"].kill()  # SIGKILL: no graceful stop
        self.killed.set()
        await asyncio.to_thread(self.suite.start, "replenishment")
        self.restarted.set()


def _stored(suite: Suite, device_id: str) -> tuple[list[sa.Row], set[str]]:
    url = suite.database_url or f"sqlite:///{suite.data_dir / 'replenishment.db'}"
    database = Database(url, "replenishment")
    try:
        return database.transaction(
            lambda c: (
                list(
                    c.execute(
                        sa.select(orders).where(orders.c.device_id == device_id, orders.c.slot_id == "black")
                    ).all()
                ),
                set(
                    c.execute(
                        sa.select(readings.c.reading_id).where(readings.c.device_id == device_id)
                    ).scalars()
                ),
            )
        )
    finally:
        database.close()


async def _storm(suite: Suite) -> tuple[Storm, str]:
    device_id, token = await _setup(suite)
    storm = Storm(suite, device_id, token)
    killer = asyncio.create_task(storm.killer())
    started = time.monotonic()
    await asyncio.gather(*(storm.client(n) for n in range(CLIENTS)))
    await killer
    print(
        f"storm: {CLIENTS} clients, {storm.answered} answers, {storm.retries} retried calls, "
        f"{time.monotonic() - started:.1f} s with one SIGKILL and restart"
    )
    return storm, device_id


def test_a_storm_with_a_sigkill_orders_exactly_once_and_keeps_every_acknowledged_reading(storm_suite):
    storm, device_id = asyncio.run(_storm(storm_suite))
    assert storm.killed.is_set() and storm.restarted.is_set()
    assert storm.retries > 0, "the kill interrupted no call: the test proved nothing"
    stored_orders, stored_readings = _stored(storm_suite, device_id)
    assert len(stored_orders) == 1, [(o.order_id, o.state, o.order_trigger) for o in stored_orders]
    assert stored_orders[0].state == "PENDING"
    assert storm.acknowledged and storm.acknowledged <= stored_readings
    # Every answer to one request id is the same (the first, stored with the request).
    for request_id, answers in storm.answers.items():
        assert len(set(answers)) == 1, request_id
    outcomes = {device_pb.ReplenishResponse.FromString(a[0]).outcome.outcome for a in storm.answers.values()}
    assert outcomes <= {
        device_pb.REPLENISH_OUTCOME_ORDER_PLACED,
        device_pb.REPLENISH_OUTCOME_ORDER_IN_PROGRESS,
    }
    # The same request_id for another request is refused.
    reused = next(iter(storm.answers))

    async def reuse() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(storm_suite.address("replenishment")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await device_grpc.DeviceServiceStub(channel).Replenish(
                    device_pb.ReplenishRequest(request_id=reused, device_id=device_id, slot_id="probe"),
                    metadata=storm.auth,
                    timeout=10,
                )
            return caught.value

    error = asyncio.run(reuse())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
