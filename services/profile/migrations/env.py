"""Alembic environment of the profile schema; the shared runner does the work."""

from shared.db import run_migrations_online

run_migrations_online()
