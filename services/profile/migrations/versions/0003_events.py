"""Events from every channel, and customer merges.

Revision ID: 0003
Revises: 0002

`events` holds every accepted event once (event_id is unique). `seq` is handed out
under the single row of `event_head`, inside the inserting transaction, so events
commit in seq order and a reader following seq (the interaction feed) never skips
one that commits late. The event itself is kept as its serialized najimi Event
(`payload`); the columns beside it are what queries filter and aggregate on.

A merged customer keeps its row with `merged_into` set (an alias that still
resolves); `merges` records each merge and its conflicts.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    head = op.create_table(
        "event_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(head, [dict(id=1, seq=0)])
    op.create_table(
        "events",
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
        sa.Column("payload", sa.LargeBinary, nullable=False),  # the serialized najimi.profile.v1.Event
    )
    op.create_index("events_by_customer_time", "events", ["customer_id", "occurred_at_us"])
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("merged_into", sa.String(128), nullable=True))
    op.create_table(
        "merges",
        sa.Column("source_customer_id", sa.String(128), primary_key=True),
        sa.Column("target_customer_id", sa.String(128), nullable=False, index=True),
        sa.Column("merged_at_us", sa.BigInteger, nullable=False),
        sa.Column("merged_by", sa.String(160), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("moved", sa.Text, nullable=False),  # JSON {"identities": n, "events": n, "attributes": n}
        sa.Column("conflicts", sa.Text, nullable=False),  # JSON [{"field": ..., "kept": "target"}]
    )


def downgrade() -> None:
    op.drop_table("merges")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("merged_into")
    op.drop_index("events_by_customer_time", "events")
    op.drop_table("events")
    op.drop_table("event_head")
