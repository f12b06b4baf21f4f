"""The consent service's tables and queries (SQLAlchemy Core)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2 as pb
from sqlalchemy.engine import Connection

from shared.db import Database, now_micros
from shared.errors import AlreadyExists
from shared.proto_time import timestamp_of

metadata = sa.MetaData()

data_categories = sa.Table(
    "data_categories",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("sensitive", sa.Boolean, nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
)

purposes = sa.Table(
    "purposes",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("data_categories", sa.Text, nullable=False),
    sa.Column("data_uses", sa.Text, nullable=False),
    sa.Column("consent_validity_seconds", sa.BigInteger, nullable=True),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class DataCategory:
    name: str
    display_name: str
    description: str
    sensitive: bool
    created_at_us: int


@dataclass(frozen=True)
class DataUse:
    service: str
    data_categories: list[str]
    description: str


@dataclass(frozen=True)
class Purpose:
    name: str
    display_name: str
    description: str
    data_categories: list[str]
    data_uses: list[DataUse]
    consent_validity_seconds: int | None
    created_at_us: int


def _purpose(row: sa.Row) -> Purpose:
    return Purpose(
        name=row.name,
        display_name=row.display_name,
        description=row.description,
        data_categories=json.loads(row.data_categories),
        data_uses=[DataUse(**use) for use in json.loads(row.data_uses)],
        consent_validity_seconds=row.consent_validity_seconds,
        created_at_us=row.created_at_us,
    )


class ConsentStore:
    def __init__(self, database: Database):
        self.db = database

    async def list_data_categories(self, after: str, limit: int) -> list[DataCategory]:
        """Up to `limit` categories with names after `after`, ordered by name (keyset paging)."""

        def query(connection: Connection) -> list[DataCategory]:
            rows = connection.execute(
                sa.select(data_categories)
                .where(data_categories.c.name > after)
                .order_by(data_categories.c.name)
                .limit(limit)
            )
            return [DataCategory(**row._mapping) for row in rows]

        return await self.db.read(query)

    async def list_purposes(self, after: str, limit: int) -> list[Purpose]:
        def query(connection: Connection) -> list[Purpose]:
            rows = connection.execute(
                sa.select(purposes).where(purposes.c.name > after).order_by(purposes.c.name).limit(limit)
            )
            return [_purpose(row) for row in rows]

        return await self.db.read(query)

    def insert_data_category(
        self, connection: Connection, name: str, display_name: str, description: str, sensitive: bool
    ) -> DataCategory:
        """Adds a category in the caller's transaction; ALREADY_EXISTS when the name is taken."""
        if connection.execute(
            sa.select(data_categories.c.name).where(data_categories.c.name == name)
        ).first():
            raise AlreadyExists(f"data category {name} already exists", reason="DATA_CATEGORY_EXISTS")
        category = DataCategory(name, display_name, description, sensitive, now_micros())
        connection.execute(data_categories.insert().values(**category.__dict__))
        return category


notices = sa.Table(
    "notices",
    metadata,
    sa.Column("purpose", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("material", sa.Boolean, nullable=False),
    sa.Column("effective_at_us", sa.BigInteger, nullable=False),
    sa.Column("language_code", sa.String(35), nullable=False),
    sa.Column("change_summary", sa.Text, nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
)

consents = sa.Table(
    "consents",
    metadata,
    sa.Column("customer_id", sa.String(128), primary_key=True),
    sa.Column("purpose", sa.String(128), primary_key=True),
    sa.Column("decision", sa.SmallInteger, nullable=False),
    sa.Column("categories", sa.Text, nullable=False),
    sa.Column("notice_version", sa.Integer, nullable=False),
    sa.Column("collection_method", sa.SmallInteger, nullable=False),
    sa.Column("jurisdiction", sa.String(64), nullable=False),
    sa.Column("given_at_us", sa.BigInteger, nullable=False),
    sa.Column("expires_at_us", sa.BigInteger, nullable=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("receipt_id", sa.String(64), nullable=False),
    sa.Column("expiry_published", sa.Boolean, nullable=False),
)

consent_history = sa.Table(
    "consent_history",
    metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("purpose", sa.String(128), nullable=False),
    sa.Column("decision", sa.SmallInteger, nullable=False),
    sa.Column("categories", sa.Text, nullable=False),
    sa.Column("withdrawn_categories", sa.Text, nullable=False),
    sa.Column("notice_version", sa.Integer, nullable=False),
    sa.Column("collection_method", sa.SmallInteger, nullable=False),
    sa.Column("jurisdiction", sa.String(64), nullable=False),
    sa.Column("given_at_us", sa.BigInteger, nullable=False),
    sa.Column("expires_at_us", sa.BigInteger, nullable=True),
    sa.Column("receipt_id", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(160), nullable=False),
)

changes = sa.Table(
    "changes",
    metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("purpose", sa.String(128), nullable=False),
    sa.Column("status", sa.SmallInteger, nullable=False),
    sa.Column("categories", sa.Text, nullable=False),
    sa.Column("notice_version", sa.Integer, nullable=False),
    sa.Column("expires_at_us", sa.BigInteger, nullable=True),
    sa.Column("changed_at_us", sa.BigInteger, nullable=False),
    sa.Column("effective_at_us", sa.BigInteger, nullable=True),
    # ERASURE changes: JSON list of the erased customer's removed revisions (migration 0004).
    sa.Column("erased_revisions", sa.Text, nullable=True),
)

receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("receipt_id", sa.String(64), primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("issued_at_us", sa.BigInteger, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
)

feed_head = sa.Table(
    "feed_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("audit_sequence", sa.BigInteger, nullable=False),
    sa.Column("audit_head_hash", sa.LargeBinary, nullable=False),
)


def allocate_revision(connection: Connection) -> int:
    """The next global revision. The row lock it takes is held to commit, so revisions
    commit in order: a reader that has seen revision N has seen everything below it."""
    connection.execute(
        feed_head.update().where(feed_head.c.id == 1).values(revision=feed_head.c.revision + 1)
    )
    return current_revision(connection)


def current_revision(connection: Connection) -> int:
    return int(connection.execute(sa.select(feed_head.c.revision).where(feed_head.c.id == 1)).scalar_one())


def insert_change(connection: Connection, change: pb.ConsentChange) -> None:
    connection.execute(
        changes.insert().values(
            revision=change.revision,
            kind=change.kind,
            customer_id=change.customer_id,
            purpose=change.purpose,
            status=change.status,
            categories=json.dumps(list(change.granted_data_categories)),
            notice_version=change.notice_version,
            expires_at_us=change.expire_time.ToMicroseconds() if change.HasField("expire_time") else None,
            changed_at_us=change.change_time.ToMicroseconds(),
            effective_at_us=change.effective_time.ToMicroseconds()
            if change.HasField("effective_time")
            else None,
            erased_revisions=json.dumps(list(change.erased_revisions)) if change.erased_revisions else None,
        )
    )


def change_of(row: sa.Row) -> pb.ConsentChange:
    return pb.ConsentChange(
        revision=row.revision,
        kind=row.kind,  # type: ignore[arg-type]
        customer_id=row.customer_id,
        purpose=row.purpose,
        status=row.status,  # type: ignore[arg-type]
        granted_data_categories=json.loads(row.categories),
        notice_version=row.notice_version,
        expire_time=timestamp_of(row.expires_at_us),
        change_time=timestamp_of(row.changed_at_us),
        effective_time=timestamp_of(row.effective_at_us),
        erased_revisions=json.loads(row.erased_revisions) if row.erased_revisions else (),
    )


def changes_after(
    connection: Connection, since_revision: int, limit: int, purposes_filter: frozenset[str] = frozenset()
) -> list[pb.ConsentChange]:
    query = sa.select(changes).where(changes.c.revision > since_revision)
    if purposes_filter:
        query = query.where(
            sa.or_(changes.c.purpose.in_(purposes_filter), changes.c.kind == pb.CONSENT_CHANGE_KIND_ERASURE)
        )
    rows = connection.execute(query.order_by(changes.c.revision).limit(limit))
    return [change_of(row) for row in rows]


def notice_of(row: sa.Row) -> pb.PrivacyNotice:
    return pb.PrivacyNotice(
        purpose=row.purpose,
        version=row.version,
        text=row.text,
        url=row.url,
        material=row.material,
        effective_time=timestamp_of(row.effective_at_us),
        language_code=row.language_code,
        change_summary=row.change_summary,
        create_time=timestamp_of(row.created_at_us),
    )


def load_purpose(connection: Connection, name: str) -> Purpose | None:
    row = connection.execute(sa.select(purposes).where(purposes.c.name == name)).first()
    return _purpose(row) if row else None


def load_purposes(connection: Connection) -> list[Purpose]:
    return [_purpose(row) for row in connection.execute(sa.select(purposes).order_by(purposes.c.name))]


def load_data_categories(connection: Connection) -> list[DataCategory]:
    rows = connection.execute(sa.select(data_categories).order_by(data_categories.c.name))
    return [DataCategory(**row._mapping) for row in rows]
