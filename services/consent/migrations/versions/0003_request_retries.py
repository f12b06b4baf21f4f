"""When each service's part of a data-subject request is next tried.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("data_subject_request_services") as batch:
        batch.add_column(sa.Column("next_attempt_at_us", sa.BigInteger, nullable=False, server_default="0"))
    with op.batch_alter_table("data_subject_requests") as batch:
        batch.add_column(sa.Column("customer_ref", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("client_request_id", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("data_subject_requests") as batch:
        batch.drop_column("client_request_id")
        batch.drop_column("customer_ref")
    with op.batch_alter_table("data_subject_request_services") as batch:
        batch.drop_column("next_attempt_at_us")
