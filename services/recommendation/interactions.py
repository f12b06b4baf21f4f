"""The recommender's local, consented copy of the interactions: list-then-watch on profile's feed.

Training reads this copy (and serving will: recent items, already bought). The follower
pages through ListInteractions from the cursor it remembered, then follows
WatchInteractions from where the listing ended, as `service:recommendation`. Each page
or streamed batch is applied in one transaction together with the feed's resume cursor
(table feed_cursors), so a restart resumes from that cursor and neither loses nor
repeats an entry. A cursor the feed no longer knows (OUT_OF_RANGE) starts a full resync:
the copy is emptied and listed again from the start.

What the copy holds follows the customer:
- a merge notice re-keys the source customer's entries to the target, whose consent
  governs them from then on;
- consent: profile serves an interaction only if the customer consents to its category
  for personalize.recommendations when it serves it, so what arrives is stored. Later
  withdrawals (and erasures, expiries) are this service's own consent cache's to find
  (shared/consent_cache.py): a sweep deletes the entries in categories the customer no
  longer grants. It runs on every consent revision the cache applies, over the whole
  copy, and every RECENT_SWEEP_SECONDS over the entries stored since the last one.
  The sweep judges only entries stored before the cache last confirmed it was caught
  up with the consent feed (its last change or heartbeat): profile may have served an
  entry under a grant this cache has not applied yet, and judging it then would
  delete consented data for good.
- erasure: DataSubjectService deletes the customer's entries (erase_customer).

Listeners (`on_change`) hear of every change right after its commit, with the customers
it touched (None: anyone's), so serving's caches (customer_history.py) never lag it.
Each batch is applied as soon as the feed delivers it: an event ingested into profile is
in the copy, and in serving, within tens of milliseconds (bench/recommendation_serving.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import sqlalchemy as sa
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from sqlalchemy.engine import Connection

from shared.clients import client_for
from shared.consent_cache import ConsentCache
from shared.db import Database, now_micros
from shared.log import get_logger
from shared.settings import Settings
from shared.tasks import cancel_and_wait

log = get_logger("najimi.recommendation.interactions")

PURPOSE = "personalize.recommendations"
FEED = "profile.interactions"
LIST_PAGE = 1000
MAX_BACKOFF_SECONDS = 5.0
# The sweep of entries stored since the last one runs this often; the sweep of the whole
# copy this often too without a consent change (expiries and material notices end
# consents without a change on the feed).
RECENT_SWEEP_SECONDS = 2.0
FULL_SWEEP_SECONDS = 60.0

metadata = sa.MetaData()

interactions = sa.Table(
    "interactions",
    metadata,
    sa.Column("interaction_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("item_id", sa.String(128), nullable=False),
    sa.Column("interaction_type", sa.Integer, nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("occur_time_us", sa.BigInteger, nullable=False),
    sa.Column("event_id", sa.String(128), nullable=False),
    sa.Column("channel", sa.Integer, nullable=False),
    sa.Column("data_category", sa.String(128), nullable=False),
    sa.Column("stored_at_us", sa.BigInteger, nullable=False),
)

feed_cursors = sa.Table(
    "feed_cursors",
    metadata,
    sa.Column("feed", sa.String(64), primary_key=True),
    sa.Column("cursor", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class StoredInteraction:
    """One interaction of the copy, as training reads it."""

    customer_id: str
    item_id: str
    interaction_type: profile_pb.InteractionType.ValueType
    weight: float
    occur_time_us: int
    event_id: str
    channel: profile_pb.Channel.ValueType
    data_category: str


# -- the copy's queries (each runs in the caller's transaction) ---------------------------


def read_cursor(connection: Connection) -> str:
    row = connection.execute(sa.select(feed_cursors.c.cursor).where(feed_cursors.c.feed == FEED)).first()
    return row.cursor if row else ""


def _write_cursor(connection: Connection, cursor: str) -> None:
    if connection.execute(
        feed_cursors.update().where(feed_cursors.c.feed == FEED).values(cursor=cursor)
    ).rowcount:
        return
    connection.execute(feed_cursors.insert().values(feed=FEED, cursor=cursor))


def customer_interactions(connection: Connection, customer_id: str) -> list[StoredInteraction]:
    rows = connection.execute(
        sa.select(interactions)
        .where(interactions.c.customer_id == customer_id)
        .order_by(interactions.c.interaction_id)
    )
    return [_stored(row) for row in rows]


def all_interactions(connection: Connection) -> list[StoredInteraction]:
    rows = connection.execute(sa.select(interactions).order_by(interactions.c.interaction_id))
    return [_stored(row) for row in rows]


def erase_customer_interactions(connection: Connection, customer_id: str) -> int:
    return int(
        connection.execute(interactions.delete().where(interactions.c.customer_id == customer_id)).rowcount
    )


def _stored(row: sa.Row[Any]) -> StoredInteraction:
    return StoredInteraction(
        row.customer_id,
        row.item_id,
        row.interaction_type,
        row.weight,
        row.occur_time_us,
        row.event_id,
        row.channel,
        row.data_category,
    )


def drop_unconsented(
    connection: Connection,
    consent: ConsentCache,
    stored_before_us: int,
    customer_ids: Iterable[str] | None = None,
    stored_since_us: int = 0,
) -> int:
    """Deletes the entries stored in [stored_since_us, stored_before_us) (of `customer_ids`,
    or of everyone) whose category the customer does not grant for
    personalize.recommendations; returns how many."""
    window = sa.and_(
        interactions.c.stored_at_us >= stored_since_us, interactions.c.stored_at_us < stored_before_us
    )
    select = sa.select(interactions.c.customer_id, interactions.c.data_category).where(window).distinct()
    if customer_ids is not None:
        select = select.where(interactions.c.customer_id.in_(sorted(set(customer_ids))))
    dropped = 0
    for customer_id, category in connection.execute(select).all():
        if not consent.check(customer_id, PURPOSE, [category]).allowed:
            dropped += connection.execute(
                interactions.delete().where(
                    window,
                    interactions.c.customer_id == customer_id,
                    interactions.c.data_category == category,
                )
            ).rowcount
    return dropped


def confirmed_at_us(consent: ConsentCache) -> int:
    """When the consent cache last confirmed it was caught up (0: never)."""
    staleness = consent.staleness
    return 0 if staleness == float("inf") else now_micros() - int(staleness * 1_000_000)


def apply_entries(
    connection: Connection,
    consent: ConsentCache,
    entries: Sequence[profile_pb.InteractionFeedEntry],
    cursor: str,
) -> int:
    """Applies feed entries, in order, and records `cursor`; returns the interactions stored."""
    stored = 0
    now = now_micros()
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        if rows:
            connection.execute(interactions.insert(), rows)
            rows.clear()

    for entry in entries:
        if entry.HasField("interaction"):
            interaction = entry.interaction
            rows.append(
                {
                    "customer_id": interaction.customer_id,
                    "item_id": interaction.item_id,
                    "interaction_type": interaction.interaction_type,
                    "weight": float(interaction.weight),
                    "occur_time_us": interaction.occur_time.ToMicroseconds(),
                    "event_id": interaction.event_id,
                    "channel": interaction.channel,
                    "data_category": interaction.data_category,
                    "stored_at_us": now,
                }
            )
            stored += 1
        elif entry.HasField("customer_merge"):
            merge = entry.customer_merge
            flush()  # entries before the notice are re-keyed with the rest
            connection.execute(
                interactions.update()
                .where(interactions.c.customer_id == merge.source_customer_id)
                .values(customer_id=merge.target_customer_id)
            )
            # From the merge on, the target's consent governs the merged data.
            drop_unconsented(connection, consent, confirmed_at_us(consent), [merge.target_customer_id])
    flush()
    _write_cursor(connection, cursor)
    return stored


# -- the follower ---------------------------------------------------------------------------


class InteractionCopy:
    """Keeps the copy in step with profile's feed and the consent cache (two background tasks)."""

    def __init__(self, database: Database, consent: ConsentCache, settings: Settings):
        self.db = database
        self.consent = consent
        self._settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self.on_change: list[Callable[[Iterable[str] | None], None]] = []

    def changed(self, customer_ids: Iterable[str] | None) -> None:
        """Tells the listeners what a committed change touched (None: anyone's entries)."""
        touched = None if customer_ids is None else frozenset(customer_ids)
        for listener in self.on_change:
            listener(touched)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._sweep())]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    async def cursor(self) -> str:
        return await self.db.read(read_cursor)

    async def _consent_synced(self) -> None:
        # Consent decides what is kept: an unsynced cache (at start, or after it had to
        # list again) would refuse everything, and the cursor would move past it for good.
        while not await self.consent.wait_synced(10):
            log.warning("interaction_copy_waits_for_consent")

    async def _apply(self, entries: Sequence[profile_pb.InteractionFeedEntry], cursor: str) -> None:
        await self._consent_synced()
        await self.db.write(lambda connection: apply_entries(connection, self.consent, entries, cursor))
        self.changed(touched_customers(entries))

    async def _follow(self) -> None:
        await self._consent_synced()
        failures = 0
        while True:
            stub, channel = client_for(
                profile_grpc.ProfileServiceStub, self._settings.profile_address, self._settings
            )
            try:
                cursor = await self.cursor()
                token = ""
                while True:  # the backlog, page by page
                    page = await stub.ListInteractions(
                        profile_pb.ListInteractionsRequest(
                            since_cursor=cursor, page_size=LIST_PAGE, page_token=token
                        ),
                        timeout=30,
                    )
                    await self._apply(page.entries, page.resume_cursor)
                    cursor, token = page.resume_cursor, page.next_page_token
                    if not token:
                        break
                failures = 0
                async for message in stub.WatchInteractions(
                    profile_pb.WatchInteractionsRequest(since_cursor=cursor)
                ):
                    if message.entries or message.resume_cursor != cursor:
                        await self._apply(message.entries, message.resume_cursor)
                        cursor = message.resume_cursor
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    log.warning("interaction_copy_resync", detail=error.details())
                    await self.db.write(_reset)
                    self.changed(None)
                else:
                    log.warning("interaction_feed_broken", code=error.code().name)
            finally:
                await channel.close()
            failures += 1
            await asyncio.sleep(min(MAX_BACKOFF_SECONDS, 0.05 * 2**failures) * (0.5 + random.random() / 2))

    async def _sweep(self) -> None:
        full_at = -FULL_SWEEP_SECONDS
        swept_revision = -1
        swept_until = 0
        while True:
            await self._consent_synced()
            revision, until = self.consent.revision, confirmed_at_us(self.consent)
            full = revision != swept_revision or time.monotonic() - full_at >= FULL_SWEEP_SECONDS
            since = 0 if full else swept_until
            dropped = await self.db.write(
                partial(drop_unconsented, consent=self.consent, stored_before_us=until, stored_since_us=since)
            )
            if dropped:
                self.changed(None)
                log.info("interaction_copy_consent_sweep", dropped=dropped, revision=revision)
            if full:
                full_at, swept_revision = time.monotonic(), revision
            swept_until = until
            await self.consent.wait_for_revision(revision + 1, RECENT_SWEEP_SECONDS)


def touched_customers(entries: Sequence[profile_pb.InteractionFeedEntry]) -> set[str]:
    """The customers whose entries a batch adds, or moves by a merge."""
    found: set[str] = set()
    for entry in entries:
        if entry.HasField("interaction"):
            found.add(entry.interaction.customer_id)
        elif entry.HasField("customer_merge"):
            found.update((entry.customer_merge.source_customer_id, entry.customer_merge.target_customer_id))
    return found


def _reset(connection: Connection) -> None:
    connection.execute(interactions.delete())
    connection.execute(feed_cursors.delete().where(feed_cursors.c.feed == FEED))
