"""The recommendation service's tables and queries (SQLAlchemy Core)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.recommendation.catalog import Item, Outcome, UpsertResult, category_key, outcome_of
from shared.db import Database, now_micros
from shared.idempotency import Idempotency

T = TypeVar("T")

metadata = sa.MetaData()

# Byte order on PostgreSQL too (whatever the database's locale), so that item_id order,
# and with it keyset paging, is the same as on SQLite and in Python.
ITEM_ID = sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql")

items = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", ITEM_ID, primary_key=True),
    sa.Column("title", sa.String(256), nullable=False),
    sa.Column("category_path", sa.Text, nullable=False),  # JSON list of segments
    sa.Column("category_key", sa.Text, nullable=False),  # "grocery/coffee/beans/", see catalog.category_key
    sa.Column("brand", sa.String(128), nullable=False),
    sa.Column("price_micros", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), nullable=False),
    sa.Column("tags", sa.Text, nullable=False),  # JSON list, as sent
    sa.Column("available", sa.Boolean, nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),  # JSON object, keys sorted
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    # Set by DeleteItem: the row stays as a tombstone that serving sees (migration 0005).
    sa.Column("delete_time_us", sa.BigInteger, nullable=True),
)

serving_erasures = sa.Table(
    "serving_erasures",
    metadata,
    sa.Column("customer_ref", sa.String(64), primary_key=True),  # keyed hash of the customer id
    sa.Column("erase_time_us", sa.BigInteger, nullable=False),
)

LIVE = items.c.delete_time_us.is_(None)

UPSERT_ITEMS = "UpsertItems"
# Ids per `IN (...)` list, well below SQLite's and PostgreSQL's bound-parameter limits.
LOOKUP_CHUNK = 500


def _item(row: sa.Row[Any]) -> Item:
    return Item(
        item_id=row.item_id,
        title=row.title,
        category_path=tuple(json.loads(row.category_path)),
        brand=row.brand,
        price_micros=row.price_micros,
        currency_code=row.currency_code,
        tags=tuple(json.loads(row.tags)),
        available=bool(row.available),
        attributes=json.loads(row.attributes),
        create_time_us=row.create_time_us,
        update_time_us=row.update_time_us,
    )


def _row(item: Item, create_time_us: int, update_time_us: int) -> dict[str, Any]:
    return {
        "item_id": item.item_id,
        "title": item.title,
        "category_path": json.dumps(list(item.category_path)),
        "category_key": category_key(item.category_path),
        "brand": item.brand,
        "price_micros": item.price_micros,
        "currency_code": item.currency_code,
        "tags": json.dumps(list(item.tags)),
        "available": item.available,
        "attributes": json.dumps(dict(item.attributes), sort_keys=True),
        "create_time_us": create_time_us,
        "update_time_us": update_time_us,
        "delete_time_us": None,
    }


def _encode_results(results: Sequence[UpsertResult]) -> bytes:
    return json.dumps(
        [
            {"item_id": r.item_id, "outcome": r.outcome.value, "update_time_us": r.update_time_us}
            for r in results
        ]
    ).encode()


def _decode_results(stored: bytes) -> list[UpsertResult]:
    return [
        UpsertResult(entry["item_id"], Outcome(entry["outcome"]), entry["update_time_us"])
        for entry in json.loads(stored)
    ]


class RecommendationStore:
    def __init__(self, database: Database, idempotency: Idempotency):
        self.db = database
        self.idempotency = idempotency

    async def upsert_items(
        self, principal: str, request: Message, batch: Sequence[Item]
    ) -> list[UpsertResult]:
        """Writes a validated batch in one transaction; a known request id returns its first results."""

        def work(connection: Connection) -> bytes:
            now = now_micros()
            existing, deleted = _locked_items(connection, [item.item_id for item in batch])
            results: list[UpsertResult] = []
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            for item in batch:
                old = existing.get(item.item_id)
                outcome = outcome_of(None if deleted.get(item.item_id) else old, item)
                update_time_us = now
                if old is None:
                    inserts.append(_row(item, now, now))
                elif deleted.get(item.item_id):
                    # A deleted id is created again: a new item from now on.
                    updates.append({**_row(item, now, now), "key": item.item_id})
                elif outcome is Outcome.UPDATED:
                    updates.append({**_row(item, old.create_time_us, now), "key": item.item_id})
                else:
                    update_time_us = old.update_time_us
                results.append(UpsertResult(item.item_id, outcome, update_time_us))
            # Rows in item_id order, so concurrent batches on PostgreSQL take their locks in one order.
            if inserts:
                connection.execute(items.insert(), sorted(inserts, key=lambda row: row["item_id"]))
            if updates:
                connection.execute(
                    items.update().where(items.c.item_id == sa.bindparam("key")),
                    sorted(updates, key=lambda row: row["item_id"]),
                )
            return _encode_results(results)

        # A copy that lost a race to another writer is re-run by Database.write and
        # then finds the winner's stored response.
        return _decode_results(
            await self.db.write(lambda c: self.idempotency.once(c, principal, UPSERT_ITEMS, request, work))
        )

    async def get_item(self, item_id: str) -> Item | None:
        def query(connection: Connection) -> Item | None:
            row = connection.execute(sa.select(items).where(items.c.item_id == item_id, LIVE)).first()
            return _item(row) if row else None

        return await self.db.read(query)

    async def delete_item(self, item_id: str) -> int | None:
        """Marks the item deleted; returns the deletion time, or None when there is no live item."""

        def work(connection: Connection) -> int | None:
            now = now_micros()
            deleted = connection.execute(
                items.update()
                .where(items.c.item_id == item_id, LIVE)
                .values(delete_time_us=now, update_time_us=now)
            ).rowcount
            return now if deleted else None

        return await self.db.write(work)

    async def list_items(
        self, after: str, limit: int, category_prefix: Sequence[str], available_only: bool
    ) -> tuple[list[Item], bool]:
        """Up to `limit` items with ids after `after`, in id order (keyset paging), and whether
        more follow."""
        prefix = category_key(category_prefix)

        def query(connection: Connection) -> tuple[list[Item], bool]:
            select = sa.select(items).where(items.c.item_id > after, LIVE)
            if prefix:
                # substr, not LIKE: exact and case-sensitive on both back ends, no wildcards to escape.
                select = select.where(sa.func.substr(items.c.category_key, 1, len(prefix)) == prefix)
            if available_only:
                select = select.where(items.c.available.is_(True))
            rows = connection.execute(select.order_by(items.c.item_id).limit(limit + 1)).all()
            return [_item(row) for row in rows[:limit]], len(rows) > limit

        return await self.db.read(query)


def catalog_items(connection: Connection) -> list[Item]:
    """The whole catalog, unavailable items included, in item_id order (training reads it)."""
    return [_item(row) for row in connection.execute(sa.select(items).where(LIVE).order_by(items.c.item_id))]


def catalog_changes(connection: Connection, since_us: int) -> list[tuple[Item, bool]]:
    """Items (deleted ones too, flagged True) changed at or after `since_us`: what the serving
    catalog follows."""
    rows = connection.execute(sa.select(items).where(items.c.update_time_us >= since_us))
    return [(_item(row), row.delete_time_us is not None) for row in rows]


def newest_item_update_us(connection: Connection) -> int:
    """The latest update_time_us in the items table (0 when empty; items_by_update_time)."""
    return int(connection.execute(sa.select(sa.func.max(items.c.update_time_us))).scalar() or 0)


def _locked_items(connection: Connection, item_ids: Sequence[str]) -> tuple[dict[str, Item], dict[str, bool]]:
    """The stored items among `item_ids` (and whether each is deleted), locked for this
    transaction (PostgreSQL) in id order."""
    found: dict[str, Item] = {}
    deleted: dict[str, bool] = {}
    ordered = sorted(set(item_ids))
    for start in range(0, len(ordered), LOOKUP_CHUNK):
        chunk = ordered[start : start + LOOKUP_CHUNK]
        rows = connection.execute(
            sa.select(items).where(items.c.item_id.in_(chunk)).order_by(items.c.item_id).with_for_update()
        )
        for row in rows:
            found[row.item_id] = _item(row)
            deleted[row.item_id] = row.delete_time_us is not None
    return found, deleted
