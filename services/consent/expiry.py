"""Publishing expiries on the change feed.

Validity never waits for this: every check compares expires_at with the clock. But a
watcher that keeps no clock of its own (an auditor, a CRM) learns from an EXPIRED
change that a consent ran out, shortly after it did.
"""

from __future__ import annotations

import asyncio
import json

import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.consent import audit
from services.consent.feed import ChangeFeed
from services.consent.store import allocate_revision, consents, insert_change
from shared.db import Database, now_micros
from shared.log import get_logger
from shared.proto_time import timestamp_of
from shared.tasks import cancel_and_wait

BATCH = 500
log = get_logger("najimi.consent.expiry")


def publish_expiries(connection: Connection, ref_key: bytes, now_us: int) -> int:
    """Publishes an EXPIRED change for each grant past its expiry; returns how many."""
    expired = list(
        connection.execute(
            sa.select(consents)
            .where(
                consents.c.decision == pb.CONSENT_DECISION_GRANTED,
                consents.c.expiry_published.is_(False),
                consents.c.expires_at_us <= now_us,
            )
            .limit(BATCH)
        )
    )
    for row in expired:
        revision = allocate_revision(connection)
        insert_change(
            connection,
            pb.ConsentChange(
                revision=revision,
                kind=pb.CONSENT_CHANGE_KIND_EXPIRED,
                customer_id=row.customer_id,
                purpose=row.purpose,
                status=pb.CONSENT_STATUS_EXPIRED,
                granted_data_categories=json.loads(row.categories),
                notice_version=row.notice_version,
                expire_time=timestamp_of(row.expires_at_us),
                change_time=timestamp_of(now_us),
            ),
        )
        connection.execute(
            consents.update()
            .where(consents.c.customer_id == row.customer_id, consents.c.purpose == row.purpose)
            .values(expiry_published=True, revision=revision)
        )
        audit.append_entry(
            connection,
            ref_key=ref_key,
            actor="system",
            action=pb.AUDIT_ACTION_CONSENT_EXPIRED,
            customer_id=row.customer_id,
            request_id="",
            details={"purpose": row.purpose, "revision": revision},
            now_us=now_us,
        )
    return len(expired)


class ExpiryPublisher:
    def __init__(self, database: Database, feed: ChangeFeed, ref_key: bytes, interval_seconds: float = 2.0):
        self.db = database
        self.feed = feed
        self.ref_key = ref_key
        self.interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                published = await self.db.write(lambda c: publish_expiries(c, self.ref_key, now_micros()))
                if published:
                    await self.feed.refresh()
            except Exception as error:  # the next round tries again
                log.warning("expiry_publish_failed", error=type(error).__name__)
            await asyncio.sleep(self.interval)
