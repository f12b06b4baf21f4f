"""The trait worker as a process of its own (services/profile/trait_process.py): with
NAJIMI_PROFILE_TRAIT_WORKER=external the profile service leaves the traits alone, and a
`python -m services.profile.trait_process` beside it keeps them current."""

from __future__ import annotations

import asyncio
import time

from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.db import now_micros
from shared.processes import ServiceProcess
from tests.integration.test_profile_traits import COFFEE, CRM, DAY_US, Suite, event

DEADLINE_SECONDS = 20.0


async def purchases(suite: Suite) -> int:
    return (await suite.traits()).frequency.purchase_count


async def until_purchases(suite: Suite, count: int) -> int:
    """Reads the traits until they count `count` purchases (the worker is another process)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        found = await purchases(suite)
        if found == count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def ingest(suite: Suite, *events: pb.Event) -> None:
    response = await suite.stub.IngestEvents(
        pb.IngestEventsRequest(events=events), metadata=suite.profile.auth(CRM)
    )
    assert [r.status for r in response.results] == [pb.EVENT_RESULT_STATUS_ACCEPTED] * len(events)


async def test_a_trait_worker_process_keeps_the_traits_current(consented_profile, database_url, tmp_path):
    profile, consent = await consented_profile(database_url, profile_trait_worker="external")
    suite = Suite(
        profile,
        consent,
        pb_grpc.ProfileServiceStub(profile.channel),
        consent_grpc.ConsentServiceStub(consent.channel),
    )
    await suite.create("c-1")
    await suite.grant()
    now = now_micros()
    await ingest(
        suite,
        event("p1", pb.EVENT_TYPE_PURCHASE, now - 20 * DAY_US, (("beans", COFFEE),)),
        event("p2", pb.EVENT_TYPE_PURCHASE, now - 10 * DAY_US, (("beans", COFFEE),)),
    )
    assert suite.worker.position == 0  # the service runs no worker of its own
    assert await purchases(suite) == 0

    worker = ServiceProcess(
        "profile.trait_process",
        {"NAJIMI_DATA_DIR": str(tmp_path), "NAJIMI_DATABASE_URL": database_url},
        tmp_path / "trait-process.log",
    )
    try:
        assert await until_purchases(suite, 2) == 2, "".join(worker.lines[-20:])
        await ingest(suite, event("p3", pb.EVENT_TYPE_PURCHASE, now - DAY_US, (("beans", COFFEE),)))
        assert await until_purchases(suite, 3) == 3, "".join(worker.lines[-20:])
    finally:
        code = worker.terminate()
    assert code == 0, "".join(worker.lines[-20:])
    assert any('"trait_worker_stopped"' in line for line in worker.lines)
