"""Alembic environment of the recommendation schema; the shared runner does the work."""

from shared.db import run_migrations_online

run_migrations_online()
