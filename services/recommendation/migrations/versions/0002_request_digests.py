"""Stored replies carry a digest of their request and the customer they are about.

Revision ID: 0002
Revises: 0001

shared/idempotency.py: a request_id reused for a different request is refused
(REQUEST_ID_REUSED), an erasure deletes the replies about its customer, and rows older
than the retention are purged (by creation time). Rows stored before have no digest and
are answered as retries; the erasures' own replies named their customer and are dropped
(a retry of such an erasure erases again, which finds nothing).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency") as batch:
        batch.add_column(sa.Column("request_digest", sa.LargeBinary(32), nullable=True))
        batch.add_column(sa.Column("customer_id", sa.String(128), nullable=True))
    op.create_index("idempotency_by_customer", "idempotency", ["customer_id"])
    op.create_index("idempotency_by_age", "idempotency", ["created_at_us"])
    op.execute("DELETE FROM idempotency WHERE rpc = 'EraseCustomerData'")


def downgrade() -> None:
    op.drop_index("idempotency_by_age", table_name="idempotency")
    op.drop_index("idempotency_by_customer", table_name="idempotency")
    with op.batch_alter_table("idempotency") as batch:
        batch.drop_column("customer_id")
        batch.drop_column("request_digest")
