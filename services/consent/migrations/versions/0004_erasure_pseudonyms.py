"""Erasure changes name a pseudonym; stored replies carry a digest and their customer.

Revision ID: 0004
Revises: 0003

An ERASURE change on the feed outlives the customer it announces. It now holds
"erased:<customer_ref>" (the audit log's keyed hash, shared with the audit trail;
the service gives the audit key to this migration as the `customer_ref_key`
attribute) and, in `erased_revisions`, the revisions of the customer's changes it
removed from the feed: a cache drops the records those changes set, without the id.

`idempotency` gets a keyed digest of each request (REQUEST_ID_REUSED) and the customer
the reply is about (an erasure deletes it); rows older than the retention are purged
by creation time. The replies stored before, by the RPCs about a customer, name the
customer but say so nowhere an erasure can find: they are dropped (v1 is unreleased;
a retry of one of them is carried out again).
"""

import hashlib
import hmac

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ERASURE_KIND = 4  # CONSENT_CHANGE_KIND_ERASURE
CUSTOMER_RPCS = (
    "GrantConsent",
    "WithdrawConsent",
    "SetConsents",
    "CreateDataSubjectRequest",
    "EraseCustomerData",
)


def upgrade() -> None:
    with op.batch_alter_table("changes") as batch:
        batch.add_column(sa.Column("erased_revisions", sa.Text, nullable=True))
    connection = op.get_bind()
    erased = connection.execute(
        sa.text(
            "SELECT revision, customer_id FROM changes WHERE kind = :kind AND customer_id NOT LIKE 'erased:%'"
        ),
        {"kind": ERASURE_KIND},
    ).all()
    config = op.get_context().config
    key: bytes | None = config.attributes.get("customer_ref_key") if config is not None else None
    if erased and key is None:
        raise RuntimeError(
            "migration 0004 pseudonymises stored erasures: run it from the service (audit key)"
        )
    for revision_, customer_id in erased if key is not None else ():
        ref = hmac.new(key or b"", customer_id.encode("utf-8"), hashlib.sha256).hexdigest()
        connection.execute(
            sa.text(
                "UPDATE changes SET customer_id = :ref, erased_revisions = '[]' WHERE revision = :revision"
            ),
            {"ref": "erased:" + ref, "revision": revision_},
        )
    with op.batch_alter_table("idempotency") as batch:
        batch.add_column(sa.Column("request_digest", sa.LargeBinary(32), nullable=True))
        batch.add_column(sa.Column("customer_id", sa.String(128), nullable=True))
    op.execute(
        sa.text("DELETE FROM idempotency WHERE rpc IN :rpcs").bindparams(
            sa.bindparam("rpcs", CUSTOMER_RPCS, expanding=True)
        )
    )
    op.create_index("idempotency_by_customer", "idempotency", ["customer_id"])
    op.create_index("idempotency_by_age", "idempotency", ["created_at_us"])


def downgrade() -> None:
    op.drop_index("idempotency_by_age", table_name="idempotency")
    op.drop_index("idempotency_by_customer", table_name="idempotency")
    with op.batch_alter_table("idempotency") as batch:
        batch.drop_column("customer_id")
        batch.drop_column("request_digest")
    with op.batch_alter_table("changes") as batch:
        batch.drop_column("erased_revisions")
