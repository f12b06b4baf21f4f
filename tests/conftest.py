"""Fixtures shared by every test: storage back ends, tokens, and the running suite."""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from shared.dev_tokens import ensure_dev_tokens
from shared.errors import error_reason as error_reason  # re-exported for the tests
from shared.server import RunningServer, create_server, start_app
from shared.settings import load_settings
from tests.postgres import PostgresCluster

REQUIRE_POSTGRES = os.environ.get("NAJIMI_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    try:
        cluster = PostgresCluster()
        cluster.start()
    except Exception as error:
        if REQUIRE_POSTGRES:
            raise
        pytest.skip(f"PostgreSQL could not start here: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each back end: every storage test runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def dev_tokens(tmp_path: Path) -> dict[str, str]:
    """Development tokens (principal -> token) for a data directory of this test."""
    return ensure_dev_tokens(tmp_path)


class InProcessService:
    """A service started in this process on port 0, with a channel and per-principal metadata."""

    def __init__(self, running: RunningServer, channel: grpc.aio.Channel, tokens: dict[str, str]):
        self.running = running
        self.channel = channel
        self.tokens = tokens

    def auth(self, principal: str = "admin") -> tuple[tuple[str, str], ...]:
        """Call metadata authenticating as `principal` (a key of the dev tokens)."""
        return (("authorization", f"Bearer {self.tokens[principal]}"),)


async def start_in_process(
    name: str, data_dir: Path, tokens: dict[str, str], database_url: str | None = None, **overrides: Any
) -> InProcessService:
    """Builds the service `name` with settings for `data_dir`, serves it on loopback (port 0
    unless `port` is given) in the running event loop, and returns it once it is ready."""
    build_app = importlib.import_module(f"services.{name}.app").build_app
    port = overrides.pop("port", 0)
    settings = load_settings(
        name, data_dir=data_dir, database_url=database_url or "", metrics_port=0, **overrides
    )
    running = await create_server(settings, build_app(settings), port=port)
    await start_app(running)
    return InProcessService(running, grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"), tokens)


@pytest.fixture
async def start_service(
    tmp_path: Path, dev_tokens: dict[str, str]
) -> AsyncIterator[Callable[..., Awaitable[InProcessService]]]:
    """start_service(name, database_url=None, **settings) -> a ready InProcessService."""
    started: list[InProcessService] = []

    async def start(name: str, database_url: str | None = None, **overrides: Any) -> InProcessService:
        service = await start_in_process(name, tmp_path, dev_tokens, database_url, **overrides)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.channel.close()
        await service.running.stop(0)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail and returns its error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations carried by an INVALID_ARGUMENT error."""
    status = rpc_status.from_call(error)
    found: dict[str, str] = {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


@pytest.fixture
async def consented_profile(start_service, dev_tokens):
    """consented_profile(database_url=None, **profile_settings) -> (profile, consent): a profile
    service whose consent cache follows a real consent service and has synced with it."""

    async def start(
        database_url: str | None = None, **profile_settings: Any
    ) -> tuple[InProcessService, InProcessService]:
        # SQLite: one file per service (a file is one schema); PostgreSQL: a schema per service.
        shared_database = database_url if database_url and database_url.startswith("postgresql") else None
        consent = await start_service("consent", shared_database)
        profile = await start_service(
            "profile",
            database_url,
            consent_address=f"127.0.0.1:{consent.running.port}",
            service_token=dev_tokens["service:profile"],
            **profile_settings,
        )
        cache = profile.running.app.registrations[0].servicer.consent
        assert await cache.wait_synced(10), "profile's consent cache did not sync"
        return profile, consent

    return start
