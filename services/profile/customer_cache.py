"""The answers of GetCustomer for callers that see PII masked, kept in memory by customer id.

GetCustomer is the profile service's hottest read; building its answer takes two
queries and three AES-GCM decryptions (~1 ms of server CPU per call, against ~0.2 ms for
the gRPC floor: bench/profile_bench.py). The answer changes only when the customer's
row does, so a replica keeps the answers it built and drops one when its customer
changes:

- every write path of this process invalidates the customers it changed once its
  transaction has committed (ProfileStore.customers_changed), so a caller reads its own
  writes at once;
- on PostgreSQL, where several replicas share the data, a trigger announces every
  change to `customers` and `merges` (migration 0005) and each replica's
  CustomerChangeListener (customer_changes.py) invalidates on the notice. Until that
  listener is connected, and while it reconnects, the cache is off (every read goes to
  the database), so a missed notice can never leave an old answer behind. A replica
  may answer with the old profile for the moment the notice is in flight (~1 ms on one
  network), as a read from a replica would;
- on SQLite the data belongs to one process, so its own invalidations are all there are.

Only masked answers are kept: the cache never holds decrypted PII (admin reads, which
reveal it, go to the database). An answer holds an age band, worked out for the
current year, so the cache empties when the year turns.

Reads run on the event loop; invalidations also come from the listener's thread. A
read that started before an invalidation must not store what it read afterwards (it
may be the old row): `generation` is taken before reading, and `put` stores only if no
invalidation came in between, under a lock that invalidations take too.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections.abc import Iterable
from typing import Any


def _end_of_year(now: float) -> float:
    year = dt.datetime.fromtimestamp(now, dt.UTC).year
    return dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC).timestamp()


class CustomerCache:
    """Up to `capacity` answers by customer id, the oldest dropped first; 0 keeps none."""

    def __init__(self, capacity: int, enabled: bool = True):
        self.capacity = capacity
        self._entries: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.generation = 0  # changes on every invalidation
        self._enabled = enabled and capacity > 0
        self._year_ends = _end_of_year(time.time())

    @property
    def enabled(self) -> bool:
        return self._enabled

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, customer_id: str) -> Any | None:
        """The kept answer, or None (none kept, or the cache is off)."""
        if time.time() >= self._year_ends:
            self.clear()  # answers hold age bands of the year that ended
            self._year_ends = _end_of_year(time.time())
        return self._entries.get(customer_id)

    def put(self, customer_id: str, answer: Any, generation: int) -> None:
        """Keeps `answer`, read after `generation` was taken, unless the cache was invalidated
        since (it may then be older than the change) or is off."""
        with self._lock:
            if not self._enabled or generation != self.generation:
                return
            entries = self._entries
            if customer_id not in entries and len(entries) >= self.capacity:
                del entries[next(iter(entries))]
            entries[customer_id] = answer

    def invalidate(self, customer_ids: Iterable[str]) -> None:
        """Drops the answers of these customers (after their change committed)."""
        with self._lock:
            self.generation = next(self._counter)
            for customer_id in customer_ids:
                self._entries.pop(customer_id, None)

    def clear(self) -> None:
        with self._lock:
            self.generation = next(self._counter)
            self._entries.clear()

    def disable(self) -> None:
        """Keeps nothing and answers nothing until enable(): changes may go unseen meanwhile."""
        with self._lock:
            self._enabled = False
            self.generation = next(self._counter)
            self._entries.clear()

    def enable(self) -> None:
        """Starts keeping answers again (once changes are seen again), from empty."""
        with self._lock:
            self.generation = next(self._counter)
            self._entries.clear()
            self._enabled = self.capacity > 0
