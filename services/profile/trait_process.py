"""The trait worker as a process of its own: `python -m services.profile.trait_process`
(console script `najimi-profile-traits`).

By default the profile service keeps the traits current itself, beside ingestion
(NAJIMI_PROFILE_TRAIT_WORKER=inline). Under sustained ingestion the two share a core:
on SQLite the worker takes about a third of it (bench/profile_bench.py). With
NAJIMI_PROFILE_TRAIT_WORKER=external the service leaves the traits to this process,
which runs the same TraitWorker against the same database (the same NAJIMI_*
variables as the service) on a core, or in a pod, of its own. It finds new events by
polling (every POLL_SECONDS, and at once while there is a backlog), so the traits lag
the events by about half a second; the cursor row lock lets several workers, and
workers of several replicas, take turns safely.

It never migrates: it waits until the profile service has brought the schema to the
newest revision. SIGTERM or SIGINT stops it after the pass under way.
"""

from __future__ import annotations

from shared import stop_signals

if __name__ == "__main__":
    stop_signals.install()  # before the slow imports: SIGTERM or SIGINT from here on is a clean stop

import asyncio

from services.profile.app import MIGRATIONS
from services.profile.trait_worker import TraitWorker
from shared.db import Database
from shared.log import configure_logging, get_logger
from shared.migrate import wait_for_schema
from shared.server import tune_garbage_collector
from shared.settings import Settings, load_settings

log = get_logger("najimi.profile.trait_process")


async def run(settings: Settings) -> None:
    stop = asyncio.Event()
    database = Database(settings.effective_database_url, "profile")
    with stop_signals.setting(asyncio.get_running_loop(), stop):
        await _work(database, stop)


async def _work(database: Database, stop: asyncio.Event) -> None:
    try:
        if not await wait_for_schema(database, MIGRATIONS, stop):
            return
        worker = TraitWorker(database)
        worker.start()
        log.info("trait_worker_started", database=database.engine.url.render_as_string(hide_password=True))
        await stop.wait()
        await worker.stop()
        log.info("trait_worker_stopped", position=worker.position)
    finally:
        database.close()


def main() -> None:
    stop_signals.install()
    settings = load_settings("profile")
    configure_logging(settings.log_format, settings.log_level)
    tune_garbage_collector()
    try:
        asyncio.run(run(settings))
    finally:
        stop_signals.ignore()


if __name__ == "__main__":
    main()
