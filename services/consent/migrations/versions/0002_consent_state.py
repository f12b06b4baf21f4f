"""Consent state: notices, decisions and their history, the change feed, receipts,
the audit chain, and data-subject requests.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row: the head of the change feed and of the audit chain. Every change takes
    # this row's lock first, so revisions and audit sequences are handed out in commit
    # order and a reader never sees revision N+1 before N.
    head = op.create_table(
        "feed_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("audit_sequence", sa.BigInteger, nullable=False),
        sa.Column("audit_head_hash", sa.LargeBinary, nullable=False),
    )
    op.bulk_insert(head, [dict(id=1, revision=0, audit_sequence=0, audit_head_hash=bytes(32))])
    op.create_table(
        "notices",
        sa.Column("purpose", sa.String(128), sa.ForeignKey("purposes.name"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("material", sa.Boolean, nullable=False),
        sa.Column("effective_at_us", sa.BigInteger, nullable=False),
        sa.Column("language_code", sa.String(35), nullable=False),
        sa.Column("change_summary", sa.Text, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
    # Version 1 of each default purpose's notice, so the default vocabulary can be consented to.
    created = 1_767_225_600_000_000  # 2026-01-01, as the default vocabulary
    default_notices = sa.table(
        "notices",
        *(
            sa.column(c)
            for c in (
                "purpose",
                "version",
                "text",
                "url",
                "material",
                "effective_at_us",
                "language_code",
                "change_summary",
                "created_at_us",
            )
        ),
    )
    purposes = sa.table("purposes", sa.column("name"), sa.column("description"))
    for name, description in op.get_bind().execute(sa.select(purposes.c.name, purposes.c.description)):
        op.execute(
            default_notices.insert().values(
                purpose=name,
                version=1,
                text=description,
                url=f"https://example.com/privacy/{name}/v1",
                material=True,
                effective_at_us=created,
                language_code="en",
                change_summary="First version.",
                created_at_us=created,
            )
        )
    op.create_table(
        "consents",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("purpose", sa.String(128), sa.ForeignKey("purposes.name"), primary_key=True),
        sa.Column("decision", sa.SmallInteger, nullable=False),  # ConsentDecision
        sa.Column("categories", sa.Text, nullable=False),  # JSON list
        sa.Column("notice_version", sa.Integer, nullable=False),
        sa.Column("collection_method", sa.SmallInteger, nullable=False),
        sa.Column("jurisdiction", sa.String(64), nullable=False),
        sa.Column("given_at_us", sa.BigInteger, nullable=False),
        sa.Column("expires_at_us", sa.BigInteger, nullable=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("receipt_id", sa.String(64), nullable=False),
        # Set once the EXPIRED change of this grant has been published.
        sa.Column("expiry_published", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("consents_expiring", "consents", ["expiry_published", "expires_at_us"])
    op.create_table(
        "consent_history",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(128), nullable=False),
        sa.Column("decision", sa.SmallInteger, nullable=False),
        sa.Column("categories", sa.Text, nullable=False),
        sa.Column("withdrawn_categories", sa.Text, nullable=False),
        sa.Column("notice_version", sa.Integer, nullable=False),
        sa.Column("collection_method", sa.SmallInteger, nullable=False),
        sa.Column("jurisdiction", sa.String(64), nullable=False),
        sa.Column("given_at_us", sa.BigInteger, nullable=False),
        sa.Column("expires_at_us", sa.BigInteger, nullable=True),
        sa.Column("receipt_id", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
    )
    op.create_index("consent_history_by_customer", "consent_history", ["customer_id", "revision"])
    op.create_table(
        "changes",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),  # ConsentChangeKind
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(128), nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=False),  # ConsentStatus
        sa.Column("categories", sa.Text, nullable=False),
        sa.Column("notice_version", sa.Integer, nullable=False),
        sa.Column("expires_at_us", sa.BigInteger, nullable=True),
        sa.Column("changed_at_us", sa.BigInteger, nullable=False),
        sa.Column("effective_at_us", sa.BigInteger, nullable=True),
    )
    op.create_index("changes_by_customer", "changes", ["customer_id"])
    op.create_table(
        "receipts",
        sa.Column("receipt_id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False, index=True),
        sa.Column("issued_at_us", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("recorded_at_us", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("action", sa.SmallInteger, nullable=False),  # AuditAction
        sa.Column("customer_id", sa.String(160), nullable=False),
        sa.Column("customer_ref", sa.String(64), nullable=False, index=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("details", sa.Text, nullable=False),  # JSON object
        sa.Column("prev_hash", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "data_subject_requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False, index=True),
        sa.Column("type", sa.SmallInteger, nullable=False),  # DataSubjectRequestType
        sa.Column("state", sa.SmallInteger, nullable=False),  # DataSubjectRequestState
        sa.Column("created_by", sa.String(160), nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        sa.Column("updated_at_us", sa.BigInteger, nullable=False),
        sa.Column("due_at_us", sa.BigInteger, nullable=False),
        sa.Column("completed_at_us", sa.BigInteger, nullable=True),
        sa.Column("document", sa.Text, nullable=True),  # the combined export, JSON
        sa.Column("export_expires_at_us", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "data_subject_request_services",
        sa.Column(
            "request_id", sa.String(64), sa.ForeignKey("data_subject_requests.request_id"), primary_key=True
        ),
        sa.Column("service", sa.String(64), primary_key=True),
        sa.Column("state", sa.SmallInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("completed_at_us", sa.BigInteger, nullable=True),
        sa.Column("erased_records", sa.Text, nullable=False),  # JSON object
        sa.Column("document", sa.Text, nullable=True),  # this service's export part, JSON
    )


def downgrade() -> None:
    for table in (
        "data_subject_request_services",
        "data_subject_requests",
        "audit_log",
        "receipts",
        "changes",
        "consent_history",
        "consents",
        "notices",
        "feed_head",
    ):
        op.drop_table(table)
