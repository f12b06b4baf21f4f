"""The profile service's tables and queries (SQLAlchemy Core).

PII is encrypted here, at the boundary to storage: display name, e-mail, phone and
birth year go to `*_ciphertext` columns, identifier values are encrypted and looked up
by keyed hash, and stored idempotent responses (which may hold unmasked PII for a
caller allowed to read it) are encrypted too (shared/idempotency.py's seal hook). Nothing else in the service sees a
ciphertext.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.profile.customer_cache import CustomerCache
from services.profile.customers import Attribute, Customer, Profile, updated_profile
from services.profile.identity import Identifier, Identity
from services.profile.merges import customer_merged_error
from services.profile.pii import PiiProtector
from shared.db import Database, insert_rows, now_micros
from shared.errors import Aborted, AlreadyExists, DomainError, FailedPrecondition, NotFound
from shared.idempotency import Idempotency, StoredReply

metadata = sa.MetaData()

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("customer_id", sa.String(64), primary_key=True),
    sa.Column("display_name_ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("email_ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("phone_ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("birth_year_ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("gender", sa.String(16), nullable=False),
    sa.Column("region", sa.String(8), nullable=False),
    sa.Column("language_code", sa.String(35), nullable=False),
    sa.Column("signup_time_us", sa.BigInteger, nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    # Set when the customer was merged into another: the id stays as an alias of it.
    sa.Column("merged_into", sa.String(128), nullable=True),
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("identity_id", sa.String(40), primary_key=True),
    sa.Column("customer_id", sa.String(64), sa.ForeignKey("customers.customer_id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("issuer", sa.String(64), nullable=False),
    sa.Column("lookup_hash", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("value_ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("link_time_us", sa.BigInteger, nullable=False),
    sa.Column("linked_by", sa.String(160), nullable=False),
)

# One row per erased customer id: all that erasure keeps (migration 0002).
event_head = sa.Table(
    "event_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)

# Every accepted event once; `payload` is its serialized najimi.profile.v1.Event (with
# resolved_customer_id, data_category and receive_time filled in). See migration 0003.
events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("event_type", sa.SmallInteger, nullable=False),
    sa.Column("channel", sa.SmallInteger, nullable=False),
    sa.Column("data_category", sa.String(64), nullable=False),
    sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
    sa.Column("received_at_us", sa.BigInteger, nullable=False),
    sa.Column("value_micros", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
)


def allocate_seqs(connection: Connection, count: int) -> int:
    """Takes the event_head row lock (held to commit) and `count` more seqs; returns the last.

    Whatever changes who owns events (ingestion, merges, erasure) takes this lock first,
    so events commit in seq order and no event lands on a customer that a concurrent
    merge or erasure is taking away. `count` 0 takes only the lock.
    """
    # One statement (UPDATE ... RETURNING, SQLite 3.35+ and PostgreSQL): one round trip.
    return int(connection.execute(_ALLOCATE_SEQS, {"count": count}).scalar_one())


_ALLOCATE_SEQS = (
    event_head.update()
    .where(event_head.c.id == 1)
    .values(seq=event_head.c.seq + sa.bindparam("count", type_=sa.BigInteger))
    .returning(event_head.c.seq)
)
# The columns of `events` in table order: the order of the tuples insert_events takes.
EVENT_COLUMNS = tuple(column.name for column in events.columns)


def insert_events(connection: Connection, rows: list[tuple[Any, ...]]) -> int:
    """Stores `rows` (tuples in EVENT_COLUMNS order, seq first), skipping each whose event_id
    is stored already (before, or earlier in `rows`); returns how many were stored."""
    return insert_rows(
        connection, events, rows, lambda insert: insert.on_conflict_do_nothing(index_elements=["event_id"])
    )


def event_seqs(connection: Connection, event_ids: list[str]) -> dict[str, int]:
    """The seq each of `event_ids` is stored under (absent: not stored)."""
    found: dict[str, int] = {}
    for start in range(0, len(event_ids), 5000):  # within SQLite's limit of bound parameters
        chunk = event_ids[start : start + 5000]
        rows = connection.execute(
            sa.select(events.c.event_id, events.c.seq).where(events.c.event_id.in_(chunk))
        )
        found.update((row.event_id, int(row.seq)) for row in rows)
    return found


merges = sa.Table(
    "merges",
    metadata,
    sa.Column("source_customer_id", sa.String(128), primary_key=True),
    sa.Column("target_customer_id", sa.String(128), nullable=False),
    sa.Column("merged_at_us", sa.BigInteger, nullable=False),
    sa.Column("merged_by", sa.String(160), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("moved", sa.Text, nullable=False),
    sa.Column("conflicts", sa.Text, nullable=False),
)

# The tombstone of each erased customer id, by keyed hash (erasure_ref): the id is
# refused for good, and the table names no one (migration 0006).
erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("customer_ref", sa.String(64), primary_key=True),
    sa.Column("erased_at_us", sa.BigInteger, nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
)

# The execution option that holds the tombstones' hash function (see erasure_of).
ERASURE_REF = "najimi_erasure_ref"

# The PII columns of `customers`, each encrypted under the context "customers/<id>/<column>".
PII_FIELDS = ("display_name", "email", "phone", "birth_year")

# Renders the response of a creating RPC, so it can be stored with the request id.
RenderCreated = Callable[[Customer, list[Identity]], bytes]


def _attributes_json(attributes: dict[str, Attribute]) -> str:
    return json.dumps(
        {
            key: {"kind": a.kind, "value": a.value, "data_category": a.data_category}
            for key, a in attributes.items()
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _attributes_of(text: str) -> dict[str, Attribute]:
    return {key: Attribute(**value) for key, value in json.loads(text).items()}


def new_identity_id() -> str:
    return "idn_" + secrets.token_hex(16)


def lock_customer_id(connection: Connection, customer_id: str) -> None:
    """Queues this transaction behind any other that holds the same customer id, until commit.

    Creating and erasing a customer take it, so a customer cannot be created beside its own
    erasure on PostgreSQL (which runs writers in parallel, each statement seeing only what
    was committed before it). SQLite runs one writer at a time and needs no lock.
    """
    if connection.dialect.name == "postgresql":
        digest = hashlib.sha256(f"najimi.profile.customer/{customer_id}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def erasure_of(connection: Connection, customer_id: str) -> sa.Row | None:
    """The erasure tombstone of `customer_id`, if the customer was erased. Tombstones are
    found by keyed hash: ProfileStore sets the hash function (PiiProtector.erasure_ref) as
    its engine's ERASURE_REF execution option, so every transaction of the service has it."""
    ref = connection.get_execution_options()[ERASURE_REF](customer_id)
    return connection.execute(sa.select(erasures).where(erasures.c.customer_ref == ref)).first()


def erased_error(customer_id: str) -> NotFound:
    return NotFound(f"customer {customer_id} was erased", reason="CUSTOMER_ERASED")


def merged_from_of(connection: Connection, customer_ids: list[str]) -> dict[str, tuple[str, ...]]:
    """The ids merged directly into each of `customer_ids`, oldest merge first."""
    found: dict[str, list[str]] = {}
    if customer_ids:
        rows = connection.execute(
            sa.select(merges.c.target_customer_id, merges.c.source_customer_id)
            .where(merges.c.target_customer_id.in_(customer_ids))
            .order_by(merges.c.merged_at_us, merges.c.source_customer_id)
        )
        for target, source in rows:
            found.setdefault(target, []).append(source)
    return {customer_id: tuple(sources) for customer_id, sources in found.items()}


def aliases_of(connection: Connection, customer_id: str) -> list[str]:
    """Every id merged into `customer_id`, directly or through a chain of merges."""
    aliases: list[str] = []
    frontier = [customer_id]
    while frontier:
        sources = connection.execute(
            sa.select(merges.c.source_customer_id).where(merges.c.target_customer_id.in_(frontier))
        ).scalars()
        frontier = [source for source in sources if source != customer_id and source not in aliases]
        aliases.extend(frontier)
    return aliases


@dataclass(frozen=True)
class HeldData:
    """Everything this service holds about one customer id, PII decrypted."""

    customer: Customer | None = None
    identities: list[Identity] = field(default_factory=list)
    stored_responses: list[StoredReply] = field(default_factory=list)
    # The customer's events (moved ones included) as stored: serialized najimi Events, in seq order.
    events: list[bytes] = field(default_factory=list)
    erased_at_us: int | None = None
    erasure_request_id: str = ""


T = TypeVar("T")


class ProfileStore:
    def __init__(
        self,
        database: Database,
        protector: PiiProtector,
        idempotency: Idempotency,
        customer_cache: CustomerCache | None = None,
    ):
        self.db = database
        self.pii = protector
        # Stored replies may hold unmasked PII (for a caller allowed to read it): encrypted.
        self.idempotency = idempotency
        database.engine.update_execution_options(**{ERASURE_REF: protector.erasure_ref})
        # GetCustomer's masked answers (customer_cache.py); none kept unless one is given.
        self.customer_cache = customer_cache if customer_cache is not None else CustomerCache(0)

    async def write_customers(self, customer_ids: Iterable[str] | None, work: Callable[[Connection], T]) -> T:
        """Database.write for a change of these customers' rows (None: of any customer): once
        it has committed, or failed, and so may or may not have, their cached answers go."""
        try:
            return await self.db.write(work)
        finally:
            if customer_ids is None:
                self.customer_cache.clear()
            else:
                self.customer_cache.invalidate(customer_ids)

    # -- encryption at the storage boundary ---------------------------------------------

    def _customer_row(self, customer: Customer) -> dict[str, Any]:
        profile = customer.profile
        plain = {
            "display_name": profile.display_name,
            "email": profile.email,
            "phone": profile.phone,
            "birth_year": "" if profile.birth_year is None else str(profile.birth_year),
        }
        row: dict[str, Any] = {
            f"{name}_ciphertext": self.pii.encrypt_text(
                plain[name], f"customers/{customer.customer_id}/{name}"
            )
            for name in PII_FIELDS
        }
        row.update(
            customer_id=customer.customer_id,
            gender=profile.gender,
            region=profile.region,
            language_code=profile.language_code,
            signup_time_us=profile.signup_time_us,
            attributes=_attributes_json(profile.attributes),
            revision=customer.revision,
            create_time_us=customer.create_time_us,
            update_time_us=customer.update_time_us,
        )
        return row

    def _customer_of(self, row: sa.Row) -> Customer:
        plain = {
            name: self.pii.decrypt_text(
                getattr(row, f"{name}_ciphertext"), f"customers/{row.customer_id}/{name}"
            )
            for name in PII_FIELDS
        }
        profile = Profile(
            display_name=plain["display_name"],
            email=plain["email"],
            phone=plain["phone"],
            birth_year=int(plain["birth_year"]) if plain["birth_year"] else None,
            gender=row.gender,
            region=row.region,
            language_code=row.language_code,
            signup_time_us=row.signup_time_us,
            attributes=_attributes_of(row.attributes),
        )
        return Customer(
            row.customer_id,
            profile,
            row.create_time_us,
            row.update_time_us,
            row.revision,
            merged_into=row.merged_into or "",
        )

    def _identity_row(self, identity: Identity) -> dict[str, Any]:
        return {
            "identity_id": identity.identity_id,
            "customer_id": identity.customer_id,
            "kind": identity.identifier.kind,
            "issuer": identity.identifier.issuer,
            "lookup_hash": self.pii.lookup_hash(identity.identifier.lookup_key),
            "value_ciphertext": self.pii.encrypt(
                identity.identifier.value.encode(), f"identities/{identity.identity_id}/value"
            ),
            "verified": identity.verified,
            "link_time_us": identity.link_time_us,
            "linked_by": identity.linked_by,
        }

    def _identity_of(self, row: sa.Row) -> Identity:
        value = self.pii.decrypt(row.value_ciphertext, f"identities/{row.identity_id}/value").decode()
        return Identity(
            row.identity_id,
            row.customer_id,
            Identifier(row.kind, value, row.issuer),
            bool(row.verified),
            row.link_time_us,
            row.linked_by,
        )

    # -- customers ---------------------------------------------------------------------

    async def create_customer(
        self,
        *,
        principal: str,
        request: Message,
        customer_id: str,
        profile: Profile,
        identifiers: list[Identifier],
        render: RenderCreated,
    ) -> bytes:
        """Creates the customer and links its identifiers in one transaction; returns the
        rendered response, or the first one stored for this (principal, request id).

        Raises AlreadyExists when `customer_id` (chosen by the caller) is taken, or an
        identifier is linked to another customer; nothing is created then.
        """
        rpc = "CreateCustomer"

        def first_result(connection: Connection) -> bytes | None:
            return self.idempotency.recall(connection, principal, rpc, request)

        def conflict(connection: Connection) -> DomainError | None:
            """Why the customer cannot be created, if it cannot."""
            if erasure_of(connection, customer_id) is not None:
                return FailedPrecondition(
                    "customer_id names an erased customer and cannot be used again",
                    reason="CUSTOMER_ERASED",
                )
            taken = connection.execute(
                sa.select(customers.c.customer_id).where(customers.c.customer_id == customer_id)
            ).first()
            if taken is not None:
                # A server-assigned id has 128 random bits: only one the caller chose collides.
                return AlreadyExists("customer_id is taken by another customer", reason="CUSTOMER_ID_TAKEN")
            hashes = [self.pii.lookup_hash(identifier.lookup_key) for identifier in identifiers]
            if not hashes:
                return None
            linked = dict(
                connection.execute(
                    sa.select(identities.c.lookup_hash, identities.c.customer_id).where(
                        identities.c.lookup_hash.in_(hashes)
                    )
                ).all()
            )
            for index, digest in enumerate(hashes):
                if digest in linked:
                    return AlreadyExists(
                        f"identities[{index}] is already linked to another customer",
                        reason="IDENTITY_LINKED_ELSEWHERE",
                        metadata={"field": f"identities[{index}]", "customer_id": linked[digest]},
                    )
            return None

        def create(connection: Connection) -> bytes:
            lock_customer_id(connection, customer_id)
            first = first_result(connection)
            if first is not None:
                return first
            problem = conflict(connection)
            if problem is not None:
                # On PostgreSQL each statement sees the latest commits: the conflict may be a
                # copy of this very request that committed since we looked, so look again.
                first = first_result(connection)
                if first is not None:
                    return first
                raise problem
            now = now_micros()
            # signup_time defaults to the creation time.
            created_profile = (
                profile if profile.signup_time_us is not None else replace(profile, signup_time_us=now)
            )
            customer = Customer(customer_id, created_profile, now, now, 1)
            connection.execute(customers.insert().values(self._customer_row(customer)))
            linked_identities = [
                Identity(new_identity_id(), customer_id, identifier, False, now, principal)
                for identifier in identifiers
            ]
            if linked_identities:
                connection.execute(identities.insert(), [self._identity_row(i) for i in linked_identities])
            response = render(customer, linked_identities)
            self.idempotency.remember(connection, principal, rpc, request, response, customer_id)
            return response

        try:
            return await self.db.write(create)
        except sa.exc.IntegrityError:
            # A concurrent request took the request id, customer id or an identifier between
            # our checks and our inserts (PostgreSQL runs writers in parallel). Running again
            # sees what it committed: the stored response, or the conflict as a domain error.
            return await self.db.write(create)

    async def get_customer(self, customer_id: str) -> Customer | None:
        def query(connection: Connection) -> Customer | None:
            row = connection.execute(
                sa.select(customers).where(customers.c.customer_id == customer_id)
            ).first()
            if row is None:
                return None
            merged_from = merged_from_of(connection, [customer_id]).get(customer_id, ())
            return replace(self._customer_of(row), merged_from=merged_from)

        return await self.db.lookup(query)

    async def update_customer(self, customer_id: str, given: Profile, mask: list[str], etag: str) -> Customer:
        """Applies `mask` of `given` to the customer; `etag`, when set, must be the current one.

        Raises NotFound for an unknown customer, Aborted when the etag is stale.
        """

        def update(connection: Connection) -> Customer:
            # FOR UPDATE: concurrent updates of one customer queue up instead of losing one.
            row = connection.execute(
                sa.select(customers).where(customers.c.customer_id == customer_id).with_for_update()
            ).first()
            if row is None:
                if erasure_of(connection, customer_id) is not None:
                    raise erased_error(customer_id)
                raise NotFound(f"customer {customer_id} not found", reason="CUSTOMER_NOT_FOUND")
            if row.merged_into:
                raise customer_merged_error(customer_id, row.merged_into)
            current = self._customer_of(row)
            current = replace(
                current, merged_from=merged_from_of(connection, [customer_id]).get(customer_id, ())
            )
            if etag and etag != current.etag:
                raise Aborted("customer.etag is stale: read the customer again", reason="ETAG_MISMATCH")
            profile = updated_profile(current.profile, given, mask, current.create_time_us)
            changed = replace(
                current, profile=profile, update_time_us=now_micros(), revision=current.revision + 1
            )
            values = self._customer_row(changed)
            del values["customer_id"], values["create_time_us"]
            connection.execute(
                customers.update().where(customers.c.customer_id == customer_id).values(values)
            )
            return changed

        return await self.write_customers([customer_id], update)

    async def list_customers(
        self, after: str, updated_after_us: int | None, limit: int, show_merged: bool = False
    ) -> list[Customer]:
        """Up to `limit` customers with ids after `after`, ordered by id (keyset paging);
        customers merged into others only when `show_merged`."""

        def query(connection: Connection) -> list[Customer]:
            select = sa.select(customers).where(customers.c.customer_id > after)
            if updated_after_us is not None:
                select = select.where(customers.c.update_time_us >= updated_after_us)
            if not show_merged:
                select = select.where(customers.c.merged_into.is_(None))
            found = [
                self._customer_of(row)
                for row in connection.execute(select.order_by(customers.c.customer_id).limit(limit))
            ]
            merged_from = merged_from_of(connection, [c.customer_id for c in found])
            return [replace(c, merged_from=merged_from.get(c.customer_id, ())) for c in found]

        return await self.db.read(query)

    async def is_erased(self, customer_id: str) -> bool:
        return await self.db.read(lambda connection: erasure_of(connection, customer_id) is not None)

    # -- data-subject requests (services/profile/data_subject.py) -----------------------

    def held_data(self, connection: Connection, customer_id: str) -> HeldData:
        """Everything held about `customer_id`, decrypted, read in the caller's transaction."""
        row = connection.execute(sa.select(customers).where(customers.c.customer_id == customer_id)).first()
        linked = connection.execute(
            sa.select(identities)
            .where(identities.c.customer_id == customer_id)
            .order_by(identities.c.link_time_us, identities.c.identity_id)
        )
        erasure = erasure_of(connection, customer_id)
        return HeldData(
            customer=self._customer_of(row) if row is not None else None,
            identities=[self._identity_of(identity) for identity in linked],
            stored_responses=self.idempotency.replies_about(connection, [customer_id]),
            events=list(
                connection.execute(
                    sa.select(events.c.payload)
                    .where(events.c.customer_id == customer_id)
                    .order_by(events.c.seq)
                ).scalars()
            ),
            erased_at_us=erasure.erased_at_us if erasure is not None else None,
            erasure_request_id=erasure.request_id if erasure is not None else "",
        )

    def erase(self, connection: Connection, customer_id: str, request_id: str, now_us: int) -> dict[str, int]:
        """Deletes every row about `customer_id` and its aliases (the customers merged into it,
        directly or through a chain) in the caller's transaction and leaves a tombstone for each
        id (the first erasure's, if there is one); returns how many rows of each kind were
        deleted (aliases count as customers)."""
        allocate_seqs(connection, 0)  # no event can be stored for this customer meanwhile
        lock_customer_id(connection, customer_id)
        # A merge into this customer takes the same lock: none can add an alias from here on.
        erased_ids = [customer_id, *aliases_of(connection, customer_id)]
        stored = self.idempotency.forget_customers(connection, erased_ids)
        erased_identities = connection.execute(
            identities.delete().where(identities.c.customer_id.in_(erased_ids))
        ).rowcount
        erased_customers = connection.execute(
            customers.delete().where(customers.c.customer_id.in_(erased_ids))
        ).rowcount
        # The merge records name the erased ids (and hold values of their attributes).
        connection.execute(
            merges.delete().where(
                sa.or_(
                    merges.c.source_customer_id.in_(erased_ids), merges.c.target_customer_id.in_(erased_ids)
                )
            )
        )
        for erased_id in erased_ids:
            if erasure_of(connection, erased_id) is None:
                connection.execute(
                    erasures.insert().values(
                        customer_ref=self.pii.erasure_ref(erased_id),
                        erased_at_us=now_us,
                        request_id=request_id,
                    )
                )
        erased_events = connection.execute(
            events.delete().where(events.c.customer_id.in_(erased_ids))
        ).rowcount
        return {
            "customers": erased_customers,
            "identities": erased_identities,
            "stored_responses": stored,
            "events": erased_events,
        }
