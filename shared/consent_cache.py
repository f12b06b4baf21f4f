"""The consent cache every service keeps: list-then-watch over the consent change feed.

Like a Kubernetes informer: it lists the feed (ListConsentChanges, paged) into a
local ConsentIndex, then watches from the revision it reached (WatchConsentChanges),
applying each change as it arrives. When the stream breaks it reconnects with
exponential back-off and jitter, resuming from the last revision it applied, so
nothing is missed and nothing is applied twice. A decision is a dictionary lookup.

It knows how stale it is: the time since the consent service last told it anything
(a change or a heartbeat). Callers that must fail closed ask `check_fresh` with their
staleness bound and get no decision when the cache is older than that.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import duration_pb2
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from shared.clients import open_channel
from shared.consent_index import ConsentIndex, Decision
from shared.db import now_micros
from shared.errors import Unavailable
from shared.log import get_logger
from shared.tasks import cancel_and_wait

log = get_logger("najimi.consent_cache")
LIST_PAGE = 1000
# An unknown purpose is looked up again (ListPurposes) at most this often: an admin's new
# purpose is seen within it, and a caller repeating a wrong one does not reach consent.
VOCABULARY_REFRESH_SECONDS = 5.0
VOCABULARY_TIMEOUT_SECONDS = 5.0


def consent_state_stale(action: str = "act on") -> Unavailable:
    """The error of a call that must fail closed because the consent state is too old to
    `action` ("collect events", "serve interactions", ...)."""
    return Unavailable(
        f"the consent state is too old to {action}; retry shortly", reason="CONSENT_STATE_STALE"
    )


class ConsentCache:
    def __init__(
        self,
        address: str,
        token: str,
        purposes: Iterable[str] = (),
        heartbeat_seconds: int = 1,
        max_backoff_seconds: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.address = address
        self._token = token
        self._credentials = credentials
        self._purposes = list(purposes)
        self._heartbeat = heartbeat_seconds
        self._max_backoff = max_backoff_seconds
        self.index = ConsentIndex()
        self._heard_at: float | None = None  # monotonic time of the last message
        self._synced = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._known_purposes: frozenset[str] = frozenset()
        self._purposes_listed_at = -VOCABULARY_REFRESH_SECONDS
        self._listing_purposes = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    # What callers use --------------------------------------------------------------------

    @property
    def staleness(self) -> float:
        """Seconds since the consent service last confirmed this cache; infinite before that."""
        return float("inf") if self._heard_at is None else time.monotonic() - self._heard_at

    @property
    def revision(self) -> int:
        return self.index.revision

    def check(self, customer_id: str, purpose: str, categories: Iterable[str] = ()) -> Decision:
        return self.index.check(customer_id, purpose, categories, now_micros())

    def check_fresh(
        self, customer_id: str, purpose: str, categories: Iterable[str], max_staleness: float
    ) -> Decision | None:
        """The decision, or None when the cache is staler than `max_staleness` seconds (fail closed)."""
        if self.staleness > max_staleness:
            return None
        return self.check(customer_id, purpose, categories)

    async def knows_purpose(self, purpose: str) -> bool:
        """Is `purpose` in the consent vocabulary? A known purpose is answered from memory
        (purposes are never removed); an unknown one from a ListPurposes at most
        VOCABULARY_REFRESH_SECONDS old. Raises Unavailable when consent cannot be asked."""
        if purpose in self._known_purposes:
            return True
        async with self._listing_purposes:  # concurrent askers share one listing
            if time.monotonic() - self._purposes_listed_at >= VOCABULARY_REFRESH_SECONDS:
                self._known_purposes = await self._list_purposes()
                self._purposes_listed_at = time.monotonic()
        return purpose in self._known_purposes

    async def _list_purposes(self) -> frozenset[str]:
        names: set[str] = set()
        channel = open_channel(
            self.address, self._token, timeout=VOCABULARY_TIMEOUT_SECONDS, credentials=self._credentials
        )
        try:
            stub = pb_grpc.ConsentServiceStub(channel)
            token = ""
            while True:
                page = await stub.ListPurposes(pb.ListPurposesRequest(page_size=1000, page_token=token))
                names.update(purpose.name for purpose in page.purposes)
                token = page.next_page_token
                if not token:
                    return frozenset(names)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"cannot read the consent vocabulary ({error.code().name}); retry",
                reason="CONSENT_UNAVAILABLE",
            ) from None
        finally:
            await channel.close()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` (on the event loop, without arguments) after the cache applied
        a change or a full list, e.g. to act on a withdrawal at once rather than at the
        next poll. It must not block."""
        self._listeners.append(listener)

    def _changed_now(self) -> None:
        for listener in self._listeners:
            listener()

    async def wait_synced(self, timeout: float) -> bool:
        """Waits until the first full list has been applied; False on timeout."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (3.11)
                await self._synced.wait()
        except TimeoutError:
            return False
        return True

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Waits until the cache has applied `revision` (e.g. a write's own); False on timeout."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (3.11)
                    await self._changed.wait_for(lambda: self.index.revision >= revision)
            except TimeoutError:
                return False
        return True

    # Life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._channel = open_channel(
                self.address, self._token, timeout=None, credentials=self._credentials
            )
            stub = pb_grpc.ConsentServiceStub(self._channel)
            try:
                if not self._synced.is_set():
                    await self._list(stub)
                    self._synced.set()
                failures = 0
                await self._watch(stub)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    # The feed is behind us (the consent store was reset): start over.
                    self.index = ConsentIndex()
                    self._synced.clear()
                log.warning(
                    "consent_watch_broken", code=error.code().name, staleness=round(self.staleness, 3)
                )
            finally:
                await self._channel.close()
            failures += 1
            await asyncio.sleep(min(self._max_backoff, 0.05 * 2**failures) * (0.5 + random.random() / 2))

    async def _list(self, stub: pb_grpc.ConsentServiceStub) -> None:
        index = ConsentIndex()
        token = ""
        while True:
            page = await stub.ListConsentChanges(
                pb.ListConsentChangesRequest(
                    since_revision=0, purposes=self._purposes, page_size=LIST_PAGE, page_token=token
                ),
                timeout=30,
            )
            index.apply_all(page.changes)
            token = page.next_page_token
            if not token:
                index.revision = max(index.revision, page.current_revision)
                break
        self.index = index
        await self._heard()
        self._changed_now()

    async def _watch(self, stub: pb_grpc.ConsentServiceStub) -> None:
        stream = stub.WatchConsentChanges(
            pb.WatchConsentChangesRequest(
                since_revision=self.index.revision,
                purposes=self._purposes,
                heartbeat_interval=duration_pb2.Duration(seconds=self._heartbeat),
            )
        )
        async for message in stream:
            if message.HasField("change"):
                self.index.apply(message.change)
                self._changed_now()
            else:
                self.index.revision = max(self.index.revision, message.heartbeat.current_revision)
            await self._heard()

    async def _heard(self) -> None:
        self._heard_at = time.monotonic()
        async with self._changed:
            self._changed.notify_all()
