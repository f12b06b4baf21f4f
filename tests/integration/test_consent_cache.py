"""The shared consent cache against a real consent server: list-then-watch, staleness, reconnect."""

from __future__ import annotations

import asyncio

import pytest
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from shared.consent_cache import ConsentCache
from tests.integration.test_consent_decisions import PURCHASES, RECS, grant, withdraw


@pytest.fixture
async def cache_factory():
    caches: list[ConsentCache] = []

    def make(address: str, token: str) -> ConsentCache:
        cache = ConsentCache(address, token, heartbeat_seconds=1, max_backoff_seconds=0.5)
        cache.start()
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.stop()


async def test_a_withdrawal_reaches_the_cache_within_a_second(start_service, database_url, cache_factory):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    granted_before = await stub.GrantConsent(
        grant(customer="early", request_id="early"), metadata=consent.auth()
    )
    cache = cache_factory(f"127.0.0.1:{consent.running.port}", consent.tokens["service:profile"])
    assert await cache.wait_synced(5)
    assert cache.revision >= granted_before.consent.revision
    assert cache.check("early", RECS, [PURCHASES]).allowed  # from the list phase

    granted = await stub.GrantConsent(grant(), metadata=consent.auth())
    assert await cache.wait_for_revision(granted.consent.revision, 1.0)
    assert cache.check("c-1", RECS, [PURCHASES]).allowed
    for attempt in range(5):
        regranted = await stub.GrantConsent(grant(request_id=f"again-{attempt}"), metadata=consent.auth())
        withdrawn = await stub.WithdrawConsent(withdraw(request_id=f"w-{attempt}"), metadata=consent.auth())
        assert regranted.consent.revision < withdrawn.consent.revision
        assert await cache.wait_for_revision(withdrawn.consent.revision, 1.0)
        decision = cache.check("c-1", RECS, [PURCHASES])
        assert not decision.allowed and decision.reason == pb.CONSENT_CHECK_REASON_WITHDRAWN


async def test_the_cache_reports_staleness_and_reconnects(start_service, tmp_path, cache_factory):
    url = f"sqlite:///{tmp_path / 'consent.db'}"
    consent = await start_service("consent", url)
    port = consent.running.port
    await pb_grpc.ConsentServiceStub(consent.channel).GrantConsent(grant(), metadata=consent.auth())
    cache = cache_factory(f"127.0.0.1:{port}", consent.tokens["service:recommendation"])
    assert await cache.wait_synced(5)
    assert cache.check_fresh("c-1", RECS, [PURCHASES], max_staleness=3.0).allowed

    await consent.running.stop(0)
    # Staleness is a measure of time: let the bound pass (nothing else can make it grow).
    await asyncio.sleep(max(0.0, 3.0 - cache.staleness) + 0.05)
    assert cache.staleness > 3.0
    assert cache.check_fresh("c-1", RECS, [PURCHASES], max_staleness=3.0) is None  # callers fail closed
    assert cache.check("c-1", RECS, [PURCHASES]).allowed  # the last known state is still there

    again = await start_service("consent", url, port=port)
    withdrawn = await pb_grpc.ConsentServiceStub(again.channel).WithdrawConsent(
        withdraw(), metadata=again.auth()
    )
    assert await cache.wait_for_revision(withdrawn.consent.revision, 10)
    assert cache.staleness < 3.0
    assert not cache.check_fresh("c-1", RECS, [PURCHASES], max_staleness=3.0).allowed


async def test_watch_replays_then_streams_live(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    first = await stub.GrantConsent(grant(customer="a", request_id="a"), metadata=consent.auth())
    stream = stub.WatchConsentChanges(
        pb.WatchConsentChangesRequest(since_revision=0), metadata=consent.auth()
    )
    replayed = []
    async for message in stream:
        if message.HasField("heartbeat"):
            assert message.heartbeat.current_revision >= first.consent.revision
            break
        replayed.append(message.change)
    assert [c.customer_id for c in replayed if c.customer_id] == ["a"]
    live = await stub.WithdrawConsent(withdraw(customer="a", request_id="wa"), metadata=consent.auth())
    async for message in stream:
        if message.HasField("change"):
            assert message.change.revision == live.consent.revision
            assert message.change.status == pb.CONSENT_STATUS_WITHDRAWN
            break
    stream.cancel()
    # A watcher that reconnects from the last revision it saw gets exactly what it missed.
    missed = await stub.GrantConsent(grant(customer="b", request_id="b"), metadata=consent.auth())
    resumed = stub.WatchConsentChanges(
        pb.WatchConsentChangesRequest(since_revision=live.consent.revision), metadata=consent.auth()
    )
    message = await resumed.read()
    assert message.change.revision == missed.consent.revision and message.change.customer_id == "b"
    resumed.cancel()
