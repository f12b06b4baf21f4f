"""Trait aggregates, kept current by the trait worker as events arrive.

Revision ID: 0004
Revises: 0003

`trait_cursor` (one row) holds the seq of the last event added to the aggregates (the
worker follows `events` after it) and a generation counter that rebuilds and erasures
increment, so that a batch read before them is read again. The aggregate tables are
keyed by customer first, so one customer's traits are a few range reads
(services/profile/trait_store.py): `trait_orders` (one row per purchase or return),
`trait_item_purchases` (one row per item and order) and `trait_affinities`
(time-decayed interaction weights per category path and interaction kind, as their
value at a fixed epoch so that new ones add in SQL; `category_key` is the SHA-256 of the
path's JSON). Existing events are added by the worker after the upgrade, from seq 0.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    cursor = op.create_table(
        "trait_cursor",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),  # +1 on each rebuild or erasure
    )
    op.bulk_insert(cursor, [dict(id=1, seq=0, generation=0)])
    op.create_table(
        "trait_orders",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),  # "purchase" or "return"
        sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
        sa.Column("value_micros", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("channel", sa.SmallInteger, nullable=False),
        sa.Column("store_id", sa.String(64), nullable=False),
        sa.Column("data_category", sa.String(64), nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "trait_item_purchases",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("item_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
        sa.Column("data_category", sa.String(64), nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "trait_affinities",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("category_key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("category_path", sa.Text, nullable=False),  # JSON array, root first
        sa.Column("data_category", sa.String(64), nullable=False),
        sa.Column("interactions", sa.BigInteger, nullable=False),
        # The interactions' weights decayed to 2025-01-01T00:00Z (trait_store.STORAGE_EPOCH_US).
        sa.Column("weight", sa.Double, nullable=False),
        sa.Column("last_at_us", sa.BigInteger, nullable=False),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    for name in ("trait_affinities", "trait_item_purchases", "trait_orders", "trait_cursor"):
        op.drop_table(name)
