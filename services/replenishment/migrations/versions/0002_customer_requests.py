"""Which customer each stored response of an idempotent request is about.

Revision ID: 0002
Revises: 0001

An erasure (najimi.privacy.v1.DataSubjectService) deletes the customer's devices and
slots, and with this table finds the stored responses (`idempotency`, with their
`request_digests`) that copy them, so a retry of RegisterDevice cannot bring an erased
device back. Responses stored before this revision are not listed; no release holds any.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customer_requests",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False),
    )
    op.create_index("customer_requests_by_customer", "customer_requests", ["customer_id"])


def downgrade() -> None:
    op.drop_index("customer_requests_by_customer", table_name="customer_requests")
    op.drop_table("customer_requests")
