"""The four services as real processes: health, reflection, authentication, metrics, stop."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc

from shared.processes import ServiceProcess
from tests.e2e.conftest import Suite
from tests.postgres import free_port

SERVICES = {
    "consent": ["najimi.consent.v1.ConsentService", "najimi.privacy.v1.DataSubjectService"],
    "profile": ["najimi.profile.v1.ProfileService", "najimi.privacy.v1.DataSubjectService"],
    "recommendation": [
        "najimi.recommendation.v1.RecommendationService",
        "najimi.privacy.v1.DataSubjectService",
    ],
    "replenishment": [
        "najimi.replenishment.v1.ReplenishmentService",
        "najimi.replenishment.device.v1.DeviceService",
        "najimi.privacy.v1.DataSubjectService",
    ],
}


def test_health_is_serving_for_every_service_name(suite: Suite):
    for name, services in SERVICES.items():
        with grpc.insecure_channel(suite.address(name)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ["", *services]:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
            with pytest.raises(grpc.RpcError) as unknown:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service_and_resolves_a_method(suite: Suite):
    for name, services in SERVICES.items():
        with grpc.insecure_channel(suite.address(name)) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            listed = set(database.get_services())
            assert set(services) <= listed, name
            assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
            pool = descriptor_pool.DescriptorPool(database)
            for service in services:
                descriptor = pool.FindServiceByName(service)
                assert descriptor.methods, service
                method = pool.FindMethodByName(f"{service}.{descriptor.methods[0].name}")
                assert method.input_type.full_name.endswith("Request")


def test_missing_or_wrong_token_is_unauthenticated(suite: Suite):
    with grpc.insecure_channel(suite.address("consent")) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)
        for metadata in [(), (("authorization", "Bearer not-a-token"),), (("authorization", "Basic abc"),)]:
            with pytest.raises(grpc.RpcError) as denied:
                stub.ListPurposes(consent_pb.ListPurposesRequest(), metadata=metadata, timeout=5)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ListPurposes(consent_pb.ListPurposesRequest(), metadata=suite.auth(), timeout=5).purposes


def test_access_log_is_json_and_carries_no_token(suite: Suite):
    with grpc.insecure_channel(suite.address("consent")) as channel:
        consent_grpc.ConsentServiceStub(channel).ListDataCategories(
            consent_pb.ListDataCategoriesRequest(), metadata=suite.auth("service:profile"), timeout=5
        )
    process = suite.processes["consent"]
    # The call has returned, but its access-log line may not have been read from the child yet.
    assert process.wait_for_line(lambda line: '"rpc"' in line and "/ListDataCategories" in line)
    lines = process.lines
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert entries and len(entries) == len([line for line in lines if line.strip()])
    calls = [e for e in entries if e.get("event") == "rpc" and e["method"].endswith("/ListDataCategories")]
    assert calls and calls[-1]["code"] == "OK" and calls[-1]["principal"] == "service:profile"
    assert calls[-1]["request_id"]
    assert not any(token in line for line in lines for token in suite.tokens.values())


def test_metrics_endpoint_counts_rpcs(tmp_path):
    suite = Suite(tmp_path)
    metrics_port = free_port()
    process = suite.start("consent", NAJIMI_METRICS_PORT=str(metrics_port))
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = consent_grpc.ConsentServiceStub(channel)
            for _ in range(3):
                stub.ListPurposes(consent_pb.ListPurposesRequest(), metadata=suite.auth(), timeout=5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        counted = [
            line
            for line in text.splitlines()
            if line.startswith("najimi_rpc_requests_total{") and 'method="ListPurposes"' in line
        ]
        assert counted and float(counted[0].split()[-1]) == 3.0
        assert 'najimi_rpc_duration_seconds_count{method="ListPurposes",service="consent"} 3.0' in text
    finally:
        assert process.terminate() == 0


def test_sigterm_turns_health_not_serving_then_exits_zero(tmp_path):
    suite = Suite(tmp_path, extra_env={"NAJIMI_GRACE_SECONDS": "3"})
    process = suite.start("consent")
    with grpc.insecure_channel(process.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        statuses = iter(watch)
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        process.process.send_signal(signal.SIGTERM)
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    assert process.process.wait(timeout=3 + 5) == 0


def test_invalid_configuration_stops_the_process_naming_the_variable(tmp_path):
    suite = Suite(tmp_path)
    process = ServiceProcess(
        "consent", {**suite.env_for("consent"), "NAJIMI_PORT": "not-a-port"}, tmp_path / "x.log"
    )
    assert process.process.wait(timeout=60) == 2
    process.terminate()
    assert any("NAJIMI_PORT" in line for line in process.lines)


def test_sigterm_ends_watch_streams_instead_of_waiting_out_the_grace_period(tmp_path):
    suite = Suite(tmp_path, extra_env={"NAJIMI_GRACE_SECONDS": "30"})
    process = suite.start("consent")
    with grpc.insecure_channel(process.address) as channel:
        watch = consent_grpc.ConsentServiceStub(channel).WatchConsentChanges(
            consent_pb.WatchConsentChangesRequest(), metadata=suite.auth("service:profile"), timeout=60
        )
        messages = iter(watch)
        assert next(messages).HasField("heartbeat")  # the replay is done: the watch is live
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        assert list(messages) == [] and watch.code() == grpc.StatusCode.OK  # ended, not cut off
    assert process.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 10  # well inside the 30 s grace period
