"""Acknowledged means committed: a profile process killed mid-stream loses nothing it acknowledged."""

from __future__ import annotations

import queue
import time

import grpc
import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.store import events as events_table
from shared.db import Database
from tests.e2e.conftest import Suite
from tests.integration.test_consent_decisions import grant
from tests.integration.test_profile_events import BROWSING, PURCHASES, view


def _wait_until_collecting(stub, metadata) -> None:
    """Profile learns of the grant through its consent cache: probe until it collects."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            reply = stub.IngestEvents(
                pb.IngestEventsRequest(events=[view("probe")]), metadata=metadata, timeout=10
            )
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            continue
        if reply.results[0].status in (pb.EVENT_RESULT_STATUS_ACCEPTED, pb.EVENT_RESULT_STATUS_DUPLICATE):
            return
        time.sleep(0.05)  # polling interval while the grant travels to profile's cache
    raise AssertionError("profile never started collecting the consented events")


def test_a_killed_profile_keeps_every_acknowledged_event(tmp_path):
    suite = Suite(tmp_path)
    suite.start("consent")
    profile = suite.start("profile")
    writer = suite.auth("service:storefront")
    with grpc.insecure_channel(suite.address("consent")) as channel:
        consent_grpc.ConsentServiceStub(channel).GrantConsent(
            grant(customer="c-1", categories=[PURCHASES, BROWSING], request_id="g"),
            metadata=suite.auth(),
            timeout=10,
        )
    acknowledged: list[str] = []
    with grpc.insecure_channel(profile.address) as channel:
        stub = pb_grpc.ProfileServiceStub(channel)
        stub.CreateCustomer(
            pb.CreateCustomerRequest(
                request_id="c", customer_id="c-1", customer=pb.Customer(display_name="A")
            ),
            metadata=writer,
            timeout=10,
        )
        _wait_until_collecting(stub, writer)
        outgoing: queue.Queue[pb.StreamEventsRequest | None] = queue.Queue()
        for message in range(40):
            outgoing.put(pb.StreamEventsRequest(events=[view(f"k-{message}-{n}") for n in range(100)]))
        stream = stub.StreamEvents(iter(outgoing.get, None), metadata=writer, timeout=60)
        try:
            for number, answer in enumerate(stream):
                acknowledged += [
                    r.event_id for r in answer.results if r.status == pb.EVENT_RESULT_STATUS_ACCEPTED
                ]
                if number == 9:
                    profile.kill()  # SIGKILL: no graceful stop, no flush
                    break
        finally:
            outgoing.put(None)
            stream.cancel()
    assert len(acknowledged) == 1000
    suite.start("profile")  # recovery happens on the next start
    database = Database(f"sqlite:///{tmp_path / 'profile.db'}", "profile")
    stored = database.transaction(
        lambda c: {r.event_id for r in c.execute(sa.select(events_table.c.event_id))}
    )
    database.close()
    assert set(acknowledged) <= stored
    suite.stop_all()
