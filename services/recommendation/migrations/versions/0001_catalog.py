"""The item catalog, and the request ids of creating calls.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Byte order on PostgreSQL whatever the database's locale: paging by item_id is the same everywhere.
ITEM_ID = sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("item_id", ITEM_ID, primary_key=True),
        sa.Column("title", sa.String(256), nullable=False),
        sa.Column("category_path", sa.Text, nullable=False),  # JSON list of segments
        sa.Column("category_key", sa.Text, nullable=False),  # segments each followed by "/"
        sa.Column("brand", sa.String(128), nullable=False),
        sa.Column("price_micros", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),  # JSON list
        sa.Column("available", sa.Boolean, nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),  # JSON object
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "idempotency",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency")
    op.drop_table("items")
