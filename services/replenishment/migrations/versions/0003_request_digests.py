"""One idempotency table: digest and customer move into `idempotency`.

Revision ID: 0003
Revises: 0002

shared/idempotency.py keeps, beside each stored reply, a keyed digest of the request
(a reused request_id with a different request is REQUEST_ID_REUSED) and the customer
the reply is about (an erasure deletes it); rows older than the retention are purged
by creation time. The customer moves over from `customer_requests`. The old digests
(plain SHA-256 of the registration) cannot be compared with the new keyed ones: those
rows are answered as retries until they expire. The erasures' own replies named their
customer and are dropped (a retry of such an erasure erases again, which finds nothing).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

KEY_COLUMNS = ("principal", "rpc", "request_id")


def upgrade() -> None:
    with op.batch_alter_table("idempotency") as batch:
        batch.add_column(sa.Column("request_digest", sa.LargeBinary(32), nullable=True))
        batch.add_column(sa.Column("customer_id", sa.String(128), nullable=True))
    op.execute(
        "UPDATE idempotency SET customer_id = (SELECT r.customer_id FROM customer_requests r "
        "WHERE r.principal = idempotency.principal AND r.rpc = idempotency.rpc "
        "AND r.request_id = idempotency.request_id)"
    )
    op.execute("DELETE FROM idempotency WHERE rpc = 'EraseCustomerData'")
    op.create_index("idempotency_by_customer", "idempotency", ["customer_id"])
    op.create_index("idempotency_by_age", "idempotency", ["created_at_us"])
    op.drop_index("customer_requests_by_customer", table_name="customer_requests")
    op.drop_table("customer_requests")
    op.drop_table("request_digests")


def downgrade() -> None:
    op.create_table(
        "request_digests",
        *(
            sa.Column(name, sa.String(160 if name == "principal" else 64), primary_key=True)
            for name in KEY_COLUMNS
        ),
        sa.Column("digest", sa.String(64), nullable=False),
    )
    op.create_table(
        "customer_requests",
        *(
            sa.Column(name, sa.String(160 if name == "principal" else 64), primary_key=True)
            for name in KEY_COLUMNS
        ),
        sa.Column("customer_id", sa.String(128), nullable=False),
    )
    op.create_index("customer_requests_by_customer", "customer_requests", ["customer_id"])
    op.execute(
        "INSERT INTO customer_requests (principal, rpc, request_id, customer_id) "
        "SELECT principal, rpc, request_id, customer_id FROM idempotency WHERE customer_id IS NOT NULL"
    )
    op.drop_index("idempotency_by_age", table_name="idempotency")
    op.drop_index("idempotency_by_customer", table_name="idempotency")
    with op.batch_alter_table("idempotency") as batch:
        batch.drop_column("customer_id")
        batch.drop_column("request_digest")
