"""Devices, their slots and device tokens; request ids of creating RPCs.

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
        "devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("serial_number", sa.String(128), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("firmware_version", sa.String(64), nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),  # JSON object of strings
        sa.Column("state", sa.String(16), nullable=False),  # ACTIVE or DEREGISTERED
        sa.Column("token_hash", sa.String(64), nullable=True),  # SHA-256 hex; NULL once revoked
        sa.Column("token_create_time_us", sa.BigInteger, nullable=False),
        sa.Column("last_seen_time_us", sa.BigInteger, nullable=True),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
        sa.Column("deregister_time_us", sa.BigInteger, nullable=True),
    )
    # Authentication looks every device call up by its token hash.
    op.create_index("devices_token_hash", "devices", ["token_hash"], unique=True)
    # One active device per manufacturer, model and serial number, enforced by the database.
    active = sa.text("state = 'ACTIVE'")
    op.create_index(
        "devices_active_serial",
        "devices",
        ["manufacturer", "model", "serial_number"],
        unique=True,
        sqlite_where=active,
        postgresql_where=active,
    )
    # ListDevices: a customer's devices, newest registration first.
    op.create_index("devices_customer", "devices", ["customer_id", "create_time_us", "device_id"])
    op.create_table(
        "slots",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.device_id"), primary_key=True),
        sa.Column("slot_id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("capacity", sa.Double, nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("reorder_quantity", sa.Integer, nullable=False),
        sa.Column("unit_price_micros", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("policy", sa.String(16), nullable=False),  # AUTO, NOTIFY_ONLY or OFF
        sa.Column("lead_time_us", sa.BigInteger, nullable=False),
        sa.Column("service_level", sa.Double, nullable=False),
        sa.Column("fallback_reorder_level", sa.Double, nullable=False),
        sa.Column("max_orders_per_period", sa.Integer, nullable=False),
        sa.Column("limit_period_us", sa.BigInteger, nullable=False),
        sa.Column("max_spend_micros", sa.BigInteger, nullable=False),
        sa.Column("limit_currency_code", sa.String(3), nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "idempotency",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "request_digests",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),  # SHA-256 hex of the request's content
    )


def downgrade() -> None:
    op.drop_table("request_digests")
    op.drop_table("idempotency")
    op.drop_table("slots")
    op.drop_index("devices_customer", "devices")
    op.drop_index("devices_active_serial", "devices")
    op.drop_index("devices_token_hash", "devices")
    op.drop_table("devices")
