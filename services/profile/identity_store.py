"""Identities and merges in storage: link, unlink, list, resolve, and merge customers.

Each write runs in one transaction of the ProfileStore's database and locks the
customer rows it changes (FOR UPDATE on PostgreSQL; SQLite has one writer), so a link,
an unlink, an update and a merge of one customer queue up instead of losing each other.

A merge (rules in services/profile/merges.py) also takes the `event_head` row, the lock
under which event ingestion hands out `seq`: events and merges are thus ordered by
commit, and an ingestion that resolves its customers under that lock never records an
event for a customer merged away meanwhile. The merge's own position in that order is
stored as `seq` in merges.moved, for the interaction feed's CustomerMerge entries.

PII of a merge's conflicts (name, e-mail, phone values) is stored encrypted in
merges.conflicts, like every other PII of this service.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.profile import trait_store
from services.profile.customers import Customer, current_year
from services.profile.identity import MAX_IDENTITIES_PER_CUSTOMER, Identifier, Identity, Resolution
from services.profile.merges import (
    Conflict,
    MergeOutcome,
    Standing,
    customer_merged_error,
    merge_refusal,
    merged_profile,
)
from services.profile.store import (
    ProfileStore,
    allocate_seqs,
    customers,
    erased_error,
    erasure_of,
    events,
    identities,
    lock_customer_id,
    merged_from_of,
    merges,
    new_identity_id,
)
from shared.db import now_micros
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

LINK = "LinkIdentity"
MERGE = "MergeCustomers"
# A chain of merges longer than this means damaged data (merges never make cycles).
MAX_MERGE_CHAIN = 1000

RenderIdentity = Callable[[Identity], bytes]
RenderMerge = Callable[[MergeOutcome], bytes]


def not_found_error(connection: Connection, customer_id: str) -> NotFound:
    if erasure_of(connection, customer_id) is not None:
        return erased_error(customer_id)
    return NotFound(f"customer {customer_id} not found", reason="CUSTOMER_NOT_FOUND")


def live_customer_row(connection: Connection, customer_id: str, *, lock: bool = False) -> sa.Row:
    """The row of a live customer; NotFound (CUSTOMER_NOT_FOUND or CUSTOMER_ERASED) or
    FailedPrecondition (CUSTOMER_MERGED) otherwise. `lock` takes it FOR UPDATE."""
    select = sa.select(customers).where(customers.c.customer_id == customer_id)
    row = connection.execute(select.with_for_update() if lock else select).first()
    if row is None:
        raise not_found_error(connection, customer_id)
    if row.merged_into:
        raise customer_merged_error(customer_id, row.merged_into)
    return row


def resolve_customer_id(connection: Connection, customer_id: str) -> tuple[str, list[str]]:
    """The live customer `customer_id` stands for today, following merges, and the
    merged-away ids passed through on the way. NotFound when it is unknown or erased."""
    passed: list[str] = []
    current = customer_id
    while True:
        merged_into = connection.execute(
            sa.select(customers.c.merged_into).where(customers.c.customer_id == current)
        ).first()
        if merged_into is None:
            raise not_found_error(connection, customer_id if current == customer_id else current)
        if not merged_into[0]:
            return current, passed
        passed.append(current)
        current = merged_into[0]
        if current in passed or len(passed) > MAX_MERGE_CHAIN:
            raise FailedPrecondition(
                f"the merges of customer {customer_id} form a cycle", reason="MERGE_CHAIN_BROKEN"
            )


def _touch(connection: Connection, customer_id: str, now_us: int) -> None:
    """Marks the customer changed (update_time) by a link or unlink; the fields, and so the
    etag, stay as they were."""
    connection.execute(
        customers.update().where(customers.c.customer_id == customer_id).values(update_time_us=now_us)
    )


def _identity_lookup(store: ProfileStore, identifier: Identifier) -> sa.ColumnElement[bool]:
    return identities.c.lookup_hash == store.pii.lookup_hash(identifier.lookup_key)


# -- identities ------------------------------------------------------------------------


async def link_identity(
    store: ProfileStore,
    *,
    principal: str,
    request: Message,
    customer_id: str,
    identifier: Identifier,
    verified: bool,
    render: RenderIdentity,
) -> bytes:
    """Links `identifier` to the customer; returns the rendered response, or the first one
    stored for this (principal, request id).

    An identifier already linked to this customer is returned as it is (marked verified
    when this request verifies it). AlreadyExists (IDENTITY_LINKED_ELSEWHERE) when it is
    linked to another customer, ResourceExhausted when the customer has the most
    identities allowed.
    """

    def carry_out(connection: Connection) -> bytes:
        live_customer_row(connection, customer_id, lock=True)
        now = now_micros()
        existing = connection.execute(
            sa.select(identities).where(_identity_lookup(store, identifier))
        ).first()
        if existing is not None and existing.customer_id != customer_id:
            raise AlreadyExists(
                "identifier is already linked to another customer; merge the two customers instead",
                reason="IDENTITY_LINKED_ELSEWHERE",
                metadata={"field": "identifier", "customer_id": existing.customer_id},
            )
        if existing is not None:
            identity = store._identity_of(existing)
            if verified and not identity.verified:
                connection.execute(
                    identities.update()
                    .where(identities.c.identity_id == identity.identity_id)
                    .values(verified=True)
                )
                identity = replace(identity, verified=True)
                _touch(connection, customer_id, now)
        else:
            count = connection.execute(
                sa.select(sa.func.count()).where(identities.c.customer_id == customer_id)
            ).scalar_one()
            if count >= MAX_IDENTITIES_PER_CUSTOMER:
                raise ResourceExhausted(
                    f"customer {customer_id} already has {MAX_IDENTITIES_PER_CUSTOMER} identities; "
                    "unlink some first",
                    reason="IDENTITY_LIMIT_REACHED",
                )
            identity = Identity(new_identity_id(), customer_id, identifier, verified, now, principal)
            connection.execute(identities.insert().values(store._identity_row(identity)))
            _touch(connection, customer_id, now)
        return render(identity)

    def link(connection: Connection) -> bytes:
        return store.idempotency.once(connection, principal, LINK, request, carry_out, customer_id)

    # A concurrent link of the same identifier or request id makes this transaction lose a
    # unique key; Database.write runs it again, and it sees the winner.
    return await store.write_customers([customer_id], link)


async def unlink_identity(
    store: ProfileStore, customer_id: str, identity_id: str | None, identifier: Identifier | None
) -> Identity:
    """Removes one identity of the customer, named by id or by identifier; returns it as it was."""

    def unlink(connection: Connection) -> Identity:
        live_customer_row(connection, customer_id, lock=True)
        select = sa.select(identities).where(identities.c.customer_id == customer_id)
        if identifier is not None:
            select = select.where(_identity_lookup(store, identifier))
        else:
            select = select.where(identities.c.identity_id == identity_id)
        row = connection.execute(select).first()
        if row is None:
            raise NotFound(
                f"the identity is not linked to customer {customer_id}", reason="IDENTITY_NOT_FOUND"
            )
        connection.execute(identities.delete().where(identities.c.identity_id == row.identity_id))
        _touch(connection, customer_id, now_micros())
        return store._identity_of(row)

    return await store.write_customers([customer_id], unlink)


async def list_identities(
    store: ProfileStore, customer_id: str, kinds: list[str], after: tuple[int, str] | None, limit: int
) -> list[Identity]:
    """Up to `limit` identities of a live customer, oldest link first, after the position
    (link time, identity id) `after`; only of `kinds` when any are given."""

    def query(connection: Connection) -> list[Identity]:
        live_customer_row(connection, customer_id)
        select = sa.select(identities).where(identities.c.customer_id == customer_id)
        if kinds:
            select = select.where(identities.c.kind.in_(kinds))
        if after is not None:
            link_time_us, identity_id = after
            select = select.where(
                sa.or_(
                    identities.c.link_time_us > link_time_us,
                    sa.and_(
                        identities.c.link_time_us == link_time_us, identities.c.identity_id > identity_id
                    ),
                )
            )
        rows = connection.execute(
            select.order_by(identities.c.link_time_us, identities.c.identity_id).limit(limit)
        )
        return [store._identity_of(row) for row in rows]

    return await store.db.read(query)


async def resolve(store: ProfileStore, customer_id: str | None, identifier: Identifier | None) -> Resolution:
    """The live customer an identifier or a (possibly merged-away) customer id belongs to."""

    def query(connection: Connection) -> Resolution:
        if identifier is None:
            assert customer_id is not None
            live, passed = resolve_customer_id(connection, customer_id)
            return Resolution(live, passed)
        row = connection.execute(sa.select(identities).where(_identity_lookup(store, identifier))).first()
        if row is None:
            raise NotFound("no customer is known by this identifier", reason="IDENTITY_NOT_FOUND")
        # Merges move identities to the surviving customer, so this is one step, not a chain.
        live, passed = resolve_customer_id(connection, row.customer_id)
        return Resolution(live, passed, replace(store._identity_of(row), customer_id=live))

    return await store.db.read(query)


# -- merges ----------------------------------------------------------------------------


def _sealed_conflicts(store: ProfileStore, source_id: str, conflicts: list[Conflict]) -> str:
    """merges.conflicts: the conflicts as JSON, PII values encrypted."""
    stored: list[dict[str, Any]] = []
    for index, conflict in enumerate(conflicts):
        entry: dict[str, Any] = {"field": conflict.field, "pii": conflict.pii, "kept": "target"}
        for side in ("source", "target"):
            value = getattr(conflict, f"{side}_value")
            if conflict.pii:
                sealed = store.pii.encrypt(value.encode(), f"merges/{source_id}/conflicts/{index}/{side}")
                entry[f"{side}_value_sealed"] = base64.b64encode(sealed).decode()
            else:
                entry[f"{side}_value"] = value
        stored.append(entry)
    return json.dumps(stored, separators=(",", ":"))


def _conflicts_of(store: ProfileStore, source_id: str, text: str) -> list[Conflict]:
    conflicts = []
    for index, entry in enumerate(json.loads(text)):
        values = {}
        for side in ("source", "target"):
            sealed = entry.get(f"{side}_value_sealed")
            if sealed is not None:
                context = f"merges/{source_id}/conflicts/{index}/{side}"
                values[side] = store.pii.decrypt(base64.b64decode(sealed), context).decode()
            else:
                values[side] = entry[f"{side}_value"]
        conflicts.append(Conflict(entry["field"], values["source"], values["target"], entry["pii"]))
    return conflicts


def _standing(connection: Connection, customer_id: str, row: sa.Row | None) -> Standing:
    if row is None:
        return Standing(customer_id, exists=False, erased=erasure_of(connection, customer_id) is not None)
    return Standing(customer_id, exists=True, merged_into=row.merged_into or "")


async def merge_customers(
    store: ProfileStore,
    *,
    principal: str,
    request: Message,
    source_id: str,
    target_id: str,
    render: RenderMerge,
) -> bytes:
    """Merges the source customer into the target in one transaction; returns the rendered
    response, the first one stored for this (principal, request id), or the first result
    of an earlier merge of the same pair. Raises what merges.merge_refusal says."""
    request_id = request.request_id  # type: ignore[attr-defined]

    def carry_out(connection: Connection) -> bytes:
        rows = {
            row.customer_id: row
            for row in connection.execute(
                sa.select(customers)
                .where(customers.c.customer_id.in_([source_id, target_id]))
                .order_by(customers.c.customer_id)
                .with_for_update()
            )
        }
        earlier = connection.execute(
            sa.select(merges).where(merges.c.source_customer_id == source_id)
        ).first()
        problem = merge_refusal(
            _standing(connection, source_id, rows.get(source_id)),
            _standing(connection, target_id, rows.get(target_id)),
            earlier.target_customer_id if earlier is not None else None,
        )
        if problem is not None:
            raise problem
        target_row = rows[target_id]
        if earlier is not None:
            outcome = _outcome_of_record(store, connection, earlier, store._customer_of(target_row))
        else:
            outcome = _merge(store, connection, principal, request_id, rows[source_id], target_row)
        return render(outcome)

    def merge(connection: Connection) -> bytes:
        # The same locks as creation and erasure, in one order: an erasure of either
        # customer happens wholly before or after the merge.
        for customer_id in sorted({source_id, target_id}):
            lock_customer_id(connection, customer_id)
        # About the target: erasing it erases the source too (an alias by then).
        stored = store.idempotency.once(connection, principal, MERGE, request, carry_out, target_id)
        merged_by_this_id = connection.execute(
            sa.select(merges.c.source_customer_id, merges.c.target_customer_id).where(
                merges.c.request_id == request_id, merges.c.merged_by == principal
            )
        ).first()
        if merged_by_this_id is not None and tuple(merged_by_this_id) != (source_id, target_id):
            raise InvalidArgument(
                "request_id", "was already used to merge other customers", reason="REQUEST_ID_REUSED"
            )
        return stored

    return await store.write_customers([source_id, target_id], merge)


def _outcome_of_record(
    store: ProfileStore, connection: Connection, record: sa.Row, target: Customer
) -> MergeOutcome:
    """The first result of a merge, from its record, with the target as it is now."""
    moved = json.loads(record.moved)
    merged_from = merged_from_of(connection, [target.customer_id]).get(target.customer_id, ())
    return MergeOutcome(
        source_customer_id=record.source_customer_id,
        target=replace(target, merged_from=merged_from),
        moved_identities=moved["identities"],
        moved_events=moved["events"],
        filled=moved["attributes"],
        conflicts=_conflicts_of(store, record.source_customer_id, record.conflicts),
        merged_at_us=record.merged_at_us,
    )


def _merge(
    store: ProfileStore,
    connection: Connection,
    principal: str,
    request_id: str,
    source_row: sa.Row,
    target_row: sa.Row,
) -> MergeOutcome:
    source, target = store._customer_of(source_row), store._customer_of(target_row)
    source_id, target_id = source.customer_id, target.customer_id
    seq = allocate_seqs(connection, 1)
    merged = merged_profile(target.profile, source.profile, current_year())
    now = now_micros()
    moved_identities = connection.execute(
        identities.update().where(identities.c.customer_id == source_id).values(customer_id=target_id)
    ).rowcount
    # The owner of an event is its customer_id column; the payload keeps the id it arrived for.
    moved_events = connection.execute(
        events.update().where(events.c.customer_id == source_id).values(customer_id=target_id)
    ).rowcount
    # The target's traits now cover the source's history too (and the source has none).
    trait_store.rebuild(connection, target_id)
    changed = replace(target, profile=merged.profile, update_time_us=now, revision=target.revision + 1)
    values = store._customer_row(changed)
    del values["customer_id"], values["create_time_us"]
    connection.execute(customers.update().where(customers.c.customer_id == target_id).values(values))
    # The source becomes a tombstone: what it held moved to the target or into the conflicts.
    connection.execute(
        customers.update()
        .where(customers.c.customer_id == source_id)
        .values(
            display_name_ciphertext=None,
            email_ciphertext=None,
            phone_ciphertext=None,
            birth_year_ciphertext=None,
            gender="",
            region="",
            language_code="",
            attributes="{}",
            revision=source.revision + 1,
            update_time_us=now,
            merged_into=target_id,
        )
    )
    connection.execute(
        merges.insert().values(
            source_customer_id=source_id,
            target_customer_id=target_id,
            merged_at_us=now,
            merged_by=principal,
            request_id=request_id,
            moved=json.dumps(
                {
                    "identities": moved_identities,
                    "events": moved_events,
                    "attributes": merged.filled,
                    "seq": seq,
                },
                separators=(",", ":"),
            ),
            conflicts=_sealed_conflicts(store, source_id, merged.conflicts),
        )
    )
    merged_from = merged_from_of(connection, [target_id]).get(target_id, ())
    return MergeOutcome(
        source_customer_id=source_id,
        target=replace(changed, merged_from=merged_from),
        moved_identities=moved_identities,
        moved_events=moved_events,
        filled=merged.filled,
        conflicts=merged.conflicts,
        merged_at_us=now,
    )
