"""Serving: catalog deletions kept as tombstones, and the erasures the served model must mask.

Revision ID: 0005
Revises: 0004

- items.delete_time_us: DeleteItem sets it (and update_time_us) instead of removing the
  row, so every replica's in-memory catalog, which follows update_time_us, sees the
  deletion and masks the item at once; reads and training leave such rows out, and an
  upsert of the id creates the item again.
- serving_erasures: customers erased after a model was trained are still rows of its
  arrays; every replica masks the ones erased since that model's training started, so
  they are a cold start from the next request on.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("delete_time_us", sa.BigInteger, nullable=True))
    op.create_index("items_by_update_time", "items", ["update_time_us"])
    op.create_table(
        "serving_erasures",
        # The customer's keyed hash (shared/keys.py, the service's pseudonym key): it names no one.
        sa.Column("customer_ref", sa.String(64), primary_key=True),
        sa.Column("erase_time_us", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("serving_erasures")
    op.drop_index("items_by_update_time", table_name="items")
    op.drop_column("items", "delete_time_us")
