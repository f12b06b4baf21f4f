"""The consent service's tables and queries (SQLAlchemy Core)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.db import Database, now_micros
from shared.errors import AlreadyExists

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
