"""A service refuses RPCs (not health or reflection) until its start-up work is done and
once it begins to stop, and every answer, refusals and denials included, is access-logged
and counted in the per-RPC metrics by code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from services.consent.app import build_app
from shared import metrics
from shared.interceptors import UNKNOWN_METHOD
from shared.server import RunningServer, create_server, start_app
from shared.settings import load_settings
from tests.conftest import error_reason, rpc_error

VERIFY = "/najimi.consent.v1.ConsentService/VerifyAuditLog"  # admin only


class GatedConsent:
    """A consent service in this process whose start-up work, and whose draining when it
    stops, each wait for the test to open a gate."""

    def __init__(self, running: RunningServer, start_gate: asyncio.Event, drain_gate: asyncio.Event):
        self.running = running
        self.start_gate = start_gate
        self.drain_gate = drain_gate
        self.draining = asyncio.Event()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = pb_grpc.ConsentServiceStub(self.channel)

    async def health(self) -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service="najimi.consent.v1.ConsentService"), timeout=5
        )
        return reply.status


@pytest.fixture
async def gated_consent(tmp_path: Path, dev_tokens: dict[str, str]) -> AsyncIterator[GatedConsent]:
    settings = load_settings("consent", data_dir=tmp_path, database_url="", metrics_port=0)
    app = build_app(settings)
    start_gate, drain_gate = asyncio.Event(), asyncio.Event()
    start, drain = app.start, app.drain
    assert start is not None and drain is not None

    async def gated_start() -> None:
        await start_gate.wait()
        await start()

    async def gated_drain() -> None:
        service.draining.set()
        await drain_gate.wait()
        await drain()

    app.start, app.drain = gated_start, gated_drain
    running = await create_server(settings, app, port=0)
    service = GatedConsent(running, start_gate, drain_gate)
    yield service
    start_gate.set()
    drain_gate.set()
    await service.channel.close()
    await running.stop(0)


def admin(tokens: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tokens['admin']}"),)


async def test_rpcs_wait_for_the_start_up_work_while_health_and_reflection_answer(gated_consent, dev_tokens):
    service = gated_consent
    starting = asyncio.create_task(start_app(service.running))
    assert await service.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    listed = [
        answer
        async for answer in reflection_pb2_grpc.ServerReflectionStub(service.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    ]
    assert "najimi.consent.v1.ConsentService" in {s.name for s in listed[0].list_services_response.service}
    for metadata in [admin(dev_tokens), ()]:  # refused before the caller is even looked at
        refused = await rpc_error(service.stub.ListPurposes(pb.ListPurposesRequest(), metadata=metadata))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(refused) == "NOT_READY" and "starting" in refused.details()
    assert not starting.done()

    service.start_gate.set()
    await asyncio.wait_for(starting, 10)
    assert await service.health() == health_pb2.HealthCheckResponse.SERVING
    assert (await service.stub.ListPurposes(pb.ListPurposesRequest(), metadata=admin(dev_tokens))).purposes


async def test_calls_arriving_while_the_service_stops_are_refused_cleanly(gated_consent, dev_tokens):
    service = gated_consent
    service.start_gate.set()
    await start_app(service.running)
    assert (await service.stub.ListPurposes(pb.ListPurposesRequest(), metadata=admin(dev_tokens))).purposes
    stopping = asyncio.create_task(service.running.stop(5))
    await asyncio.wait_for(service.draining.wait(), 10)
    assert await service.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    refused = await rpc_error(service.stub.ListPurposes(pb.ListPurposesRequest(), metadata=admin(dev_tokens)))
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and error_reason(refused) == "SHUTTING_DOWN"
    service.drain_gate.set()
    await asyncio.wait_for(stopping, 10)
    # Once the server has stopped, the port is closed: a retrying client goes elsewhere.
    after = await rpc_error(service.stub.ListPurposes(pb.ListPurposesRequest(), metadata=admin(dev_tokens)))
    assert after.code() == grpc.StatusCode.UNAVAILABLE


async def test_every_answer_is_logged_and_counted_by_code(gated_consent, dev_tokens):
    service = gated_consent
    stats = metrics.RPC_METRICS.stats("consent", "VerifyAuditLog")
    before = dict(stats.codes)
    verify = service.channel.unary_unary(VERIFY)  # raw bytes in and out
    starting = asyncio.create_task(start_app(service.running))
    calls = [
        ("UNAVAILABLE", b"", admin(dev_tokens)),  # not ready yet
        ("INVALID_ARGUMENT", b"\x00", admin(dev_tokens)),  # does not decode
        ("UNAUTHENTICATED", b"", ()),  # no token
        ("UNAUTHENTICATED", b"\x00", (("authorization", "Bearer not-a-token"),)),
        ("PERMISSION_DENIED", b"\x00", (("authorization", f"Bearer {dev_tokens['service:profile']}"),)),
        ("OK", b"", admin(dev_tokens)),
    ]
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logged:
        for position, (code, body, metadata) in enumerate(calls):
            if position == 1:
                service.start_gate.set()
                await asyncio.wait_for(starting, 10)
            try:
                await verify(body, metadata=metadata, timeout=5)
                answered = "OK"
            except grpc.aio.AioRpcError as error:
                answered = error.code().name
            assert answered == code, position

        # A method no service has: grpc's own answer, but logged and counted too.
        unknown = await rpc_error(
            service.channel.unary_unary("/najimi.consent.v1.ConsentService/NoSuchMethod")(b"", timeout=5)
        )
        assert unknown.code() == grpc.StatusCode.UNIMPLEMENTED and error_reason(unknown) == "UNKNOWN_METHOD"
    unknown_lines = [
        entry for entry in logged if entry.get("method") == "/najimi.consent.v1.ConsentService/NoSuchMethod"
    ]
    assert [line["code"] for line in unknown_lines] == ["UNIMPLEMENTED"]
    assert metrics.RPC_METRICS.stats("consent", UNKNOWN_METHOD).codes["UNIMPLEMENTED"] >= 1

    expected: dict[str, int] = {}
    for code, _, _ in calls:
        expected[code] = expected.get(code, 0) + 1
    assert {code: stats.codes.get(code, 0) - before.get(code, 0) for code in expected} == expected
    lines = [entry for entry in logged if entry.get("event") == "rpc" and entry.get("method") == VERIFY]
    assert [line["code"] for line in lines] == [code for code, _, _ in calls]
    for line in lines:
        # One structured line with these fields only: no request content, no token.
        assert set(line) <= {
            "event",
            "method",
            "code",
            "duration_ms",
            "peer",
            "request_id",
            "principal",
            "log_level",
            "logger_name",
        }
        assert line["request_id"] and line["duration_ms"] >= 0
    assert [line.get("principal") for line in lines] == [
        None,
        "admin",
        None,
        None,
        "service:profile",
        "admin",
    ]
    assert not any(token in str(entry) for entry in logged for token in dev_tokens.values())
