"""The benches' load generator (bench/measure.py) never counts an error as served.

h2load sees HTTP 200 for a gRPC error too, so a round must be refused when the server
answered any call with an error: caught by the server's per-RPC counts for a counted
method, by the reply bytes for health (which the metrics do not count).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess
from tests.postgres import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import measure  # bench/ is a folder of scripts, not a package

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None, reason=measure.H2LOAD_INSTALL)

CUSTOMER = "bench-test-1"
RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
CHECK_PATH = "/najimi.consent.v1.ConsentService/CheckConsent"


@pytest.fixture(scope="module")
def consent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A consent service process with a metrics port, one customer granted RECS."""
    data_dir = tmp_path_factory.mktemp("bench-generator")
    tokens = ensure_dev_tokens(data_dir)
    metrics_port = free_port()
    server = ServiceProcess(
        "consent",
        {
            "NAJIMI_DATA_DIR": str(data_dir),
            "NAJIMI_PORT": "0",
            "NAJIMI_METRICS_PORT": str(metrics_port),
            "NAJIMI_ACCESS_LOG": "false",
            "NAJIMI_SERVICE_TOKEN": tokens["service:consent"],
        },
        data_dir / "consent.log",
    )
    try:
        server.wait_serving()
        token = tokens["service:storefront"]
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.ConsentServiceStub(channel).GrantConsent(
                pb.GrantConsentRequest(
                    customer_id=CUSTOMER,
                    purpose=RECS,
                    data_categories=[PURCHASES],
                    notice_version=1,
                    collection_method=pb.COLLECTION_METHOD_WEB_FORM,
                    jurisdiction="JP",
                    request_id="bench-test-grant",
                ),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
            generator = measure.Generator(
                server.address, server.process.pid, metrics_port, None, data_dir, connections=2, streams=8
            )
            yield {"channel": channel, "token": token, "generator": generator, "metrics_port": metrics_port}
    finally:
        assert server.terminate() == 0


def check_kind(consent: dict[str, Any], request: pb.CheckConsentRequest, same_reply: bool = True) -> Any:
    """A CheckConsent kind whose probe always asks the valid question (and is answered OK)."""
    stub = pb_grpc.ConsentServiceStub(consent["channel"])
    valid = pb.CheckConsentRequest(customer_id=CUSTOMER, purpose=RECS, data_categories=[PURCHASES])
    metadata = (("authorization", f"Bearer {consent['token']}"),)

    def probe() -> bytes:
        return stub.CheckConsent(valid, metadata=metadata, timeout=10).SerializeToString()

    return measure.CallKind(
        "check",
        CHECK_PATH,
        request.SerializeToString(),
        consent["token"],
        ("consent", "CheckConsent"),
        probe,
        same_reply=same_reply,
    )


def test_counts_every_ok_call_and_its_rate(consent: dict[str, Any]) -> None:
    generator = consent["generator"]
    before = measure.rpc_counts(consent["metrics_port"]).get(("consent", "CheckConsent"), {}).get("OK", 0)
    valid = pb.CheckConsentRequest(customer_id=CUSTOMER, purpose=RECS, data_categories=[PURCHASES])
    checked = generator.run(check_kind(consent, valid), 300)
    health = generator.run(measure.health_kind(consent["channel"]), 300)
    after = measure.rpc_counts(consent["metrics_port"])[("consent", "CheckConsent")]["OK"]
    assert after - before == 300 + 1  # the h2load calls and the probe's
    for one in (checked, health):
        assert one.calls == 300
        assert one.seconds > 0 and one.per_second > 0
        assert 0 < one.p50_ms <= one.p99_ms


def test_an_error_answer_counted_by_the_server_fails_the_round(consent: dict[str, Any]) -> None:
    invalid = pb.CheckConsentRequest(customer_id="", purpose=RECS, data_categories=[PURCHASES])
    # same_reply off: only the server's counts can tell (h2load saw 200 for every call).
    with pytest.raises(measure.BenchFailure, match="INVALID_ARGUMENT"):
        consent["generator"].run(check_kind(consent, invalid, same_reply=False), 50)


def test_a_health_error_fails_the_round_by_its_missing_reply(consent: dict[str, Any]) -> None:
    healthy = measure.health_kind(consent["channel"])
    unknown = health_pb2.HealthCheckRequest(service="no.such.Service")  # NOT_FOUND, no reply message
    kind = measure.CallKind("health", healthy.path, unknown.SerializeToString(), None, None, healthy.probe)
    with pytest.raises(measure.BenchFailure, match="bytes of reply messages"):
        consent["generator"].run(kind, 50)
