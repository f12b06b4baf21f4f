"""Event ingestion: every channel's events, checked, resolved to a customer, filtered by
consent at the point of collection, and committed once (event_id is unique).

One call's events are handled together: one query resolves all their customers, and
the calls that are ready at the same time are stored in one transaction (one lock of
the event order, one multi-row insert, one commit), so a batch of 1000 costs about what
one event does and more calls at once cost less per call. An event is answered ACCEPTED
or DUPLICATE only once it is committed.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from google.protobuf import struct_pb2
from najimi.profile.v1 import profile_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.profile.identity import check_identifier
from services.profile.pii import PiiProtector
from services.profile.servicer import identifier_of
from services.profile.store import allocate_seqs, customers, event_seqs, identities, insert_events
from services.profile.trait_store import Committed, cursor_generation
from services.profile.traits import StoredEvent
from shared.consent_cache import ConsentCache, consent_state_stale
from shared.db import Database, now_micros
from shared.proto_time import INVALID_TIMESTAMP, timestamp_micros
from shared.tasks import cancel_and_wait
from shared.validation import MAX_MONEY_MICROS, MONEY_RANGE, Violations

MAX_ITEMS = 500
MAX_FUTURE_US = 5 * 60 * 1_000_000
RETENTION_US = 3 * 365 * 86_400 * 1_000_000  # events older than this are not taken
MAX_PROPERTIES = 50
MAX_PROPERTIES_BYTES = 8 * 1024
EVENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CUSTOMER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CURRENCY = re.compile(r"^[A-Z]{3}$")
CONTACT_KEYS = {"name", "email", "e_mail", "phone", "telephone", "address", "postal_address"}

PURCHASE_HISTORY = "user.behavior.purchase_history"
BROWSING_HISTORY = "user.behavior.browsing_history"

# Each event type's consent data category (the EventType comments of the proto).
CATEGORY_OF_TYPE: dict[int, str] = {
    pb.EVENT_TYPE_PRODUCT_VIEW: BROWSING_HISTORY,
    pb.EVENT_TYPE_SEARCH: "user.behavior.search_history",
    pb.EVENT_TYPE_ADD_TO_CART: BROWSING_HISTORY,
    pb.EVENT_TYPE_REMOVE_FROM_CART: BROWSING_HISTORY,
    pb.EVENT_TYPE_ADD_TO_WISHLIST: BROWSING_HISTORY,
    pb.EVENT_TYPE_PURCHASE: PURCHASE_HISTORY,
    pb.EVENT_TYPE_RATING: PURCHASE_HISTORY,
    pb.EVENT_TYPE_INQUIRY: BROWSING_HISTORY,
    pb.EVENT_TYPE_DOCUMENT_REQUEST: BROWSING_HISTORY,
    pb.EVENT_TYPE_STORE_VISIT: "user.behavior.store_visits",
    pb.EVENT_TYPE_STORE_PURCHASE: PURCHASE_HISTORY,
    pb.EVENT_TYPE_RETURN: PURCHASE_HISTORY,
    pb.EVENT_TYPE_DEVICE_USAGE: "user.device.telemetry",
}
NEEDS_ITEMS = {
    pb.EVENT_TYPE_PRODUCT_VIEW,
    pb.EVENT_TYPE_ADD_TO_CART,
    pb.EVENT_TYPE_REMOVE_FROM_CART,
    pb.EVENT_TYPE_ADD_TO_WISHLIST,
    pb.EVENT_TYPE_PURCHASE,
    pb.EVENT_TYPE_STORE_PURCHASE,
    pb.EVENT_TYPE_RETURN,
    pb.EVENT_TYPE_DEVICE_USAGE,
}
NEEDS_ORDER = {pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_STORE_PURCHASE, pb.EVENT_TYPE_RETURN}
NEEDS_VALUE = {pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_STORE_PURCHASE}
NEEDS_STORE = {pb.EVENT_TYPE_STORE_VISIT, pb.EVENT_TYPE_STORE_PURCHASE}


CHANNELS = frozenset(pb.Channel.values()) - {pb.CHANNEL_UNSPECIFIED}


def _violation(found: list[pb.FieldViolation], field: str, description: str) -> None:
    found.append(pb.FieldViolation(field=field, description=description))


def check_event(event: pb.Event, now_us: int) -> list[pb.FieldViolation]:
    """Every problem of one event, each with the path of its field within the event.

    It runs for every event ingested, so each field is read once and the checks that
    cannot apply (an empty optional field) are skipped.
    """
    found: list[pb.FieldViolation] = []
    if not EVENT_ID.match(event.event_id):
        _violation(found, "event_id", "is required: 1 to 64 characters of [A-Za-z0-9._:-]")
    which = event.WhichOneof("customer")
    if which == "customer_id":
        if not CUSTOMER_ID.match(event.customer_id):
            _violation(found, "customer_id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
    elif which is None:
        _violation(found, "customer", "customer_id or identifier is required")
    else:
        checked = Violations()
        check_identifier(checked, "identifier", identifier_of(event.identifier))
        found += [pb.FieldViolation(field=v.field, description=v.description) for v in checked.found]
    channel = event.channel
    if channel not in CHANNELS:
        _violation(found, "channel", "must be one of the Channel values other than UNSPECIFIED")
    kind = event.event_type
    if kind not in CATEGORY_OF_TYPE:
        _violation(found, "event_type", "must be one of the EventType values other than UNSPECIFIED")
    if not event.HasField("occur_time"):
        _violation(found, "occur_time", "is required")
    else:
        occurred = timestamp_micros(event.occur_time)
        if occurred is None:
            _violation(found, "occur_time", INVALID_TIMESTAMP)
        elif occurred > now_us + MAX_FUTURE_US:
            _violation(found, "occur_time", "must not be more than 5 minutes in the future")
        elif occurred < now_us - RETENTION_US:
            _violation(found, "occur_time", "is older than the 3-year event retention period")
    items = event.items
    if not items:
        if kind in NEEDS_ITEMS:
            _violation(found, "items", "is required for this event type")
    else:
        if len(items) > MAX_ITEMS:
            _violation(found, "items", f"must hold at most {MAX_ITEMS} items")
        for index, item in enumerate(items):
            if index == MAX_ITEMS:
                break
            _check_item(found, index, item)
    search_query = event.search_query
    if kind == pb.EVENT_TYPE_SEARCH and not search_query.strip():
        _violation(found, "search_query", "is required for SEARCH")
    if len(search_query) > 512:
        _violation(found, "search_query", "must be at most 512 characters")
    if kind == pb.EVENT_TYPE_RATING:
        if len(items) != 1:
            _violation(found, "items", "must hold exactly one item for RATING")
        if not 1.0 <= event.rating_value <= 5.0:
            _violation(found, "rating_value", "must be from 1.0 to 5.0 for RATING")
    value = event.value_micros
    if not 0 <= value <= MAX_MONEY_MICROS:
        _violation(found, "value_micros", MONEY_RANGE)
    if (value or kind in NEEDS_VALUE) and not CURRENCY.match(event.currency_code):
        _violation(found, "currency_code", "must be an ISO 4217 code such as JPY")
    order_id = event.order_id
    if not order_id:
        if kind in NEEDS_ORDER:
            _violation(found, "order_id", "is required for this event type")
    elif len(order_id) > 64:
        _violation(found, "order_id", "must be at most 64 characters")
    store_id = event.store_id
    if not store_id:
        if kind in NEEDS_STORE or channel == pb.CHANNEL_STORE:
            _violation(found, "store_id", "is required for store events")
    elif len(store_id) > 64:
        _violation(found, "store_id", "must be at most 64 characters")
    if event.HasField("properties"):
        keys = event.properties.fields.keys()
        if len(keys) > MAX_PROPERTIES or event.properties.ByteSize() > MAX_PROPERTIES_BYTES:
            _violation(found, "properties", f"must hold at most {MAX_PROPERTIES} keys and 8 KiB")
        contact = sorted(k for k in keys if k.lower() in CONTACT_KEYS)
        if contact:
            _violation(found, f"properties.{contact[0]}", "must not hold contact data")
        for key, entry in event.properties.fields.items():
            if not _all_finite(entry):
                # JSON (an export, grpcurl) has no NaN or infinity.
                _violation(found, f"properties.{key[:64]}", "must hold finite numbers only")
    return found


def _all_finite(value: struct_pb2.Value) -> bool:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return math.isfinite(value.number_value)
    if kind == "struct_value":
        return all(_all_finite(v) for v in value.struct_value.fields.values())
    if kind == "list_value":
        return all(_all_finite(v) for v in value.list_value.values)
    return True


def _check_item(found: list[pb.FieldViolation], index: int, item: pb.EventItem) -> None:
    if not 0 < len(item.item_id) <= 128:
        _violation(found, f"items[{index}].item_id", "is required: 1 to 128 characters")
    path = item.category_path
    if path and (len(path) > 8 or min(map(len, path)) == 0 or max(map(len, path)) > 64):
        _violation(
            found, f"items[{index}].category_path", "must hold at most 8 segments of 1 to 64 characters"
        )
    if item.quantity < 0:
        _violation(found, f"items[{index}].quantity", "must not be negative")
    price = item.unit_price_micros
    if price:
        if not 0 <= price <= MAX_MONEY_MICROS:
            _violation(found, f"items[{index}].unit_price_micros", MONEY_RANGE)
        if not CURRENCY.match(item.currency_code):
            _violation(
                found,
                f"items[{index}].currency_code",
                "is required when unit_price_micros is set (ISO 4217)",
            )


# A stream's messages handled at once (read, checked and on their way to a commit) while
# earlier ones are being committed; their results still go back in order.
STREAM_WINDOW = 4
# Events stored in one transaction at most, when many calls' events are ready together.
MAX_GROUP_EVENTS = 16_000


class _OwnersChanged(Exception):
    """A merge or an erasure changed who owns some events after they were resolved."""


@dataclass(slots=True)
class _Job:
    """One call's (or one stream message's) events, from their checks to their commit."""

    results: list[pb.EventResult]
    # (position in the call, event, customer key) of each event that passed its checks;
    # the key is a customer id, or an identifier's lookup hash.
    pending: list[tuple[int, pb.Event, str | bytes]]
    now: int
    done: asyncio.Future[None]
    ready: bool = False  # resolved and decided: its rows wait for the committer
    # The events to store: their positions, and their rows (EVENT_COLUMNS without seq).
    positions: list[int] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[pb.Event] = field(default_factory=list)  # as stored (payload), by row
    owners: set[str] = field(default_factory=set)  # the customers those events belong to


def _resolve(connection: Connection, ids: set[str], hashes: set[bytes]) -> dict[str | bytes, str]:
    """Maps customer ids and identifier hashes to the live customer (following merges);
    unknown, erased or unlinked ones are absent."""
    owners: dict[str | bytes, str] = {}
    if hashes:
        rows = connection.execute(
            sa.select(identities.c.lookup_hash, identities.c.customer_id).where(
                identities.c.lookup_hash.in_(hashes)
            )
        )
        for row in rows:
            owners[bytes(row.lookup_hash)] = row.customer_id
    wanted = ids | {owner for owner in owners.values() if isinstance(owner, str)}
    merged: dict[str, str | None] = {}
    while wanted:
        rows = connection.execute(
            sa.select(customers.c.customer_id, customers.c.merged_into).where(
                customers.c.customer_id.in_(wanted)
            )
        )
        found = {row.customer_id: row.merged_into for row in rows}
        merged.update(found)
        wanted = {target for target in found.values() if target and target not in merged}

    def live(customer_id: str) -> str | None:
        seen = set()
        while customer_id in merged and merged[customer_id] and customer_id not in seen:
            seen.add(customer_id)
            customer_id = merged[customer_id]  # type: ignore[assignment]
        return customer_id if customer_id in merged else None

    resolved: dict[str | bytes, str] = {}
    for key in ids:
        target = live(key)
        if target is not None:
            resolved[key] = target
    for digest, owner in owners.items():
        target = live(owner)
        if target is not None:
            resolved[digest] = target
    return resolved


def _still_live(connection: Connection, owners: set[str]) -> bool:
    """Are all these customers still there and not merged away?"""
    if not owners:
        return True
    rows = connection.execute(
        sa.select(customers.c.customer_id).where(
            customers.c.customer_id.in_(owners), customers.c.merged_into.is_(None)
        )
    ).all()
    return len(rows) == len(owners)


class EventIngestor:
    """Takes calls' events: checks them, resolves their customers, applies consent, and stores
    the rest once each, answering each event only after its commit.

    Calls are committed in the order they arrive, by one committer: the calls that are
    ready when it starts a transaction (it runs one at a time) share that transaction. So
    under load many calls cost one commit and one event order lock between them, and a
    quiet service commits each call at once.
    """

    def __init__(self, database: Database, pii: PiiProtector, consent: ConsentCache, max_staleness: float):
        self.db = database
        self.pii = pii
        self.consent = consent
        self.max_staleness = max_staleness
        self._listeners: list[Callable[[], None]] = []
        self._stored_listeners: list[Callable[[Committed], None]] = []
        self._jobs: deque[_Job] = deque()  # in arrival order: the order of their commits
        self._committer: asyncio.Task[None] | None = None

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after each commit of new events (to wake followers of the events)."""
        self._listeners.append(listener)

    def on_stored(self, listener: Callable[[Committed], None]) -> None:
        """Calls `listener` after each commit with what it stored (the trait worker adds
        those events from memory instead of reading them back)."""
        self._stored_listeners.append(listener)

    async def ingest(self, batch: Sequence[pb.Event]) -> list[pb.EventResult]:
        """One result per event, in order; raises UNAVAILABLE when consent state is too stale."""
        job = self._checked(batch)
        if job.pending:
            await self._collect(job)
        return job.results

    async def ingest_stream(
        self, batches: AsyncIterator[Sequence[pb.Event]], window: int = STREAM_WINDOW
    ) -> AsyncIterator[list[pb.EventResult]]:
        """The results of each batch of the stream, in order, each once its events are committed.

        Up to `window` batches are taken in at once: the next ones are read and checked
        while earlier ones commit, and those ready together share a transaction. An error
        reading the stream (or a batch's error) ends it after the results of every batch
        before it.
        """
        room = asyncio.Semaphore(window)
        taken: asyncio.Queue[asyncio.Future[list[pb.EventResult]] | BaseException | None] = asyncio.Queue()

        async def take() -> None:
            try:
                async for batch in batches:
                    await room.acquire()
                    # In arrival order: each batch is checked and queued for its commit
                    # before the next one is read.
                    taken.put_nowait(asyncio.ensure_future(self.ingest(batch)))
            except Exception as error:
                taken.put_nowait(error)
            else:
                taken.put_nowait(None)

        reader = asyncio.create_task(take())
        try:
            while (next_one := await taken.get()) is not None:
                if isinstance(next_one, BaseException):
                    raise next_one
                results = await next_one
                room.release()
                yield results
        finally:
            await cancel_and_wait(reader)
            while not taken.empty():  # not answered: whatever they commit is not acknowledged
                left = taken.get_nowait()
                if isinstance(left, asyncio.Future):
                    left.cancel()

    def _checked(self, batch: Sequence[pb.Event]) -> _Job:
        """The batch's job: INVALID results set, the rest pending."""
        if self.consent.staleness > self.max_staleness:
            raise consent_state_stale("collect events")
        now = now_micros()
        results = [pb.EventResult(event_id=event.event_id) for event in batch]
        pending: list[tuple[int, pb.Event, str | bytes]] = []
        for position, event in enumerate(batch):
            problems = check_event(event, now)
            if problems:
                result = results[position]
                result.status = pb.EVENT_RESULT_STATUS_INVALID
                result.violations.extend(problems)
            elif event.WhichOneof("customer") == "customer_id":
                pending.append((position, event, event.customer_id))
            else:
                key = self.pii.lookup_hash(identifier_of(event.identifier).lookup_key)
                pending.append((position, event, key))
        return _Job(results, pending, now, asyncio.get_running_loop().create_future())

    async def _collect(self, job: _Job) -> None:
        """Resolves and decides the job's events, then waits for their commit."""
        self._jobs.append(job)
        try:
            await self._decide(job)
        except BaseException:
            self._jobs.remove(job)
            self._start_committer()  # the next job may be ready
            raise
        job.ready = True
        self._start_committer()
        await job.done

    async def _decide(self, job: _Job) -> None:
        """Resolves the job's customers, sets the UNKNOWN_CUSTOMER and REJECTED_CONSENT results
        and fills in the rows of the rest."""
        ids = {key for _, _, key in job.pending if isinstance(key, str)}
        hashes = {key for _, _, key in job.pending if isinstance(key, bytes)}
        owners = await self.db.read(functools.partial(_resolve, ids=ids, hashes=hashes))
        allowed = self.consent.index.collection_allowed
        decisions: dict[tuple[str, str], bool] = {}
        now, results = job.now, job.results
        seconds, nanos = divmod(now, 1_000_000)
        job.positions, job.rows, job.events, job.owners = positions, rows, stored, accepted_owners = (
            [],
            [],
            [],
            set(),
        )
        for position, event, key in job.pending:
            owner = owners.get(key)
            if owner is None:
                results[position].status = pb.EVENT_RESULT_STATUS_UNKNOWN_CUSTOMER
                continue
            kind = event.event_type
            category = CATEGORY_OF_TYPE[kind]
            decision = decisions.get((owner, category))
            if decision is None:
                decision = decisions[owner, category] = allowed(owner, category, now)
            if not decision:
                result = results[position]
                result.status = pb.EVENT_RESULT_STATUS_REJECTED_CONSENT
                result.data_category = category
                continue
            event.resolved_customer_id = owner
            event.data_category = category
            received = event.receive_time
            received.seconds = seconds
            received.nanos = nanos * 1_000
            positions.append(position)
            stored.append(event)
            accepted_owners.add(owner)
            rows.append(
                (
                    event.event_id,
                    owner,
                    kind,
                    event.channel,
                    category,
                    timestamp_micros(event.occur_time) or 0,  # valid: check_event saw to it
                    now,
                    event.value_micros,
                    event.currency_code,
                    event.SerializeToString(),
                )
            )

    def _start_committer(self) -> None:
        if self._jobs and self._jobs[0].ready and (self._committer is None or self._committer.done()):
            self._committer = asyncio.create_task(self._commit_ready(), name="event-committer")

    async def _commit_ready(self) -> None:
        """Commits the ready jobs at the head of the queue, as many at once as are ready (up to
        MAX_GROUP_EVENTS events), until the head is not ready."""
        while self._jobs and self._jobs[0].ready:
            group = [self._jobs.popleft()]
            count = len(group[0].rows)
            while self._jobs and self._jobs[0].ready and count + len(self._jobs[0].rows) <= MAX_GROUP_EVENTS:
                count += len(self._jobs[0].rows)
                group.append(self._jobs.popleft())
            try:
                await self._commit(group)
            except Exception as error:
                for job in group:
                    if not job.done.done():
                        job.done.set_exception(error)
            except BaseException:  # cancelled (the service stops): so are the calls waiting
                for job in group:
                    job.done.cancel()
                raise
            else:
                for job in group:
                    if not job.done.done():
                        job.done.set_result(None)

    async def _commit(self, group: list[_Job]) -> None:
        """Stores the group's rows in one transaction and sets their results."""
        while True:
            rows = [row for job in group for row in job.rows]
            if not rows:
                return
            owners = set().union(*(job.owners for job in group))
            try:
                first, seqs, generation = await self.db.write(
                    functools.partial(_store, rows=rows, owners=owners)
                )
                break
            except _OwnersChanged:
                # A merge or erasure came between the resolution and the lock (rare):
                # resolve and decide again, from fresh results.
                for job in group:
                    for position, event, _ in job.pending:
                        job.results[position] = pb.EventResult(event_id=event.event_id)
                    await self._decide(job)
        seq = first
        new_events: list[StoredEvent] = []
        for job in group:
            results = job.results
            for position, row, event in zip(job.positions, job.rows, job.events, strict=True):
                result = results[position]
                result.customer_id = row[1]
                # New when stored under the seq it was given; a copy stored before (or
                # earlier in these rows) is a duplicate.
                if seqs is None or seqs.get(row[0]) == seq:
                    result.status = pb.EVENT_RESULT_STATUS_ACCEPTED
                    _, owner, kind, channel, category, occurred, _, value, currency, _ = row
                    new_events.append(
                        StoredEvent(seq, owner, kind, channel, category, occurred, value, currency, event)
                    )
                else:
                    result.status = pb.EVENT_RESULT_STATUS_DUPLICATE
                seq += 1
        committed = Committed(first, seq - 1, generation, new_events)
        for stored_listener in self._stored_listeners:
            stored_listener(committed)
        for listener in self._listeners:
            listener()


def _store(
    connection: Connection, rows: list[tuple[Any, ...]], owners: set[str]
) -> tuple[int, dict[str, int] | None, int]:
    """Stores `rows` (EVENT_COLUMNS without seq) under new seqs, in the caller's transaction;
    returns the first seq; when some event ids were stored already, the seq each is stored
    under (None when every row was new); and the trait cursor's generation (see Committed)."""
    # The event order lock first: from here to the commit no merge or erasure can change
    # who owns these events; if one did since they were resolved, resolve them again.
    last = allocate_seqs(connection, len(rows))
    if not _still_live(connection, owners):
        raise _OwnersChanged
    first = last - len(rows) + 1
    stored = insert_events(connection, [(first + offset, *row) for offset, row in enumerate(rows)])
    generation = cursor_generation(connection)
    if stored == len(rows):
        return first, None, generation
    return first, event_seqs(connection, [row[0] for row in rows]), generation
