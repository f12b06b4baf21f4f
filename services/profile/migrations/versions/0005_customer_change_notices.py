"""Notices of changed customers, for the replicas' GetCustomer caches (PostgreSQL only).

Revision ID: 0005
Revises: 0004

A row trigger on `customers` (insert, update, delete) and on `merges` (insert, delete:
a merge record changes its target's merged_from) sends the customer id on the channel
`najimi_customer_changes_<schema>`; PostgreSQL delivers it when the transaction
commits (services/profile/customer_changes.py listens). SQLite has no such notices and
needs none: its data belongs to one process, which invalidates its own cache.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION notify_customer_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    IF TG_TABLE_NAME = 'merges' THEN
        PERFORM pg_notify('najimi_customer_changes_' || TG_TABLE_SCHEMA, changed.target_customer_id);
    ELSE
        PERFORM pg_notify('najimi_customer_changes_' || TG_TABLE_SCHEMA, changed.customer_id);
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(NOTIFY_FUNCTION)
    op.execute(
        "CREATE TRIGGER customers_changed AFTER INSERT OR UPDATE OR DELETE ON customers "
        "FOR EACH ROW EXECUTE FUNCTION notify_customer_change()"
    )
    op.execute(
        "CREATE TRIGGER merges_changed AFTER INSERT OR DELETE ON merges "
        "FOR EACH ROW EXECUTE FUNCTION notify_customer_change()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS merges_changed ON merges")
    op.execute("DROP TRIGGER IF EXISTS customers_changed ON customers")
    op.execute("DROP FUNCTION IF EXISTS notify_customer_change()")
