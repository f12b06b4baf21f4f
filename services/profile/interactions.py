"""The interaction feed for the recommender: consented customer-item interactions, in commit order.

The feed follows `seq`, the position event ingestion hands out under the `event_head`
row lock inside its transaction. MergeCustomers takes a seq under the same lock (and
records it as `seq` in merges.moved), so events and merges share one commit order: once
the committed head reads N, everything up to N is visible, and following seq never
skips an entry that commits late. Each event gives one interaction per item
(INTERACTION_OF_EVENT, weights from the weight table); each merge gives a CustomerMerge
notice. A cursor is (seq, how many items of the event at seq were delivered), so a page
may end inside an event, and resuming from any cursor loses and repeats nothing. On the
wire a cursor is a token of the shared codec (shared/page_tokens.py) scoped to this feed,
so ListInteractions and WatchInteractions take each other's cursors, and a cursor a
caller altered or forged is INVALID_ARGUMENT (reason INVALID_PAGE_TOKEN).

Consent is decided when an entry is served, from the consent cache: an interaction is
served only if the customer who owns the event now (after merges, the surviving
customer) consents to its data category for personalize.recommendations. So withdrawn
data stops appearing at once, even in a replay from the start. A cache staler than the
configured bound fails the read with UNAVAILABLE (CONSENT_STATE_STALE). The cursor moves
past what was not served, so a later grant does not bring it back to this reader (a full
resync from an empty cursor would). Interaction.customer_id is the customer the event was
recorded for when it was committed; a merge notice tells the reader to re-key.

The feed follows its head with shared/feed_watch.py: watchers wake at once when this
replica commits events or a merge (`poke`, called after each commit), and on a 0.5 s poll
of the head while anyone watches (what other replicas commit); they send a heartbeat when
caught up and then whenever idle for `heartbeat_seconds`, and end with UNAVAILABLE when
the server drains (`close_watches`).

Scale: merges are found through the seq inside merges.moved (JSON, not indexed), so each
read scans the merges table; with many merges, a seq column with an index on merges
would make that a range read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import sqlalchemy as sa
from najimi.profile.v1 import profile_service_pb2 as pb
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from services.profile.store import customers, event_head, events, merges
from shared.consent_cache import ConsentCache, consent_state_stale
from shared.db import Database
from shared.errors import OutOfRange, Unavailable
from shared.feed_watch import FeedWatch
from shared.page_tokens import PageTokens, invalid_token
from shared.proto_time import timestamp_of

PURPOSE = "personalize.recommendations"
MAX_WEIGHT = 10.0
# Ratings below this are not emitted (the model learns from positive feedback only).
MIN_POSITIVE_RATING = 3.0
# A rating's weight is the rating minus this (3.0 -> 1, 5.0 -> 3).
RATING_WEIGHT_OFFSET = 2.0

INTERACTION_OF_EVENT: dict[int, pb.InteractionType.ValueType] = {
    pb.EVENT_TYPE_PRODUCT_VIEW: pb.INTERACTION_TYPE_VIEW,
    pb.EVENT_TYPE_ADD_TO_CART: pb.INTERACTION_TYPE_ADD_TO_CART,
    pb.EVENT_TYPE_ADD_TO_WISHLIST: pb.INTERACTION_TYPE_ADD_TO_WISHLIST,
    pb.EVENT_TYPE_PURCHASE: pb.INTERACTION_TYPE_PURCHASE,
    pb.EVENT_TYPE_STORE_PURCHASE: pb.INTERACTION_TYPE_PURCHASE,
    pb.EVENT_TYPE_RATING: pb.INTERACTION_TYPE_RATING,
    pb.EVENT_TYPE_INQUIRY: pb.INTERACTION_TYPE_INQUIRY,
    pb.EVENT_TYPE_DOCUMENT_REQUEST: pb.INTERACTION_TYPE_INQUIRY,
}
# The proto's default weight table (a rating's weight comes from its value instead).
DEFAULT_WEIGHTS: dict[int, float] = {
    pb.INTERACTION_TYPE_VIEW: 1.0,
    pb.INTERACTION_TYPE_INQUIRY: 1.0,
    pb.INTERACTION_TYPE_ADD_TO_WISHLIST: 1.5,
    pb.INTERACTION_TYPE_ADD_TO_CART: 2.0,
    pb.INTERACTION_TYPE_PURCHASE: 4.0,
}

WATCH_BATCH = 1000  # entries per WatchInteractionsResponse, the proto's limit
# A watcher reads the feed at most this often: under a high ingest rate (a wake per
# committed batch) it takes what came in the meantime in one read.
MIN_READ_INTERVAL_SECONDS = 0.05
MAX_SCANNED_EVENTS = 10_000  # events read per page at most, served or not
# What the feed's cursors are bound to: the feed, not one RPC (List and Watch share them).
FEED_SCOPE = "najimi.profile.v1.ProfileService/interaction-feed"
_MAX_ITEMS = 500


# -- cursors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """A position in the feed: everything before it was delivered (or passed over).

    Every entry with a seq below `seq` is done, and of the event at `seq` its first
    `items` items, or all of it when `items` is 0.
    """

    seq: int = 0
    items: int = 0


class CursorCodec:
    """The feed's cursors as opaque, authenticated text (shared/page_tokens.py)."""

    def __init__(self, tokens: PageTokens):
        self.tokens = tokens

    def text(self, cursor: Cursor) -> str:
        return self.tokens.issue(FEED_SCOPE, {}, (cursor.seq, cursor.items))

    def cursor_of(self, text: str, field: str) -> Cursor:
        """The cursor a feed entry or response carried; an empty one is the start of the feed.

        Raises InvalidArgument naming `field` (reason INVALID_PAGE_TOKEN) for anything
        this feed did not issue.
        """
        position = self.tokens.read(text, FEED_SCOPE, {}, (int, int), field)
        if position is None:
            return Cursor()
        seq, items = int(position[0]), int(position[1])
        if seq < 0 or not 0 <= items <= _MAX_ITEMS:
            raise invalid_token(field)
        return Cursor(seq, items)


# -- interactions from events -------------------------------------------------------------


def interactions_of(event: pb.Event, weights: Mapping[int, float]) -> list[pb.Interaction]:
    """The interactions an event gives, one per item (none for a rating below 3)."""
    kind = INTERACTION_OF_EVENT.get(event.event_type)
    if kind is None:
        return []
    if kind == pb.INTERACTION_TYPE_RATING:
        if event.rating_value < MIN_POSITIVE_RATING:
            return []
        weight = event.rating_value - RATING_WEIGHT_OFFSET
    else:
        weight = weights[kind]
    weight = min(MAX_WEIGHT, weight)
    if weight <= 0:
        return []
    return [
        pb.Interaction(
            customer_id=event.resolved_customer_id,
            item_id=item.item_id,
            interaction_type=kind,
            weight=weight,
            occur_time=event.occur_time,
            event_id=event.event_id,
            channel=event.channel,
            data_category=event.data_category,
        )
        for item in event.items
    ]


# -- storage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EventRow:
    seq: int
    owner: str  # the customer the event belongs to now (after merges)
    data_category: str
    event: pb.Event


@dataclass(frozen=True)
class _MergeRow:
    seq: int
    source: str
    target: str
    merged_at_us: int


def _head(connection: Connection) -> int:
    return int(connection.execute(sa.select(event_head.c.seq).where(event_head.c.id == 1)).scalar_one())


def _live_owners(connection: Connection, ids: Iterable[str]) -> dict[str, str]:
    """The live customer of each id that was merged into another (following chains)."""
    merged_into: dict[str, str] = {}
    wanted = set(ids)
    while wanted:
        rows = connection.execute(
            sa.select(customers.c.customer_id, customers.c.merged_into).where(
                customers.c.customer_id.in_(sorted(wanted)), customers.c.merged_into.is_not(None)
            )
        ).all()
        found = {row.customer_id: row.merged_into for row in rows}
        merged_into.update(found)
        wanted = {target for target in found.values() if target not in merged_into}

    def live(customer_id: str) -> str:
        seen: set[str] = set()
        while customer_id in merged_into and customer_id not in seen:
            seen.add(customer_id)
            customer_id = merged_into[customer_id]
        return customer_id

    return {customer_id: live(customer_id) for customer_id in merged_into}


def _merge_seq(connection: Connection) -> sa.ColumnElement[int]:
    """A merge's seq, which MergeCustomers keeps in merges.moved (JSON text)."""
    if connection.dialect.name == "postgresql":
        return sa.cast(sa.cast(merges.c.moved, postgresql.JSONB)["seq"].astext, sa.BigInteger)
    return sa.cast(sa.func.json_extract(merges.c.moved, "$.seq"), sa.BigInteger)


def _entries_after(
    connection: Connection, after: Cursor, head: int, limit: int
) -> tuple[list[_EventRow], list[_MergeRow], bool]:
    """Up to `limit` events that may give interactions after `after` (the partly delivered
    event at `after.seq` included) and up to `head`, with the merges among them, in seq
    order; and whether that reached `head`."""
    position = events.c.seq >= after.seq if after.items else events.c.seq > after.seq
    rows = connection.execute(
        sa.select(events.c.seq, events.c.customer_id, events.c.data_category, events.c.payload)
        .where(position, events.c.seq <= head, events.c.event_type.in_(sorted(INTERACTION_OF_EVENT)))
        .order_by(events.c.seq)
        .limit(limit)
    ).all()
    reached_head = len(rows) < limit
    covered_to = head if reached_head else rows[-1].seq
    seq = _merge_seq(connection)
    merge_rows = connection.execute(
        sa.select(
            seq.label("seq"), merges.c.source_customer_id, merges.c.target_customer_id, merges.c.merged_at_us
        )
        .where(seq > after.seq, seq <= covered_to)
        .order_by(seq)
    ).all()
    live = _live_owners(connection, {row.customer_id for row in rows})
    found = [
        _EventRow(
            row.seq,
            live.get(row.customer_id, row.customer_id),
            row.data_category,
            pb.Event.FromString(row.payload),
        )
        for row in rows
    ]
    notices = [
        _MergeRow(int(row.seq), row.source_customer_id, row.target_customer_id, row.merged_at_us)
        for row in merge_rows
    ]
    return found, notices, reached_head


# -- the feed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """The next step through the feed: an entry to serve, or something to pass over."""

    seq: int
    items: int  # the cursor's `items` after this step (0: done with this seq)
    interaction: pb.Interaction | None = None
    merge: pb.CustomerMerge | None = None


@dataclass(frozen=True)
class FeedPage:
    entries: list[pb.InteractionFeedEntry]
    resume: Cursor
    caught_up: bool  # nothing more was committed when the page was read


class InteractionFeed(FeedWatch):
    def __init__(
        self,
        database: Database,
        consent: ConsentCache,
        max_staleness_seconds: float,
        tokens: PageTokens,
        weights: Mapping[int, float] = DEFAULT_WEIGHTS,
        heartbeat_seconds: float = 10.0,
        poll_seconds: float = 0.5,
    ):
        # The head is all it keeps: nobody watching, nothing to poll for.
        super().__init__("interactions", poll_seconds, poll_unwatched=False)
        self.db = database
        self.consent = consent
        self.cursors = CursorCodec(tokens)
        self.max_staleness = max_staleness_seconds
        self.weights = dict(weights)
        self.heartbeat_seconds = heartbeat_seconds  # at most 30 (the proto's promise)

    async def read_head(self) -> int:
        return await self.db.read(_head)

    # -- reading -----------------------------------------------------------------------

    async def page(self, since: Cursor, size: int) -> FeedPage:
        """Up to `size` entries after `since`.

        Raises OutOfRange (CURSOR_EXPIRED) for a cursor beyond the feed (a feed since reset)
        and Unavailable (CONSENT_STATE_STALE) when the consent cache is too stale to decide.
        """
        self._require_fresh_consent()
        head = await self.db.read(_head)
        if since.seq > head:
            raise OutOfRange(
                "since_cursor is beyond the feed (it was reset): start again from an empty cursor",
                reason="CURSOR_EXPIRED",
            )
        decisions: dict[tuple[str, str], bool] = {}
        entries: list[pb.InteractionFeedEntry] = []
        position = since
        pending: deque[_Step] = deque()
        fetched_to = since
        reached_head = False  # every entry up to head is in `pending` or behind `position`
        scanned = 0
        batch = max(size, 100)
        while len(entries) < size:
            if not pending:
                if reached_head or scanned >= MAX_SCANNED_EVENTS:
                    break
                rows, notices, reached_head = await self.db.read(
                    partial(_entries_after, after=fetched_to, head=head, limit=batch)
                )
                scanned += len(rows)
                steps = [step for row in rows for step in self._steps(row, since, decisions)]
                steps += [_merge_step(notice) for notice in notices]
                pending.extend(sorted(steps, key=lambda step: step.seq))  # stable: items stay in order
                fetched_to = Cursor(head if reached_head else rows[-1].seq)
                continue
            step = pending.popleft()
            position = Cursor(step.seq, step.items)
            if step.interaction is not None:
                entries.append(
                    pb.InteractionFeedEntry(cursor=self.cursors.text(position), interaction=step.interaction)
                )
            elif step.merge is not None:
                entries.append(
                    pb.InteractionFeedEntry(cursor=self.cursors.text(position), customer_merge=step.merge)
                )
        caught_up = reached_head and not pending
        if caught_up:
            position = Cursor(head)
        return FeedPage(entries, position, caught_up)

    def _steps(self, row: _EventRow, since: Cursor, decisions: dict[tuple[str, str], bool]) -> list[_Step]:
        """The steps through one event (from where `since` left it); one step passing over
        the whole event when it gives nothing or the customer does not consent."""
        done = [_Step(row.seq, 0)]
        key = (row.owner, row.data_category)
        allowed = decisions.get(key)
        if allowed is None:
            decision = self.consent.check_fresh(row.owner, PURPOSE, [row.data_category], self.max_staleness)
            if decision is None:
                raise consent_state_stale("serve interactions")
            allowed = decisions[key] = decision.allowed
        if not allowed:
            return done
        found = interactions_of(row.event, self.weights)
        if not row.event.resolved_customer_id:
            for interaction in found:
                interaction.customer_id = row.owner
        skip = since.items if row.seq == since.seq else 0
        steps = [
            _Step(row.seq, 0 if index + 1 == len(found) else index + 1, interaction)
            for index, interaction in enumerate(found)
            if index >= skip
        ]
        return steps or done

    def _require_fresh_consent(self) -> None:
        if self.consent.staleness > self.max_staleness:
            raise consent_state_stale("serve interactions")

    # -- following ---------------------------------------------------------------------

    async def watch(self, since: Cursor) -> AsyncIterator[tuple[list[pb.InteractionFeedEntry], str]]:
        """(entries, resume cursor) batches: the backlog after `since`, then new entries as
        they commit; ([], cursor) is a heartbeat, sent once caught up and then when idle.

        A batch resumes from its last entry (the proto); what was passed over after it
        (not consented, no items) is skipped by the next heartbeat's cursor."""
        with self.watched():
            position = since
            caught_up_before = False
            last_sent, last_read = time.monotonic(), 0.0
            while True:
                if self.closing:
                    raise Unavailable(
                        "the server is shutting down: watch again from the last resume_cursor",
                        reason="SERVER_SHUTTING_DOWN",
                    )
                pause = MIN_READ_INTERVAL_SECONDS - (time.monotonic() - last_read)
                if pause > 0:
                    await asyncio.sleep(pause)
                last_read = time.monotonic()
                page = await self.page(position, WATCH_BATCH)
                position = page.resume
                if page.entries:
                    yield page.entries, page.entries[-1].cursor
                    last_sent = time.monotonic()
                if not page.caught_up:
                    continue
                idle = time.monotonic() - last_sent
                if not caught_up_before or idle >= self.heartbeat_seconds:
                    yield [], self.cursors.text(position)
                    last_sent = time.monotonic()
                    idle = 0.0
                caught_up_before = True
                # Caught up, the position is the head read: a commit since then (poked, or
                # found by the poll) moves the feed past it.
                self.advance(position.seq)
                await self.wait_beyond(position.seq, self.heartbeat_seconds - idle)


def _merge_step(row: _MergeRow) -> _Step:
    notice = pb.CustomerMerge(
        source_customer_id=row.source,
        target_customer_id=row.target,
        merge_time=timestamp_of(row.merged_at_us),
    )
    return _Step(row.seq, 0, merge=notice)
