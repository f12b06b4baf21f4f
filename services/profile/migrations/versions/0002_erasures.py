"""Erasure tombstones, and which stored responses name which customer.

Revision ID: 0002
Revises: 0001

`erasures` keeps one row per erased customer id (najimi.privacy.v1.DataSubjectService):
all that is left of the customer, so that the id reads as erased and is never reused.

`customer_requests` says which customer each stored idempotent response (table
`idempotency`, encrypted) is about, so an erasure finds and deletes those copies of the
customer's data too. Responses stored before this revision are not listed; no release
holds any.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("erased_at_us", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),  # of the first EraseCustomerData
    )
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
    op.drop_table("erasures")
