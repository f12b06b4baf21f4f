"""The local consented copy of the interactions, and the feed cursor it reached.

Revision ID: 0003
Revises: 0002

services/recommendation/interactions.py fills `interactions` from profile's interaction
feed; `feed_cursors` remembers where the copy is in that feed, written in the same
transaction as the entries, so a restart resumes without losing or repeating any.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("interaction_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("interaction_type", sa.Integer, nullable=False),
        sa.Column("weight", sa.Float, nullable=False),
        sa.Column("occur_time_us", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("channel", sa.Integer, nullable=False),
        sa.Column("data_category", sa.String(128), nullable=False),
        # When this service stored it: the consent sweep judges only entries stored
        # before its consent cache last confirmed being caught up.
        sa.Column("stored_at_us", sa.BigInteger, nullable=False),
    )
    op.create_index("interactions_by_customer", "interactions", ["customer_id", "data_category"])
    op.create_table(
        "feed_cursors",
        sa.Column("feed", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feed_cursors")
    op.drop_index("interactions_by_customer", table_name="interactions")
    op.drop_table("interactions")
