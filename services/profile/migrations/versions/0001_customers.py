"""Customers (PII encrypted), their identities (looked up by keyed hash), and request ids.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.String(64), primary_key=True),
        # AES-256-GCM ciphertexts (services/profile/pii.py); NULL when unknown.
        sa.Column("display_name_ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("email_ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("phone_ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("birth_year_ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("gender", sa.String(16), nullable=False),  # "" when not recorded
        sa.Column("region", sa.String(8), nullable=False),
        sa.Column("language_code", sa.String(35), nullable=False),
        sa.Column("signup_time_us", sa.BigInteger, nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),  # JSON {key: {kind, value, data_category}}
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "identities",
        sa.Column("identity_id", sa.String(40), primary_key=True),
        sa.Column("customer_id", sa.String(64), sa.ForeignKey("customers.customer_id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        # HMAC-SHA256 of (kind, issuer, normalised value): one customer per identifier.
        sa.Column("lookup_hash", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("value_ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("link_time_us", sa.BigInteger, nullable=False),
        sa.Column("linked_by", sa.String(160), nullable=False),
    )
    op.create_index("identities_by_customer", "identities", ["customer_id", "link_time_us", "identity_id"])
    op.create_table(
        "idempotency",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency")
    op.drop_index("identities_by_customer", table_name="identities")
    op.drop_table("identities")
    op.drop_table("customers")
