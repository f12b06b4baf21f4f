"""The catalog as serving sees it: every item's availability, deletion, categories and
popularity, in arrays, with the candidate masks of each filter cached.

Every replica holds one, loaded at start and then following the items table by
update_time_us (every POLL_SECONDS; DeleteItem and UpsertItems also apply their own
changes at once, so the replica that took a write masks a deleted or unavailable item
from its very next request). Items are never removed from the table, so its newest
update_time_us is never below that of an item already applied, unless the database was
restored to an earlier point (or a replica with a slower clock rewrote the newest item):
a poll that finds it lower loads the whole catalog again, which is right in either case.
Popularity is each item's interaction count in the local consented copy, recounted every
POPULARITY_SECONDS: what non-personalised results rank by.

A snapshot is immutable: a request works on the one it took, while changes build the next.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.recommendation.catalog import Item, category_key
from services.recommendation.interactions import interactions
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.new_items import NewItem
from services.recommendation.serving.scorer import Candidates, scored_exactly
from services.recommendation.store import catalog_changes, newest_item_update_us
from services.recommendation.training.features import item_metadata
from shared.db import Database, now_micros
from shared.log import get_logger
from shared.tasks import cancel_and_wait

log = get_logger("najimi.recommendation.serving_catalog")

POLL_SECONDS = 1.0
POPULARITY_SECONDS = 30.0
# A write's update_time is taken before it commits: each poll re-reads this much before
# the newest time it saw, so a transaction that committed late is not passed over. It
# need not go back further than this much before the previous poll began either (what
# was written before that had committed then, and that poll read it): without that
# bound, a bulk load followed by no write was read again in full on every poll.
POLL_OVERLAP_US = 10_000_000
MAX_CACHED_MASKS = 256
# A filter keeping at most this share of the model's items, asked for a second time, has
# its Candidates (its rows' vectors, copied contiguous) kept, so a request multiplies only
# those. At most MAX_CANDIDATE_BYTES of them per snapshot, the least recently used let go
# first, and none larger than a sixteenth of that (10,000 items at 64 dimensions: 1.3 MB
# for half of them; 8 MB is about 31,000 items). A copy costs a few products of its rows:
# one asked once is never made, and filters that keep evicting each other cost at most that.
CANDIDATES_BELOW_SHARE = 0.75
MAX_CANDIDATE_BYTES = 128 << 20
CANDIDATE_BUDGET_PARTS = 16


@dataclass(frozen=True)
class CatalogEntry:
    category_key: str  # "grocery/coffee/beans/"
    category_path: tuple[str, ...]
    available: bool
    deleted: bool
    title: str = ""
    features: tuple[str, ...] = ()  # its metadata features as training names them (item_metadata)


@dataclass(eq=False)
class CatalogSnapshot:
    """One immutable state of the catalog, items in item_id order."""

    ids: list[str]
    rows: dict[str, int]
    entries: list[CatalogEntry]
    live: np.ndarray  # bool [n]: in the catalog (not deleted)
    available: np.ndarray  # bool [n]: live and available
    popularity: np.ndarray  # float64 [n]: interaction count
    by_popularity: np.ndarray  # int64 [n]: rows, most popular first (ties by item_id)
    _masks: dict[tuple[tuple[str, ...], bool], np.ndarray] = field(default_factory=dict)
    _model_rows: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    _model_masks: dict[tuple[tuple[str, str], tuple[str, ...], bool], np.ndarray] = field(
        default_factory=dict
    )
    _candidates: OrderedDict[tuple[tuple[str, str], tuple[str, ...], bool], Candidates | None] = field(
        default_factory=OrderedDict
    )
    _asked: set[tuple[tuple[str, str], tuple[str, ...], bool]] = field(default_factory=set)
    _candidate_bytes: int = 0

    def mask(self, prefixes: tuple[str, ...], include_unavailable: bool) -> np.ndarray:
        """Catalog rows a filter allows (category keys as category_key() makes them). Do not modify."""
        key = (prefixes, include_unavailable)
        found = self._masks.get(key)
        if found is None:
            found = (self.live if include_unavailable else self.available).copy()
            if prefixes:
                found &= np.fromiter(
                    (entry.category_key.startswith(prefixes) for entry in self.entries),
                    dtype=bool,
                    count=len(self.entries),
                )
            found.setflags(write=False)
            _bounded(self._masks)[key] = found
        return found

    def model_rows(self, model: ServingModel) -> np.ndarray:
        """For each item row of `model`, its catalog row, or -1 when the catalog lacks it."""
        found = self._model_rows.get(model.key)
        if found is None:
            found = np.fromiter(
                (self.rows.get(item_id, -1) for item_id in model.item_ids),
                dtype=np.int64,
                count=len(model.item_ids),
            )
            _bounded(self._model_rows)[model.key] = found
        return found

    def model_mask(
        self, model: ServingModel, prefixes: tuple[str, ...], include_unavailable: bool
    ) -> np.ndarray:
        """The model's item rows a filter allows (items the catalog lacks never). Do not modify."""
        key = (model.key, prefixes, include_unavailable)
        found = self._model_masks.get(key)
        if found is None:
            # Row -1 (not in the catalog) picks the appended False.
            found = np.append(self.mask(prefixes, include_unavailable), False)[self.model_rows(model)]
            found.setflags(write=False)
            _bounded(self._model_masks)[key] = found
        return found

    def model_candidates(
        self, model: ServingModel, prefixes: tuple[str, ...], include_unavailable: bool
    ) -> Candidates | None:
        """The Candidates of model_mask (scorer.py), from the filter's second request on, when
        the model is scored exactly and the filter keeps at most CANDIDATES_BELOW_SHARE of its
        items (within MAX_CANDIDATE_BYTES / CANDIDATE_BUDGET_PARTS); None otherwise."""
        key = (model.key, prefixes, include_unavailable)
        held = self._candidates
        try:
            found = held[key]
            held.move_to_end(key)
            return found
        except KeyError:
            pass
        if key not in self._asked:  # a filter asked for once is not worth the copy
            if len(self._asked) >= MAX_CACHED_MASKS:
                self._asked.clear()
            self._asked.add(key)
            return None
        mask = self.model_mask(model, prefixes, include_unavailable)
        found = None
        kept = int(np.count_nonzero(mask))
        size = kept * model.items.shape[1] * model.items.itemsize
        if (
            scored_exactly(model)
            and kept <= CANDIDATES_BELOW_SHARE * len(mask)
            and size * CANDIDATE_BUDGET_PARTS <= MAX_CANDIDATE_BYTES
        ):
            found = Candidates.of(model, mask)
        else:
            size = 0
        while held and (len(held) >= MAX_CACHED_MASKS or self._candidate_bytes + size > MAX_CANDIDATE_BYTES):
            _, dropped = held.popitem(last=False)  # the least recently used
            self._candidate_bytes -= 0 if dropped is None else dropped.items.nbytes
        held[key] = found
        self._candidate_bytes += size
        return found

    def new_items(self, model: ServingModel, trained_items: int) -> list[NewItem]:
        """The live items missing from `model`'s first `trained_items` rows (those it was
        trained with: the items added since), in item_id order, with their metadata features."""
        rows = self.model_rows(model)[:trained_items]
        lacking = self.live.copy()
        lacking[rows[rows >= 0]] = False
        return [(self.ids[row], self.entries[row].features) for row in np.flatnonzero(lacking).tolist()]

    def title_of(self, item_id: str) -> str:
        """The item's title, for reason texts ("" when the catalog does not have it)."""
        row = self.rows.get(item_id)
        return "" if row is None else self.entries[row].title

    def popular(self, allowed: np.ndarray, k: int) -> np.ndarray:
        """The k most popular catalog rows that `allowed` admits, most popular first."""
        ordered = self.by_popularity[allowed[self.by_popularity]]
        return ordered[:k]


def rows_of(rows: dict[str, int], item_ids: Iterable[str]) -> list[int]:
    """The rows of `item_ids` (by `rows`; unknown ids left out)."""
    return [row for item_id in item_ids if (row := rows.get(item_id)) is not None]


def without(allowed: np.ndarray, rows: dict[str, int], item_ids: Iterable[str]) -> np.ndarray:
    """`allowed` (not modified) with the rows of `item_ids` (by `rows`; unknown ids ignored) False."""
    found = rows_of(rows, item_ids)
    if not found:
        return allowed
    allowed = allowed.copy()
    allowed[found] = False
    return allowed


def _bounded(cache: dict) -> dict:  # type: ignore[type-arg]
    if len(cache) >= MAX_CACHED_MASKS:
        cache.clear()
    return cache


def changes_and_newest(connection: Connection, since_us: int) -> tuple[list[tuple[Item, bool]], int]:
    """The items changed at or after `since_us`, and the table's newest update_time_us."""
    return catalog_changes(connection, since_us), newest_item_update_us(connection)


def popularity_counts(connection: Connection) -> dict[str, int]:
    rows = connection.execute(
        sa.select(interactions.c.item_id, sa.func.count()).group_by(interactions.c.item_id)
    )
    return {item_id: int(count) for item_id, count in rows}


class ServingCatalog:
    def __init__(
        self,
        database: Database,
        poll_seconds: float = POLL_SECONDS,
        popularity_seconds: float = POPULARITY_SECONDS,
    ):
        self.db = database
        self.poll_seconds = poll_seconds
        self.popularity_seconds = popularity_seconds
        self._entries: dict[str, CatalogEntry] = {}
        self._counts: dict[str, int] = {}
        self._seen_until_us = 0
        self._polled_at_us = 0  # when the previous successful poll began
        self._snapshot: CatalogSnapshot | None = None
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> CatalogSnapshot:
        if self._snapshot is None:
            self._snapshot = self._build()
        return self._snapshot

    def apply(self, changes: Iterable[tuple[Item, bool]]) -> None:
        """Items written (or deleted: True) here or seen in the table."""
        changed = False
        for item, deleted in changes:
            entry = CatalogEntry(
                category_key(item.category_path),
                item.category_path,
                item.available,
                deleted,
                item.title,
                tuple(item_metadata(item)),
            )
            if self._entries.get(item.item_id) != entry:
                self._entries[item.item_id] = entry
                changed = True
            self._seen_until_us = max(self._seen_until_us, item.update_time_us)
        if changed:
            self._snapshot = None

    def deleted(self, item_id: str) -> None:
        entry = self._entries.get(item_id)
        if entry is not None and not entry.deleted:
            self._entries[item_id] = dataclasses.replace(entry, deleted=True)
            self._snapshot = None

    async def refresh(self) -> None:
        started = now_micros()
        # Everything applied so far had committed before this read: the table holds it.
        known = self._seen_until_us
        since = max(0, max(known, self._polled_at_us) - POLL_OVERLAP_US)
        changes, newest = await self.db.read(partial(changes_and_newest, since_us=since))
        if newest < known:
            log.warning("catalog_went_back", newest_update_us=newest, known_update_us=known)
            await self._reload(started)
            return
        self.apply(changes)
        self._polled_at_us = started

    async def _reload(self, started: int) -> None:
        """Forgets what is held and reads the whole table again (a restored database). The
        read comes first: no await between forgetting and applying, so no request sees none."""
        changes = await self.db.read(partial(catalog_changes, since_us=0))
        self._entries = {}
        self._seen_until_us = 0
        self._snapshot = None
        self.apply(changes)
        self._polled_at_us = started
        await self.recount()

    async def recount(self) -> None:
        counts = await self.db.read(popularity_counts)
        if counts != self._counts:
            self._counts = counts
            self._snapshot = None

    def _build(self) -> CatalogSnapshot:
        ids = sorted(self._entries)
        entries = [self._entries[item_id] for item_id in ids]
        live = np.fromiter((not e.deleted for e in entries), dtype=bool, count=len(entries))
        available = live & np.fromiter((e.available for e in entries), dtype=bool, count=len(entries))
        popularity = np.fromiter((self._counts.get(i, 0) for i in ids), dtype=np.float64, count=len(ids))
        return CatalogSnapshot(
            ids=ids,
            rows={item_id: row for row, item_id in enumerate(ids)},
            entries=entries,
            live=live,
            available=available,
            popularity=popularity,
            by_popularity=np.argsort(-popularity, kind="stable"),
        )

    async def start(self) -> None:
        await self.refresh()
        await self.recount()
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _follow(self) -> None:
        counted_at = now_micros()
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.refresh()
                if now_micros() - counted_at >= self.popularity_seconds * 1_000_000:
                    await self.recount()
                    counted_at = now_micros()
            except Exception as error:  # the database is away, say: keep serving what is held
                log.warning("serving_catalog_poll_failed", error=type(error).__name__)
