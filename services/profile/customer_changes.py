"""Hears, on PostgreSQL, which customers changed anywhere, and drops their cached answers.

Migration 0005 installs a trigger that sends `pg_notify(<channel>, customer_id)` for
every inserted, updated or deleted customer row and for every merge record added or
removed (naming the merge's target, whose merged_from it changes); PostgreSQL delivers
a notice when its transaction commits, to every connection that LISTENs on the
channel. One listener per replica holds such a connection in a thread of its own and
invalidates the customer of each notice in the CustomerCache (customer_cache.py).

The cache is on only while the listener is connected: it is enabled (from empty) once
LISTEN has succeeded, so every change committed after that is heard, and disabled the
moment the connection fails; the listener then reconnects with back-off (0.1 s doubling
to 5 s) while reads go to the database.
"""

from __future__ import annotations

import threading

import psycopg
import sqlalchemy as sa
from psycopg import sql

from services.profile.customer_cache import CustomerCache
from shared.log import get_logger

log = get_logger("najimi.profile.customer_changes")

FIRST_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 5.0
POLL_SECONDS = 0.5  # how long one wait for notices lasts before checking for stop
CONNECT_TIMEOUT_SECONDS = 5


def channel_of(schema: str) -> str:
    """The notification channel of the customers of one schema (the trigger builds the same)."""
    return f"najimi_customer_changes_{schema}"


class CustomerChangeListener:
    def __init__(self, url: sa.engine.URL, schema: str, cache: CustomerCache):
        # psycopg's own connection string: the SQLAlchemy URL without its driver name.
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._channel = channel_of(schema)
        self._cache = cache
        self._stopping = threading.Event()
        self.listening = threading.Event()  # set while LISTEN holds (for tests and health)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._cache.disable()  # until the first LISTEN succeeds
        self._thread = threading.Thread(target=self._run, name="profile-customer-changes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_SECONDS + CONNECT_TIMEOUT_SECONDS + 1)

    def _run(self) -> None:
        wait = FIRST_RETRY_SECONDS
        while not self._stopping.is_set():
            try:
                self._listen()
                wait = FIRST_RETRY_SECONDS
            except psycopg.Error as error:
                log.warning("customer_changes_disconnected", error=str(error), retry_in_s=wait)
            finally:
                self.listening.clear()
                self._cache.disable()
            if self._stopping.wait(wait):
                return
            wait = min(wait * 2, MAX_RETRY_SECONDS)

    def _listen(self) -> None:
        with psycopg.connect(
            self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        ) as connection:
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._cache.enable()  # every change committed from now on will be heard
            self.listening.set()
            log.info("customer_changes_listening", channel=self._channel)
            while not self._stopping.is_set():
                for notice in connection.notifies(timeout=POLL_SECONDS):
                    self._cache.invalidate((notice.payload,))
