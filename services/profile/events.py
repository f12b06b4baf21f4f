"""Event ingestion: every channel's events, checked, resolved to a customer, filtered by
consent at the point of collection, and committed once (event_id is unique).

One call's events are handled together: one query resolves all their customers, one
transaction stores all the accepted ones, so a batch of 1000 costs about what one
event does. An event is answered ACCEPTED or DUPLICATE only once it is committed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from najimi.profile.v1 import profile_service_pb2 as pb
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from services.profile.identity import check_identifier
from services.profile.pii import PiiProtector
from services.profile.servicer import identifier_of
from services.profile.store import allocate_seqs, customers, events, identities
from shared.consent_cache import ConsentCache
from shared.db import Database, now_micros
from shared.errors import Unavailable
from shared.validation import Violations

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


def _violation(found: list[pb.FieldViolation], field: str, description: str) -> None:
    found.append(pb.FieldViolation(field=field, description=description))


def check_event(event: pb.Event, now_us: int) -> list[pb.FieldViolation]:
    """Every problem of one event, each with the path of its field within the event."""
    found: list[pb.FieldViolation] = []
    if not EVENT_ID.match(event.event_id):
        _violation(found, "event_id", "is required: 1 to 64 characters of [A-Za-z0-9._:-]")
    which = event.WhichOneof("customer")
    if which is None:
        _violation(found, "customer", "customer_id or identifier is required")
    elif which == "customer_id" and not CUSTOMER_ID.match(event.customer_id):
        _violation(found, "customer_id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
    elif which == "identifier":
        checked = Violations()
        check_identifier(checked, "identifier", identifier_of(event.identifier))
        found += [pb.FieldViolation(field=v.field, description=v.description) for v in checked.found]
    if event.channel not in pb.Channel.values() or event.channel == pb.CHANNEL_UNSPECIFIED:
        _violation(found, "channel", "must be one of the Channel values other than UNSPECIFIED")
    kind = event.event_type
    if kind not in CATEGORY_OF_TYPE:
        _violation(found, "event_type", "must be one of the EventType values other than UNSPECIFIED")
    if not event.HasField("occurred_at"):
        _violation(found, "occurred_at", "is required")
    else:
        occurred = event.occurred_at.ToMicroseconds()
        if occurred > now_us + MAX_FUTURE_US:
            _violation(found, "occurred_at", "must not be more than 5 minutes in the future")
        elif occurred < now_us - RETENTION_US:
            _violation(found, "occurred_at", "is older than the 3-year event retention period")
    if len(event.items) > MAX_ITEMS:
        _violation(found, "items", f"must hold at most {MAX_ITEMS} items")
    if kind in NEEDS_ITEMS and not event.items:
        _violation(found, "items", "is required for this event type")
    for index, item in enumerate(event.items[:MAX_ITEMS]):
        _check_item(found, f"items[{index}]", item)
    if kind == pb.EVENT_TYPE_SEARCH and not event.search_query.strip():
        _violation(found, "search_query", "is required for SEARCH")
    if len(event.search_query) > 512:
        _violation(found, "search_query", "must be at most 512 characters")
    if kind == pb.EVENT_TYPE_RATING:
        if len(event.items) != 1:
            _violation(found, "items", "must hold exactly one item for RATING")
        if not 1.0 <= event.rating_value <= 5.0:
            _violation(found, "rating_value", "must be from 1.0 to 5.0 for RATING")
    if event.value_micros < 0:
        _violation(found, "value_micros", "must not be negative")
    if (event.value_micros or kind in NEEDS_VALUE) and not CURRENCY.match(event.currency_code):
        _violation(found, "currency_code", "must be an ISO 4217 code such as JPY")
    if kind in NEEDS_ORDER and not event.order_id:
        _violation(found, "order_id", "is required for this event type")
    if len(event.order_id) > 64:
        _violation(found, "order_id", "must be at most 64 characters")
    if (kind in NEEDS_STORE or event.channel == pb.CHANNEL_STORE) and not event.store_id:
        _violation(found, "store_id", "is required for store events")
    if len(event.store_id) > 64:
        _violation(found, "store_id", "must be at most 64 characters")
    if event.HasField("properties"):
        keys = event.properties.fields.keys()
        if len(keys) > MAX_PROPERTIES or event.properties.ByteSize() > MAX_PROPERTIES_BYTES:
            _violation(found, "properties", f"must hold at most {MAX_PROPERTIES} keys and 8 KiB")
        contact = sorted(k for k in keys if k.lower() in CONTACT_KEYS)
        if contact:
            _violation(found, f"properties.{contact[0]}", "must not hold contact data")
    return found


def _check_item(found: list[pb.FieldViolation], path: str, item: pb.EventItem) -> None:
    if not 1 <= len(item.item_id) <= 128:
        _violation(found, f"{path}.item_id", "is required: 1 to 128 characters")
    if len(item.category_path) > 8 or any(not 1 <= len(segment) <= 64 for segment in item.category_path):
        _violation(found, f"{path}.category_path", "must hold at most 8 segments of 1 to 64 characters")
    if item.quantity < 0:
        _violation(found, f"{path}.quantity", "must not be negative")
    if item.unit_price_micros < 0:
        _violation(found, f"{path}.unit_price_micros", "must not be negative")
    if item.unit_price_micros and not CURRENCY.match(item.currency_code):
        _violation(found, f"{path}.currency_code", "is required when unit_price_micros is set (ISO 4217)")


@dataclass
class _Pending:
    """An event that passed its checks, on its way to a customer and the database."""

    position: int
    event: pb.Event
    customer_key: str | bytes  # a customer id, or an identifier's lookup hash
    customer_id: str = ""


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


def _insert(connection: Connection, rows: list[dict[str, object]], last: int) -> set[str]:
    """Stores the rows under the seqs ending at `last`; returns the event ids that were new
    (the others were already there)."""
    for offset, row in enumerate(rows):
        row["seq"] = last - len(rows) + 1 + offset
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(events)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(events.c.event_id)
    )
    return {row.event_id for row in connection.execute(statement, rows)}


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
    def __init__(self, database: Database, pii: PiiProtector, consent: ConsentCache, max_staleness: float):
        self.db = database
        self.pii = pii
        self.consent = consent
        self.max_staleness = max_staleness
        self._listeners: list[Callable[[], None]] = []

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after each commit of new events (to wake followers of the events)."""
        self._listeners.append(listener)

    def _decide(
        self, pending: list[_Pending], owners: dict[str | bytes, str], results: list[pb.EventResult], now: int
    ) -> tuple[list[_Pending], list[dict[str, object]]]:
        """Sets UNKNOWN_CUSTOMER and REJECTED_CONSENT results; returns the rest and their rows."""
        index = self.consent.index
        rows: list[dict[str, object]] = []
        accepted: list[_Pending] = []
        for item in pending:
            result = results[item.position]
            owner = owners.get(item.customer_key)
            if owner is None:
                result.status = pb.EVENT_RESULT_STATUS_UNKNOWN_CUSTOMER
                continue
            category = CATEGORY_OF_TYPE[item.event.event_type]
            if not index.collection_allowed(owner, category, now):
                result.status = pb.EVENT_RESULT_STATUS_REJECTED_CONSENT
                result.data_category = category
                continue
            event = item.event
            event.resolved_customer_id = owner
            event.data_category = category
            event.received_at.FromMicroseconds(now)
            item.customer_id = owner
            rows.append(
                {
                    "event_id": event.event_id,
                    "customer_id": owner,
                    "event_type": event.event_type,
                    "channel": event.channel,
                    "data_category": category,
                    "occurred_at_us": event.occurred_at.ToMicroseconds(),
                    "received_at_us": now,
                    "value_micros": event.value_micros,
                    "currency_code": event.currency_code,
                    "payload": event.SerializeToString(),
                }
            )
            accepted.append(item)
        return accepted, rows

    async def ingest(self, batch: Sequence[pb.Event]) -> list[pb.EventResult]:
        """One result per event, in order; raises UNAVAILABLE when consent state is too stale."""
        if self.consent.staleness > self.max_staleness:
            raise Unavailable(
                "consent state is not fresh enough to collect events; retry later",
                reason="CONSENT_STATE_STALE",
            )
        now = now_micros()
        results: list[pb.EventResult] = [pb.EventResult(event_id=e.event_id) for e in batch]
        pending: list[_Pending] = []
        for position, event in enumerate(batch):
            problems = check_event(event, now)
            if problems:
                results[position].status = pb.EVENT_RESULT_STATUS_INVALID
                results[position].violations.extend(problems)
                continue
            if event.WhichOneof("customer") == "customer_id":
                key: str | bytes = event.customer_id
            else:
                key = self.pii.lookup_hash(identifier_of(event.identifier).lookup_key)
            pending.append(_Pending(position, event, key))
        if not pending:
            return results
        ids = {p.customer_key for p in pending if isinstance(p.customer_key, str)}
        hashes = {p.customer_key for p in pending if isinstance(p.customer_key, bytes)}
        owners = await self.db.read(lambda c: _resolve(c, ids, hashes))  # type: ignore[arg-type]
        accepted, rows = self._decide(pending, owners, results, now)

        def collect(connection: Connection) -> tuple[list[_Pending], set[str]]:
            nonlocal accepted, rows
            # Under the event order lock no merge or erasure can change owners; if one did
            # since the read above, resolve again here (rare) before storing anything.
            allocate_seqs(connection, 0)
            if not _still_live(connection, {item.customer_id for item in accepted}):
                fresh = _resolve(connection, ids, hashes)  # type: ignore[arg-type]
                accepted, rows = self._decide(pending, fresh, results, now)
            if not rows:
                return accepted, set()
            return accepted, _insert(connection, rows, allocate_seqs(connection, len(rows)))

        accepted, new = await self.db.write(collect)
        for item in accepted:
            result = results[item.position]
            result.customer_id = item.customer_id
            if item.event.event_id in new:
                new.discard(item.event.event_id)  # a second copy in this batch is a duplicate
                result.status = pb.EVENT_RESULT_STATUS_ACCEPTED
            else:
                result.status = pb.EVENT_RESULT_STATUS_DUPLICATE
        if accepted:
            for listener in self._listeners:
                listener()
        return results
