"""The model registry: training runs and model versions.

Revision ID: 0004
Revises: 0003

services/recommendation/registry.py owns both tables. `slot` columns hold one fixed value
on the row that occupies a singleton role and NULL elsewhere; their unique indexes make
the database itself refuse a second queued-or-running run or a second active model
(NULLs never collide on SQLite or PostgreSQL).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_runs",
        sa.Column("training_run_id", sa.String(32), primary_key=True),
        sa.Column("model_version", sa.String(32), nullable=False, unique=True),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("options", sa.LargeBinary, nullable=False),  # TrainingOptions, serialized
        sa.Column("auto_activate", sa.Boolean, nullable=False),
        sa.Column("requested_by", sa.String(160), nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("start_time_us", sa.BigInteger, nullable=True),
        sa.Column("end_time_us", sa.BigInteger, nullable=True),
        sa.Column("heartbeat_us", sa.BigInteger, nullable=True),
        sa.Column("phase", sa.Integer, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("epochs_completed", sa.Integer, nullable=False),
        sa.Column("eta_seconds", sa.Float, nullable=True),
        sa.Column("failure_reason", sa.String(64), nullable=False),
        sa.Column("failure_message", sa.Text, nullable=False),
        sa.Column("slot", sa.String(16), nullable=True),  # "training" while QUEUED or RUNNING
    )
    op.create_index("training_runs_one_at_a_time", "training_runs", ["slot"], unique=True)
    op.create_table(
        "models",
        sa.Column("model_version", sa.String(32), primary_key=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("training_run_id", sa.String(32), nullable=False),
        sa.Column("options", sa.LargeBinary, nullable=False),  # TrainingOptions, serialized
        sa.Column("training_data", sa.LargeBinary, nullable=True),  # TrainingData, serialized
        sa.Column("evaluation", sa.LargeBinary, nullable=True),  # ModelEvaluation, serialized
        sa.Column("passed_gate", sa.Boolean, nullable=True),
        sa.Column("status_message", sa.Text, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
        sa.Column("activate_time_us", sa.BigInteger, nullable=True),
        sa.Column("retire_time_us", sa.BigInteger, nullable=True),
        sa.Column("forced_activation_reason", sa.Text, nullable=False),
        sa.Column("library_versions", sa.Text, nullable=False),  # JSON object
        sa.Column("artefact_sha256", sa.String(64), nullable=False),
        sa.Column("slot", sa.String(16), nullable=True),  # "active" on the active model
    )
    op.create_index("models_one_active", "models", ["slot"], unique=True)


def downgrade() -> None:
    op.drop_index("models_one_active", table_name="models")
    op.drop_table("models")
    op.drop_index("training_runs_one_at_a_time", table_name="training_runs")
    op.drop_table("training_runs")
