"""slots.readings_revision: a fresh random number at every write of the slot's readings.

Revision ID: 0006
Revises: 0005

Each replica keeps the readings of a slot's current epoch in process between decisions
(epoch_series.py) and trusts them only while the slot's stored revision is the one they
were read or written at: another replica's write, a write rolled back after the copy was
updated, or a restart all show as a different (or unknown) revision. NULL until the
slot's first reading.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("slots", sa.Column("readings_revision", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("slots", "readings_revision")
