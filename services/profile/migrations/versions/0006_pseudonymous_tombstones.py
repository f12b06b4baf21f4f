"""Erasure tombstones hold a keyed hash; one idempotency table.

Revision ID: 0006
Revises: 0005

`erasures` kept the erased customer's id in plain text. It now keeps `customer_ref`,
the HMAC-SHA256 of the id under a subkey of the PII master key (PiiProtector.erasure_ref,
given to this migration by the service as the `erasure_ref` attribute): an incoming id is
hashed and looked up, so an erased id is still refused, and the table names no one.

`idempotency` gets a keyed digest of each request (REQUEST_ID_REUSED) and the customer
the reply is about, moved over from `customer_requests` (dropped); rows older than the
retention are purged by creation time. Rows stored before have no digest and are
answered as retries; the erasures' own replies named their customer and are dropped
(a retry of such an erasure erases again, which finds the tombstone and nothing else).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    connection = op.get_bind()
    old = connection.execute(sa.text("SELECT customer_id, erased_at_us, request_id FROM erasures")).all()
    config = op.get_context().config
    erasure_ref = config.attributes.get("erasure_ref") if config is not None else None
    if old and erasure_ref is None:
        raise RuntimeError("migration 0006 hashes the erasure tombstones: run it from the service (PII key)")
    op.drop_table("erasures")
    erasures = op.create_table(
        "erasures",
        sa.Column("customer_ref", sa.String(64), primary_key=True),
        sa.Column("erased_at_us", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),  # of the first EraseCustomerData
    )
    if old and erasure_ref is not None:
        op.bulk_insert(
            erasures,
            [
                {
                    "customer_ref": erasure_ref(row.customer_id),
                    "erased_at_us": row.erased_at_us,
                    "request_id": row.request_id,
                }
                for row in old
            ],
        )
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


def downgrade() -> None:
    """The hashed tombstones cannot be turned back into ids: they are dropped."""
    op.create_table(
        "customer_requests",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
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
    op.drop_table("erasures")
    op.create_table(
        "erasures",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("erased_at_us", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
    )
