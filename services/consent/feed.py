"""The change feed as one consent replica sees it.

The feed keeps a ConsentIndex of every customer's current consent, so CheckConsent
is a dictionary lookup, and wakes watch streams when new changes commit. It follows
the changes table: right after this replica commits a change, and by polling the
feed head so that changes committed by other replicas arrive within a poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.consent.store import changes_after, consents, current_revision, notices
from shared.consent_index import ConsentIndex, ConsentRecord
from shared.db import Database
from shared.log import get_logger

PAGE = 1000
log = get_logger("najimi.consent.feed")


def _load_index(connection: Connection) -> ConsentIndex:
    index = ConsentIndex()
    index.revision = current_revision(connection)
    for row in connection.execute(sa.select(consents)):
        index.put(
            row.customer_id,
            row.purpose,
            ConsentRecord(
                granted=row.decision == 1,
                categories=frozenset(json.loads(row.categories)),
                notice_version=row.notice_version,
                expires_at_us=row.expires_at_us,
                revision=row.revision,
                changed_at_us=row.given_at_us,
            ),
        )
    material = sa.select(notices.c.purpose, notices.c.effective_at_us, notices.c.version).where(
        notices.c.material
    )
    for row in connection.execute(material):
        index.add_material_notice(row.purpose, row.effective_at_us, row.version)
    return index


class ChangeFeed:
    def __init__(self, database: Database, poll_interval: float = 0.25):
        self.db = database
        self.index = ConsentIndex()
        self._poll_interval = poll_interval
        self._changed = asyncio.Condition()
        self._refreshing = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self.closing = False

    @property
    def revision(self) -> int:
        return self.index.revision

    async def start(self) -> None:
        self.index = await self.db.read(_load_index)
        self._poller = asyncio.create_task(self._poll())

    async def close_watches(self) -> None:
        """Ends every watch stream (they return OK; callers resume from their last revision)."""
        self.closing = True
        async with self._changed:
            self._changed.notify_all()

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def refresh(self) -> None:
        """Applies every change committed after the index's revision and wakes watchers."""
        async with self._refreshing:
            before = self.index.revision
            while True:
                page = await self.db.read(lambda c: changes_after(c, self.index.revision, PAGE))
                self.index.apply_all(page)
                if len(page) < PAGE:
                    break
            if self.index.revision != before:
                async with self._changed:
                    self._changed.notify_all()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                head = await self.db.read(current_revision)
                if head > self.index.revision:
                    await self.refresh()
            except Exception as error:  # a database hiccup must not end the poller
                log.warning("feed_poll_failed", error=type(error).__name__)

    async def wait_beyond(self, revision: int, timeout: float) -> bool:
        """Waits until the feed is past `revision` or `timeout` seconds pass; True if it moved."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.index.revision > revision), timeout
                )
            except TimeoutError:
                return False
        return True
