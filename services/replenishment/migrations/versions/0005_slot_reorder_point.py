"""slots.reorder_point: the reorder point of the slot's latest forecast.

Revision ID: 0005
Revises: 0004

The decision (ordering.py) keeps it, so a slot's status (LOW at or below it) and the LOW
slot event follow the forecast rather than the fixed fallback_reorder_level. NULL while
the forecast has too few readings to estimate a rate: the fallback level applies then.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("slots", sa.Column("reorder_point", sa.Double, nullable=True))


def downgrade() -> None:
    op.drop_column("slots", "reorder_point")
