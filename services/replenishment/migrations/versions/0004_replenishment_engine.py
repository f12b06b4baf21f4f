"""Telemetry, slot and order feeds, orders: the tables of the replenishment engine.

Revision ID: 0004
Revises: 0003

Devices gain the test flag, pause and token rotation (a previous token with its grace
end); slots gain pause, the expected stock after a delivery and the service's current
view of the slot (latest level by measure_time, consumption epoch, last decision, when
a deferred decision is due). New tables:

- readings: every accepted reading, UNIQUE(device_id, reading_id) (idempotency).
- orders: one row per order. At most one open order per slot is enforced by the
  partial unique index orders_one_open_per_slot (state PENDING, PLACED or SHIPPED);
  no foreign key to devices or slots (orders outlive both; erasure pseudonymises
  customer_id instead of deleting orders kept for accounting).
- order_events / slot_events: the two feeds, each with its own strictly increasing
  revision taken from feed_heads under a row lock (revisions commit in order, as in
  the consent feed), so a watcher that saw N saw everything below it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OPEN = sa.text("state IN ('PENDING', 'PLACED', 'SHIPPED')")
PENDING = sa.text("state = 'PENDING'")


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite supports it with a constant default): no table rebuild, so the
    # partial indexes of 0001 stay as they are.
    op.add_column("devices", sa.Column("test", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("devices", sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()))
    # RotateDeviceToken: the previous token's hash authenticates until its grace ends.
    op.add_column("devices", sa.Column("previous_token_hash", sa.String(64), nullable=True))
    op.add_column("devices", sa.Column("previous_token_expire_time_us", sa.BigInteger, nullable=True))
    op.create_index("devices_previous_token_hash", "devices", ["previous_token_hash"], unique=True)
    op.add_column("slots", sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()))
    # 0 means capacity.
    op.add_column(
        "slots", sa.Column("expected_stock_after_delivery", sa.Double, nullable=False, server_default="0")
    )
    # The latest level by measure_time (or the expected stock after a delivery).
    op.add_column("slots", sa.Column("level", sa.Double, nullable=True))
    op.add_column("slots", sa.Column("level_time_us", sa.BigInteger, nullable=True))
    op.add_column("slots", sa.Column("level_source", sa.String(16), nullable=True))  # READING or DELIVERY
    # Consumption epochs: a refill or delivery starts the next one.
    op.add_column("slots", sa.Column("epoch", sa.Integer, nullable=False, server_default="0"))
    op.add_column("slots", sa.Column("epoch_start_time_us", sa.BigInteger, nullable=True))
    op.add_column("slots", sa.Column("last_refill_time_us", sa.BigInteger, nullable=True))
    # The latest decision (a ReplenishOutcome name) and when; slot events on change only.
    op.add_column("slots", sa.Column("last_outcome", sa.String(32), nullable=True))
    op.add_column("slots", sa.Column("last_outcome_time_us", sa.BigInteger, nullable=True))
    # A decision deferred (consent state stale) is re-evaluated once this time passes.
    op.add_column("slots", sa.Column("decision_due_time_us", sa.BigInteger, nullable=True))
    op.create_index("slots_decision_due", "slots", ["decision_due_time_us"])

    op.create_table(
        "readings",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("reading_id", sa.String(64), primary_key=True),  # idempotency per device
        sa.Column("slot_id", sa.String(64), nullable=False),
        sa.Column("level", sa.Double, nullable=False),
        sa.Column("measure_time_us", sa.BigInteger, nullable=False),  # device clock, bounded skew
        sa.Column("receive_time_us", sa.BigInteger, nullable=False),  # server clock
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("refill", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    # A slot's series in measure_time order (state, refill detection, forecast).
    op.create_index("readings_by_slot", "readings", ["device_id", "slot_id", "measure_time_us"])

    op.create_table(
        "feed_heads",
        sa.Column("feed", sa.String(16), primary_key=True),  # 'orders' or 'slots'
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        sa.table("feed_heads", sa.column("feed", sa.String), sa.column("revision", sa.BigInteger)),
        [{"feed": "orders", "revision": 0}, {"feed": "slots", "revision": 0}],
    )

    op.create_table(
        "orders",
        sa.Column("order_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("slot_id", sa.String(64), nullable=False),
        # The payer; a keyed pseudonym once the customer is erased (orders kept for accounting).
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("unit_price_micros", sa.BigInteger, nullable=False),
        sa.Column("total_price_micros", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column(
            "state", sa.String(16), nullable=False
        ),  # PENDING PLACED SHIPPED DELIVERED CANCELLED REJECTED
        sa.Column("order_trigger", sa.String(16), nullable=False),  # AUTOMATIC DEVICE_REQUEST CUSTOMER
        sa.Column("test", sa.Boolean, nullable=False),
        # What created it: the request_id of Replenish/ReplenishSlot, or the reading_id.
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("pending_until_us", sa.BigInteger, nullable=False),  # cancel_deadline_time
        sa.Column("cancellation_reason", sa.String(32), nullable=True),
        sa.Column("cancellation_note", sa.String(500), nullable=True),
        sa.Column("rejection_reason", sa.String(32), nullable=True),
        sa.Column("rejection_note", sa.String(500), nullable=True),
        sa.Column("carrier", sa.String(64), nullable=True),
        sa.Column("tracking_number", sa.String(128), nullable=True),
        sa.Column("tracking_url", sa.String(2048), nullable=True),
        sa.Column("estimated_delivery_time_us", sa.BigInteger, nullable=True),
        sa.Column("expected_delivery_time_us", sa.BigInteger, nullable=True),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
        sa.Column("place_time_us", sa.BigInteger, nullable=True),
        sa.Column("ship_time_us", sa.BigInteger, nullable=True),
        sa.Column("deliver_time_us", sa.BigInteger, nullable=True),
        sa.Column("cancel_time_us", sa.BigInteger, nullable=True),
        sa.Column("reject_time_us", sa.BigInteger, nullable=True),
        sa.Column("revision", sa.BigInteger, nullable=False),  # of its latest order event
    )
    # Exactly once: at most one open order per slot, whatever races.
    op.create_index(
        "orders_one_open_per_slot",
        "orders",
        ["device_id", "slot_id"],
        unique=True,
        sqlite_where=OPEN,
        postgresql_where=OPEN,
    )
    # The promotion PENDING -> PLACED finds the due orders.
    op.create_index(
        "orders_pending_until",
        "orders",
        ["pending_until_us"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    # Limits (orders and spend of a slot in a period) and ListOrders by device or slot.
    op.create_index("orders_by_slot", "orders", ["device_id", "slot_id", "create_time_us"])
    op.create_index("orders_by_customer", "orders", ["customer_id", "create_time_us"])

    op.create_table(
        "order_events",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),  # pseudonymised with the order
        sa.Column("type", sa.String(24), nullable=False),  # CREATED STATE_CHANGED TRACKING_UPDATED
        sa.Column("previous_state", sa.String(16), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("test", sa.Boolean, nullable=False),  # left out of fulfilment's feed
        sa.Column("order_message", sa.LargeBinary, nullable=False),  # the serialised Order after the change
        sa.Column("event_time_us", sa.BigInteger, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),  # retention
    )
    op.create_index("order_events_by_order", "order_events", ["order_id"])
    op.create_index("order_events_by_customer", "order_events", ["customer_id"])
    op.create_index("order_events_by_age", "order_events", ["create_time_us"])

    op.create_table(
        "slot_events",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("slot_id", sa.String(64), nullable=False),  # '' for device-wide events
        sa.Column("type", sa.String(24), nullable=False),  # a SlotEventType name
        sa.Column("outcome", sa.String(32), nullable=True),  # a ReplenishOutcome name (the reason)
        sa.Column("order_id", sa.String(64), nullable=True),
        sa.Column("cancellation_reason", sa.String(32), nullable=True),
        sa.Column("level", sa.Double, nullable=True),
        sa.Column("message", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),  # JSON object: anything else the type needs
        sa.Column("test", sa.Boolean, nullable=False),
        sa.Column("event_time_us", sa.BigInteger, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),  # retention
    )
    op.create_index("slot_events_by_customer", "slot_events", ["customer_id", "revision"])
    op.create_index("slot_events_by_device", "slot_events", ["device_id", "revision"])
    op.create_index("slot_events_by_age", "slot_events", ["create_time_us"])


def downgrade() -> None:
    for index, table in [
        ("slot_events_by_age", "slot_events"),
        ("slot_events_by_device", "slot_events"),
        ("slot_events_by_customer", "slot_events"),
        ("order_events_by_age", "order_events"),
        ("order_events_by_customer", "order_events"),
        ("order_events_by_order", "order_events"),
        ("orders_by_customer", "orders"),
        ("orders_by_slot", "orders"),
        ("orders_pending_until", "orders"),
        ("orders_one_open_per_slot", "orders"),
        ("readings_by_slot", "readings"),
        ("slots_decision_due", "slots"),
        ("devices_previous_token_hash", "devices"),
    ]:
        op.drop_index(index, table_name=table)
    for table in ["slot_events", "order_events", "orders", "feed_heads", "readings"]:
        op.drop_table(table)
    for column in [
        "decision_due_time_us",
        "last_outcome_time_us",
        "last_outcome",
        "last_refill_time_us",
        "epoch_start_time_us",
        "epoch",
        "level_source",
        "level_time_us",
        "level",
        "expected_stock_after_delivery",
        "paused",
    ]:
        op.drop_column("slots", column)
    for column in ["previous_token_expire_time_us", "previous_token_hash", "paused", "test"]:
        op.drop_column("devices", column)
