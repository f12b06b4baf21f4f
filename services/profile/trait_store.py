"""Trait aggregates and timeline reads: the tables of migration 0004 and their queries.

The trait worker (services/profile/trait_worker.py) follows `events` by seq, in batches.
It reads a batch and turns it into aggregate rows in a read transaction (`read_batch`),
so the decoding and arithmetic never hold the write lock (SQLite has one writer), then
adds the rows and moves the cursor in a short write transaction (`write_batch`), which
first checks, under the cursor row lock, that the cursor and its generation are still
those the batch was read at; otherwise it reads again. So each event is counted exactly
once, replicas' workers take turns, and a restart resumes where the last commit left.

Everything that rewrites a customer's aggregates outside that feed increments the cursor
row's generation (which also takes its lock until commit), so a batch read before it is
read again:

- `rebuild(connection, customer_id)` recomputes one customer from their events with seq
  up to the cursor (the later ones are still to come through the feed). Call it in the
  transaction that moved events to the customer, after moving them: MergeCustomers calls
  it for the target (it also drops the aggregates of every customer merged into it).
- `erase_traits(connection, customer_id)` deletes a customer's aggregates; erasure calls
  it in its transaction.

Aggregates hold one row per order, per (item, order) and per (category, interaction
kind); see traits.py for what each one means. Adding to them is an insert or an
addition in SQL: no stored row is read first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import DecodeError
from najimi.profile.v1 import profile_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.profile.store import customers, erased_error, erasure_of, event_head, events, merges
from services.profile.traits import (
    AffinityStat,
    CustomerAggregates,
    Decayed,
    ItemPurchase,
    Order,
    StoredEvent,
    aggregates_of,
    category_key,
    category_path_text,
)
from shared.db import insert_rows
from shared.errors import FailedPrecondition, NotFound

metadata = sa.MetaData()

# The single row (id 1): the seq of the last event added to the aggregates, and a
# generation counter that every rewrite outside the feed (rebuild, erasure) increments.
trait_cursor = sa.Table(
    "trait_cursor",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
)

trait_orders = sa.Table(
    "trait_orders",
    metadata,
    sa.Column("customer_id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
    sa.Column("value_micros", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), nullable=False),
    sa.Column("channel", sa.SmallInteger, nullable=False),
    sa.Column("store_id", sa.String(64), nullable=False),
    sa.Column("data_category", sa.String(64), nullable=False),
    sqlite_with_rowid=False,
)

trait_item_purchases = sa.Table(
    "trait_item_purchases",
    metadata,
    sa.Column("customer_id", sa.String(128), primary_key=True),
    sa.Column("item_id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
    sa.Column("data_category", sa.String(64), nullable=False),
    sqlite_with_rowid=False,
)

trait_affinities = sa.Table(
    "trait_affinities",
    metadata,
    sa.Column("customer_id", sa.String(128), primary_key=True),
    sa.Column("category_key", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("category_path", sa.Text, nullable=False),
    sa.Column("data_category", sa.String(64), nullable=False),
    sa.Column("interactions", sa.BigInteger, nullable=False),
    sa.Column("weight", sa.Double, nullable=False),  # decayed weight at STORAGE_EPOCH_US
    sa.Column("last_at_us", sa.BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

AGGREGATE_TABLES = (trait_orders, trait_item_purchases, trait_affinities)
# Stored affinity weights are their value at this time (2025-01-01T00:00Z), so that adding
# a new interaction is an addition in SQL. A weight 2^((t - epoch) / half-life) grows by 2^12
# a year with the 30-day half-life and overflows a double around 2107: re-base (multiply
# every weight by 2^-k and move the epoch) well before then.
STORAGE_EPOCH_US = 1_735_689_600_000_000
EVENT_COLUMNS = (
    events.c.seq,
    events.c.customer_id,
    events.c.event_type,
    events.c.channel,
    events.c.data_category,
    events.c.occurred_at_us,
    events.c.value_micros,
    events.c.currency_code,
    events.c.payload,
)


# -- customers ---------------------------------------------------------------------------------


def require_live_customer(connection: Connection, customer_id: str) -> None:
    """Raises NOT_FOUND for an unknown or erased customer, FAILED_PRECONDITION for a merged one."""
    row = connection.execute(
        sa.select(customers.c.merged_into).where(customers.c.customer_id == customer_id)
    ).first()
    if row is None:
        if erasure_of(connection, customer_id) is not None:
            raise erased_error(customer_id)
        raise NotFound(f"customer {customer_id} not found", reason="CUSTOMER_NOT_FOUND")
    if row.merged_into:
        raise FailedPrecondition(
            f"customer {customer_id} was merged into {row.merged_into}",
            reason="CUSTOMER_MERGED",
            metadata={"merged_into": row.merged_into},
        )


# -- the feed of events --------------------------------------------------------------------------


def decoded(row: Any) -> StoredEvent:
    """A row of EVENT_COLUMNS with its payload decoded (an undecodable one as an empty Event)."""
    # The columns but the payload are StoredEvent's fields, in order: taken by position,
    # cheaper than by name, for every event.
    try:
        event = pb.Event.FromString(row[-1])
    except DecodeError:
        event = pb.Event()
    return StoredEvent._make((*row[:-1], event))


@dataclass(frozen=True)
class Batch:
    """The next events after the cursor, turned into rows to add (outside the write lock)."""

    cursor: int  # the cursor the batch starts after
    generation: int  # the cursor row's generation when the batch was read
    last: int  # the cursor after the batch
    event_count: int
    rows: dict[str, list[tuple[Any, ...]]]
    behind: bool = False  # committed events remain after `last`: read again at once


@dataclass(frozen=True)
class Committed:
    """What one ingestion transaction stored, handed to the trait worker in memory so that
    it need not read and decode the events again: every seq from `first` to `last` was
    allocated by that transaction, `events` are those it stored (the others were
    duplicates), and `generation` is the trait cursor's generation it saw under the event
    order lock. Any later change to those events (a merge moving them, an erasure) moves
    the generation on, and the worker then reads them from the table instead."""

    first: int
    last: int
    generation: int
    events: list[StoredEvent]


def event_head_seq(connection: Connection) -> int:
    """The seq of the newest committed event (0 before the first)."""
    return int(connection.execute(sa.select(event_head.c.seq).where(event_head.c.id == 1)).scalar_one())


def read_cursor(connection: Connection) -> int:
    return int(connection.execute(sa.select(trait_cursor.c.seq).where(trait_cursor.c.id == 1)).scalar_one())


def cursor_generation(connection: Connection) -> int:
    return int(
        connection.execute(sa.select(trait_cursor.c.generation).where(trait_cursor.c.id == 1)).scalar_one()
    )


def _from_memory(
    committed: Iterable[Committed], cursor: int, generation: int, head: int, limit: int
) -> tuple[list[StoredEvent], int] | None:
    """The events right after the cursor from `committed` (in seq order), when it holds them
    all and they are still as stored: their seqs follow on from the cursor without a gap,
    up to the head at most, and the generation did not move. None when it cannot say."""
    events: list[StoredEvent] = []
    last = cursor
    for stored in committed:
        if stored.last <= last:
            continue  # added already
        if stored.first != last + 1 or stored.generation != generation or stored.last > head:
            break
        if events and len(events) + len(stored.events) > limit:
            break
        events += stored.events
        last = stored.last
    return (events, last) if last > cursor else None


def read_batch(connection: Connection, limit: int, committed: Iterable[Committed] = ()) -> Batch:
    """Up to `limit` events after the cursor, as aggregate rows; run in a read transaction.

    The events come from `committed` (the worker's in-memory copies of this process's
    recent commits) when it holds those right after the cursor, else from the table."""
    cursor = connection.execute(
        sa.select(trait_cursor.c.seq, trait_cursor.c.generation).where(trait_cursor.c.id == 1)
    ).one()
    # The head first: every event up to it has committed (the head moves in the inserting
    # transaction), so when fewer than `limit` come back the cursor may move to the head,
    # past seqs that hold no event (duplicates, merges, erased events).
    head = event_head_seq(connection)
    known = _from_memory(committed, int(cursor.seq), int(cursor.generation), head, limit)
    if known is not None:
        stored, last = known
    else:
        rows = connection.execute(
            sa.select(*EVENT_COLUMNS)
            .where(events.c.seq > cursor.seq, events.c.seq <= head)
            .order_by(events.c.seq)
            .limit(limit)
        ).all()
        last = int(rows[-1].seq) if len(rows) == limit else max(head, int(cursor.seq))
        stored = [decoded(row) for row in rows]
    added = aggregates_of(stored)
    return Batch(
        int(cursor.seq), int(cursor.generation), last, len(stored), aggregate_rows(added), last < head
    )


def write_batch(connection: Connection, batch: Batch) -> bool:
    """Adds `batch` and moves the cursor past it; False (and nothing written) when the cursor
    moved or the aggregates were rewritten since the batch was read: read it again."""
    current = connection.execute(
        sa.select(trait_cursor.c.seq, trait_cursor.c.generation)
        .where(trait_cursor.c.id == 1)
        .with_for_update()
    ).one()
    if (int(current.seq), int(current.generation)) != (batch.cursor, batch.generation):
        return False
    write_rows(connection, batch.rows)
    if batch.last != batch.cursor:
        connection.execute(trait_cursor.update().where(trait_cursor.c.id == 1).values(seq=batch.last))
    return True


def _new_generation(connection: Connection) -> int:
    """Takes the cursor row lock, marks the aggregates rewritten; returns the cursor."""
    connection.execute(
        trait_cursor.update().where(trait_cursor.c.id == 1).values(generation=trait_cursor.c.generation + 1)
    )
    return read_cursor(connection)


# -- writing aggregates -------------------------------------------------------------------------


def _greatest(connection: Connection, *values: Any) -> Any:
    # SQLite's max() with several arguments is the scalar maximum, PostgreSQL's is greatest().
    return (sa.func.greatest if connection.dialect.name == "postgresql" else sa.func.max)(*values)


def _insert_new(connection: Connection, table: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """Inserts `rows`, skipping those whose primary key is there (the same event again)."""
    keys = [column.name for column in table.primary_key.columns]
    insert_rows(connection, table, rows, lambda insert: insert.on_conflict_do_nothing(index_elements=keys))


def _add_sums(
    connection: Connection, table: sa.Table, rows: list[tuple[Any, ...]], sums: tuple[str, ...], latest: str
) -> None:
    """Inserts `rows`, or adds their `sums` columns to the stored row and keeps the later `latest`."""
    keys = [column.name for column in table.primary_key.columns]

    def add(insert: Any) -> Any:
        changes: dict[str, Any] = {name: table.c[name] + insert.excluded[name] for name in sums}
        changes[latest] = _greatest(connection, table.c[latest], insert.excluded[latest])
        return insert.on_conflict_do_update(index_elements=keys, set_=changes)

    insert_rows(connection, table, rows, add)


def stored_weight(weight: Decayed) -> float:
    """A decayed weight as stored: its value at STORAGE_EPOCH_US, so that stored weights add."""
    return weight.at(STORAGE_EPOCH_US)


def _affinity_of(row: Any) -> AffinityStat:
    return AffinityStat(
        tuple(json.loads(row.category_path)),
        row.kind,
        row.data_category,
        int(row.interactions),
        Decayed(float(row.weight), STORAGE_EPOCH_US),
        int(row.last_at_us),
    )


def aggregate_rows(added: dict[str, CustomerAggregates]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows that add `added` (customer id -> what new events contribute), by table, each
    row a tuple in its table's column order."""
    return {
        # Order and ItemPurchase hold their tables' columns after customer_id, in order.
        "trait_orders": [
            (customer_id, *order) for customer_id, aggregates in added.items() for order in aggregates.orders
        ],
        "trait_item_purchases": [
            (customer_id, *purchase)
            for customer_id, aggregates in added.items()
            for purchase in aggregates.item_purchases
        ],
        "trait_affinities": [
            (
                customer_id,
                category_key(s.category_path),
                s.kind,
                category_path_text(s.category_path),
                s.data_category,
                s.interactions,
                stored_weight(s.weight),
                s.last_at_us,
            )
            for customer_id, aggregates in added.items()
            for s in aggregates.affinities.values()
        ],
    }


def write_rows(connection: Connection, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """Adds aggregate rows: every change is an insert or an addition in SQL, without reading
    the stored rows first. The caller holds the cursor row lock."""
    _insert_new(connection, trait_orders, rows["trait_orders"])
    _insert_new(connection, trait_item_purchases, rows["trait_item_purchases"])
    _add_sums(
        connection,
        trait_affinities,
        rows["trait_affinities"],
        sums=("interactions", "weight"),
        latest="last_at_us",
    )


def _delete_aggregates(connection: Connection, customer_id: str) -> int:
    return sum(
        connection.execute(table.delete().where(table.c.customer_id == customer_id)).rowcount
        for table in AGGREGATE_TABLES
    )


def rebuild(connection: Connection, customer_id: str) -> None:
    """Recomputes `customer_id`'s aggregates from their events, in the caller's transaction.

    Events after the cursor are left to the worker, which adds them to whoever holds them
    then. The aggregates of customers merged into this one (table `merges`) are dropped:
    their events are this customer's now.
    """
    cursor = _new_generation(connection)
    _delete_aggregates(connection, customer_id)
    sources = (
        connection.execute(
            sa.select(merges.c.source_customer_id).where(merges.c.target_customer_id == customer_id)
        )
        .scalars()
        .all()
    )
    for source in sources:
        _delete_aggregates(connection, source)
    rows = connection.execute(
        sa.select(*EVENT_COLUMNS)
        .where(events.c.customer_id == customer_id, events.c.seq <= cursor)
        .order_by(events.c.seq)
    )
    write_rows(connection, aggregate_rows(aggregates_of(decoded(row) for row in rows)))


def erase_traits(connection: Connection, customer_id: str) -> int:
    """Deletes `customer_id`'s aggregates in the caller's transaction; returns the rows deleted."""
    _new_generation(connection)
    return _delete_aggregates(connection, customer_id)


# -- reading aggregates ---------------------------------------------------------------------------


def load_aggregates(connection: Connection, customer_id: str) -> CustomerAggregates:
    """Everything the traits of `customer_id` are computed from."""
    aggregates = CustomerAggregates()
    for row in connection.execute(sa.select(trait_orders).where(trait_orders.c.customer_id == customer_id)):
        aggregates.orders.append(
            Order(
                int(row.seq),
                row.kind,
                int(row.occurred_at_us),
                int(row.value_micros),
                row.currency_code,
                int(row.channel),
                row.store_id,
                row.data_category,
            )
        )
    for row in connection.execute(
        sa.select(trait_item_purchases).where(trait_item_purchases.c.customer_id == customer_id)
    ):
        aggregates.item_purchases.append(
            ItemPurchase(row.item_id, int(row.seq), int(row.occurred_at_us), row.data_category)
        )
    for row in connection.execute(
        sa.select(trait_affinities).where(trait_affinities.c.customer_id == customer_id)
    ):
        aggregates.add_affinity(_affinity_of(row))
    return aggregates


# -- the timeline -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventQuery:
    """One page of a customer's timeline: newest first, after `after` (occurred_at_us, seq)."""

    customer_id: str
    event_types: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    start_us: int | None = None
    end_us: int | None = None
    after: tuple[int, int] | None = None
    limit: int = 100
    # The filters as the page token carries them (a token is valid for these only).
    filters: dict[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TimelineEntry:
    seq: int
    occurred_at_us: int
    event: pb.Event


def _timeline_event(row: Any) -> pb.Event:
    try:
        event = pb.Event.FromString(row.payload)
    except DecodeError:
        # Not expected (ingestion writes payloads); the indexed columns still say what happened.
        event = pb.Event(
            event_id=row.event_id,
            event_type=row.event_type,  # type: ignore[arg-type]
            channel=row.channel,  # type: ignore[arg-type]
            data_category=row.data_category,
            value_micros=row.value_micros,
            currency_code=row.currency_code,
        )
        event.occur_time.FromMicroseconds(row.occurred_at_us)
        event.receive_time.FromMicroseconds(row.received_at_us)
    # The customer holding the event now (it may have come here with a merge).
    event.resolved_customer_id = row.customer_id
    return event


def list_events(
    connection: Connection, query: EventQuery, data_categories: Iterable[str]
) -> list[TimelineEntry]:
    """Up to `query.limit` events of the customer in `data_categories`, newest occur_time first."""
    categories = sorted(set(data_categories))
    if not categories:
        return []
    select = sa.select(events).where(
        events.c.customer_id == query.customer_id, events.c.data_category.in_(categories)
    )
    if query.event_types:
        select = select.where(events.c.event_type.in_(sorted(set(query.event_types))))
    if query.channels:
        select = select.where(events.c.channel.in_(sorted(set(query.channels))))
    if query.start_us is not None:
        select = select.where(events.c.occurred_at_us >= query.start_us)
    if query.end_us is not None:
        select = select.where(events.c.occurred_at_us < query.end_us)
    if query.after is not None:
        at, seq = query.after
        select = select.where(
            sa.or_(
                events.c.occurred_at_us < at,
                sa.and_(events.c.occurred_at_us == at, events.c.seq < seq),
            )
        )
    rows = connection.execute(
        select.order_by(events.c.occurred_at_us.desc(), events.c.seq.desc()).limit(query.limit)
    )
    return [TimelineEntry(int(row.seq), int(row.occurred_at_us), _timeline_event(row)) for row in rows]
