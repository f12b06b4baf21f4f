"""The trait worker: keeps the trait aggregates current by following `events` by seq.

One asyncio task per profile process. Each pass reads up to BATCH events after the
cursor and turns them into aggregate rows in a read transaction, then adds them and
moves the cursor in a short write transaction (services/profile/trait_store.py); passes
follow each other at once while there is a backlog. When caught up it waits
for `notify()` (the ingestion code calls it after committing events) or POLL_SECONDS,
whichever comes first, so events committed by another replica are picked up too.

Bigger and rarer passes cost less per event (fewer statements and commits, and a
customer's interactions with one category within a pass become one row), and each pass
competes with ingestion for the core and, on SQLite, for the one writer. So after a
wake-up the worker lets a burst of ingestion settle: it starts once no new events came
for QUIET_SECONDS, or SETTLE_SECONDS after the wake-up at the latest, so the aggregates
lag the events by about a second at most while ingestion is busy, and by a few tens of
milliseconds after. `wait_until_processed` ends the wait at once.

The events this process commits reach the worker in memory too (`add_committed`, called
by the ingestion after each commit): a pass takes them from there instead of reading and
decoding them again, when they are exactly the events after the cursor and still as
stored (trait_store.Committed, trait_store.read_batch).

Several replicas may run a worker against one PostgreSQL database: the cursor row lock
makes their passes take turns, and each event is still added once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections import deque

from services.profile import trait_store
from shared.db import Database
from shared.log import get_logger
from shared.tasks import cancel_and_wait

log = get_logger("najimi.profile.traits")

POLL_SECONDS = 0.5
BATCH = 20_000
# Events of this process's commits kept in memory for the worker, at most; past that it
# drops them and reads the events from the table.
MAX_KEPT_EVENTS = 200_000
QUIET_SECONDS = 0.05
SETTLE_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0


class TraitWorker:
    def __init__(
        self,
        database: Database,
        poll_seconds: float = POLL_SECONDS,
        batch: int = BATCH,
        settle_seconds: float = SETTLE_SECONDS,
    ):
        self.database = database
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.settle_seconds = settle_seconds
        self._hurry = False  # someone waits for the aggregates: no settling
        # This process's recent commits, in seq order, until the aggregates include them.
        self._committed: deque[trait_store.Committed] = deque()
        self._kept = 0  # events in _committed
        # The seq the aggregates are known to be current to (the cursor after the last pass).
        self.position = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="trait-worker")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    def notify(self) -> None:
        """Says that events were committed: the worker looks at once. Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def add_committed(self, committed: trait_store.Committed) -> None:
        """Keeps what an ingestion transaction stored, so the worker need not read it back
        (the ingestion calls it after each commit, on the event loop)."""
        if self._kept + len(committed.events) > MAX_KEPT_EVENTS:
            self._committed.clear()  # far behind: the table has them all
            self._kept = 0
        self._committed.append(committed)
        self._kept += len(committed.events)

    def _forget_added(self) -> None:
        while self._committed and self._committed[0].last <= self.position:
            self._kept -= len(self._committed.popleft().events)

    async def wait_until_processed(self, seq: int | None = None, timeout: float = 10.0) -> bool:
        """Waits until the aggregates include every event up to `seq` (default: the newest
        committed event); False on timeout."""
        if seq is None:
            seq = await self.database.read(trait_store.event_head_seq)
        self._hurry = True
        self.notify()
        try:
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(lambda: self.position >= seq)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            # A waiter from before this pass is served by it (it reads up to the head).
            self._hurry = False
            try:
                batch = await self.database.read(
                    functools.partial(
                        trait_store.read_batch, limit=self.batch, committed=list(self._committed)
                    )
                )
                written = batch.last == batch.cursor or await self.database.write(
                    functools.partial(trait_store.write_batch, batch=batch)
                )
                failures = 0
            except Exception as error:
                # The database may be restarting; keep trying, never end the worker.
                failures += 1
                log.warning("trait_worker_failed", error=type(error).__name__, failures=failures)
                delay = min(MAX_BACKOFF_SECONDS, 0.05 * 2**failures) * (0.5 + random.random() / 2)
                await self._sleep_or_wake(delay)
                continue
            if not written:
                continue  # another replica, a rebuild or an erasure came first: read again
            async with self._progress:
                self.position = batch.last
                self._progress.notify_all()
            self._forget_added()
            if batch.behind:
                continue  # a backlog: the next batch at once
            if await self._sleep_or_wake(self.poll_seconds):
                await self._settle()

    async def _settle(self) -> None:
        """Waits until no events came for QUIET_SECONDS, for `settle_seconds` at most, or until
        someone waits for the aggregates."""
        deadline = asyncio.get_running_loop().time() + self.settle_seconds
        while not self._hurry:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._wake.clear()
            if not await self._sleep_or_wake(min(QUIET_SECONDS, left)):
                return  # quiet

    async def _sleep_or_wake(self, seconds: float) -> bool:
        """Waits for `notify()` or `seconds`; True when notified."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the wake-up does, and stop() would then wait forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
                return True
        return False
