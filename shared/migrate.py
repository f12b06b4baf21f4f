"""`python -m shared.migrate SERVICE [SERVICE ...]` (console script `najimi-migrate`):
brings each named service's schema to its newest Alembic revision, then exits.

The services also migrate at start-up (Database.migrate, before they report SERVING);
a deployment runs this first, as a Job, so that a schema change is applied once and
its failure is visible on its own, not as replicas that never become ready. It reads
the same NAJIMI_* variables as the service it migrates (NAJIMI_DATABASE_URL above all).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from shared.db import Database
from shared.log import configure_logging, get_logger
from shared.settings import SERVICE_NAMES, Settings, load_settings

log = get_logger("najimi.migrate")

SCHEMA_POLL_SECONDS = 0.5


def newest_revision(migrations: Path) -> str | None:
    config = Config()
    config.set_main_option("script_location", str(migrations))
    return ScriptDirectory.from_config(config).get_current_head()


async def wait_for_schema(database: Database, migrations: Path, stop: asyncio.Event) -> bool:
    """For a service's side processes (workers that never migrate): waits until the service
    has brought the schema to the newest revision; False if `stop` is set first."""
    newest = newest_revision(migrations)
    while not stop.is_set():
        if await asyncio.to_thread(database.current_revision) == newest:
            return True
        log.info("waiting_for_schema", schema=database.schema, revision=newest)
        try:
            async with asyncio.timeout(SCHEMA_POLL_SECONDS):  # not wait_for (3.11 cancel swallow)
                await stop.wait()
        except TimeoutError:
            pass
    return False


def migrate(settings: Settings) -> str | None:
    """Migrates `settings.service`'s schema; returns the revision it is at afterwards."""
    # Each service's app module names its migrations directory (MIGRATIONS).
    migrations = importlib.import_module(f"services.{settings.service}.app").MIGRATIONS
    database = Database(settings.effective_database_url, settings.service, migrations)
    try:
        database.migrate()
        return database.current_revision()
    finally:
        database.close()


def main(argv: list[str] | None = None) -> None:
    services = sys.argv[1:] if argv is None else argv
    unknown = [name for name in services if name not in SERVICE_NAMES]
    if not services or unknown:
        raise SystemExit(
            f"usage: najimi-migrate SERVICE [SERVICE ...] with SERVICE one of {', '.join(SERVICE_NAMES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    for service in services:
        settings = load_settings(service)
        configure_logging(settings.log_format, settings.log_level)
        log.info("migrated", service=service, revision=migrate(settings))


if __name__ == "__main__":
    main()
