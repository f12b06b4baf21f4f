"""Each customer's newest entries of the local consented interaction copy, cached for serving.

Recommend reads a customer's history on every request (the fold-in of fresh events, the
already-bought mask); the copy changes only through InteractionCopy (feed entries,
merges, consent sweeps, erasure, a resync), which tells this cache what it touched. A
read racing such a change is not cached (generation check), so a cached history is never
older than the last change the copy made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from sqlalchemy.engine import Connection

from services.recommendation.interactions import interactions
from shared.db import Database

# The newest entries per customer that serving looks at.
HISTORY_LENGTH = 200
MAX_CUSTOMERS = 100_000


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    interaction_type: profile_pb.InteractionType.ValueType
    weight: float
    data_category: str
    stored_at_us: int


def read_history(
    connection: Connection, customer_id: str, limit: int = HISTORY_LENGTH
) -> tuple[HistoryEntry, ...]:
    """The customer's newest `limit` entries, newest first."""
    rows: Iterable[Any] = connection.execute(
        sa.select(
            interactions.c.item_id,
            interactions.c.interaction_type,
            interactions.c.weight,
            interactions.c.data_category,
            interactions.c.stored_at_us,
        )
        .where(interactions.c.customer_id == customer_id)
        .order_by(interactions.c.interaction_id.desc())
        .limit(limit)
    )
    return tuple(HistoryEntry(*row) for row in rows)


class CustomerHistory:
    def __init__(self, database: Database, max_customers: int = MAX_CUSTOMERS):
        self.db = database
        self.max_customers = max_customers
        self._cached: OrderedDict[str, tuple[HistoryEntry, ...]] = OrderedDict()
        self._generation = 0

    async def of(self, customer_id: str) -> tuple[HistoryEntry, ...]:
        found = self._cached.get(customer_id)
        if found is not None:
            self._cached.move_to_end(customer_id)
            return found
        generation = self._generation
        found = await self.db.read(lambda connection: read_history(connection, customer_id))
        if generation == self._generation:
            self._cached[customer_id] = found
            if len(self._cached) > self.max_customers:
                self._cached.popitem(last=False)
        return found

    def changed(self, customer_ids: Iterable[str] | None) -> None:
        """These customers' entries changed (None: anyone's may have)."""
        self._generation += 1
        if customer_ids is None:
            self._cached.clear()
            return
        for customer_id in customer_ids:
            self._cached.pop(customer_id, None)
