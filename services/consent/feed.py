"""The change feed as one consent replica sees it.

The feed keeps a ConsentIndex of every customer's current consent, so CheckConsent
is a dictionary lookup, and wakes watch streams when new changes commit. It follows
the changes table (shared/feed_watch.py): right after this replica commits a change
(`refresh`), and by polling the feed head so that changes committed by other replicas
arrive within a poll interval.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.consent.store import changes_after, consents, current_revision, notices
from shared.consent_index import ConsentIndex, ConsentRecord
from shared.db import Database
from shared.feed_watch import FeedWatch

PAGE = 1000


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


class ChangeFeed(FeedWatch):
    def __init__(self, database: Database, poll_interval: float = 0.25):
        super().__init__("consent", poll_interval)
        self.db = database
        self.index = ConsentIndex()

    async def load(self) -> int:
        self.index = await self.db.read(_load_index)
        return self.index.revision

    async def read_head(self) -> int:
        return await self.db.read(current_revision)

    async def follow(self, head: int) -> int:
        """Applies every change committed after the index's revision."""
        while True:
            page = await self.db.read(lambda c: changes_after(c, self.index.revision, PAGE))
            self.index.apply_all(page)
            if len(page) < PAGE:
                return self.index.revision
