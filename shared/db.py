"""Storage: one schema per service, SQLite (WAL) by default, PostgreSQL when configured.

SQLAlchemy Core runs in worker threads so the asyncio event loop never blocks on I/O.
Schema versions are Alembic migrations under services/<service>/migrations/; they run
at start-up, before the service reports SERVING.

Timestamps are stored as integer microseconds since the Unix epoch (UTC): the same
type, ordering and precision on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from shared.errors import Aborted
from shared.log import get_logger

T = TypeVar("T")
log = get_logger("najimi.db")
WRITE_ATTEMPTS = 4
# SQLite: how often (at most) a background thread checkpoints the WAL into the database
# file after writes, and how many WAL pages a committing writer lets pile up before it
# checkpoints itself (only when the background checkpoints fall that far behind).
CHECKPOINT_SECONDS = 0.5
WAL_AUTOCHECKPOINT_PAGES = 20_000
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# How long Database.scrub keeps trying to empty the WAL after an erasure.
SCRUB_SECONDS = 10.0
# Most calls' work one joined transaction carries (Database.write_joined).
MAX_JOINED = 128
# SQLSTATEs of a transaction that lost a race: unique violation, serialization failure, deadlock.
RACE_SQLSTATES = {"23505", "40001", "40P01"}


def _lost_a_race(error: sa.exc.DBAPIError) -> bool:
    if isinstance(error, sa.exc.IntegrityError) and "UNIQUE constraint failed" in str(error.orig):
        return True  # SQLite
    return getattr(error.orig, "sqlstate", None) in RACE_SQLSTATES


def to_micros(value: dt.datetime) -> int:
    return (
        int(value.timestamp() * 1_000_000)
        if value.tzinfo
        else int(value.replace(tzinfo=dt.UTC).timestamp() * 1_000_000)
    )


def now_micros() -> int:
    """Microseconds since the Unix epoch, now (what to_micros(datetime.now(UTC)) gives, cheaper)."""
    return time.time_ns() // 1_000


def sqlalchemy_url(url: str) -> str:
    """Plain postgresql:// URLs use psycopg 3, the driver najimi ships with."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, schema: str) -> Engine:
    url = sqlalchemy_url(url)
    if is_sqlite(url):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a killed process; only power loss may lose a commit.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Deleted rows are overwritten with zeros, not left in free pages (an erasure
            # must not linger in the file); Database.scrub also empties the WAL after one.
            cursor.execute("PRAGMA secure_delete=ON")
            # Checkpoints run in Database's own thread (Database.write): a checkpoint syncs
            # the file, and a writer doing it would hold the one write lock meanwhile.
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            # A burst can grow the WAL to tens of MB before a checkpoint catches up; once one
            # has, the file is cut back to this size instead of keeping its high-water mark.
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            # A writer takes the write lock up front, so it never fails half-way on a busy lock.
            write = connection.get_execution_options().get("write", True)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    with sa.create_engine(url).connect() as bootstrap:
        # IF NOT EXISTS still races when processes create the schema at once: the same lock
        # as the migrations makes them take turns (it ends with the transaction).
        bootstrap.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"najimi-migrate:{schema}"}
        )
        bootstrap.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        bootstrap.commit()
    return sa.create_engine(
        url,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        connect_args={"options": f"-csearch_path={schema}"},
    )


def insert_rows(
    connection: Connection,
    table: sa.Table,
    rows: Sequence[Sequence[Any]],
    conflict: Callable[[Any], Any] | None = None,
) -> int:
    """Inserts `rows` (tuples in `table`'s column order) in the caller's transaction; returns
    how many rows the statement inserted or updated.

    `conflict` adds an ON CONFLICT clause to the dialect's insert (SQLite's or PostgreSQL's,
    which share that API). The statement is compiled once and goes to the driver as it is:
    SQLAlchemy's per-row parameter handling would cost more than the database's work on
    large batches. SQLite runs it once per row (executemany on one prepared statement);
    PostgreSQL gets one INSERT ... SELECT FROM unnest(one array per column): a single
    statement and round trip for all the rows.
    """
    if not rows:
        return 0
    names = [column.name for column in table.columns]
    statement: Any
    if connection.dialect.name == "postgresql":
        arrays = sa.func.unnest(
            *(sa.bindparam(column.name, type_=postgresql.ARRAY(column.type)) for column in table.columns)
        )
        statement = postgresql.insert(table).from_select(
            names, sa.select(sa.literal_column("*")).select_from(arrays)
        )
        if conflict is not None:
            statement = conflict(statement)
        columns = zip(*rows, strict=True)
        parameters: Any = {name: list(column) for name, column in zip(names, columns, strict=True)}
    else:
        statement = sqlite.insert(table)
        if conflict is not None:
            statement = conflict(statement)
        parameters = rows
    compiled = statement.compile(dialect=connection.dialect)
    if compiled.positiontup is not None and list(compiled.positiontup) != names:
        raise ValueError(f"insert_rows: the statement's parameters are not {table.name}'s columns")
    return int(connection.exec_driver_sql(str(compiled), parameters).rowcount)


class Database:
    """A service's database: migrations, and transactions run off the event loop."""

    def __init__(self, url: str, schema: str, migrations: Path | None = None):
        self.url = sqlalchemy_url(url)
        self.schema = schema
        self.engine = create_engine(url, schema)
        self._migrations = migrations
        # SQLite takes one writer at a time: a single thread queues writes without lock
        # contention, while readers run beside it (WAL).
        writers = 1 if is_sqlite(self.url) else 8
        self._writer = ThreadPoolExecutor(writers, thread_name_prefix=f"{schema}-db-write")
        self._reader = ThreadPoolExecutor(8, thread_name_prefix=f"{schema}-db-read")
        self._checkpointer = (
            ThreadPoolExecutor(1, thread_name_prefix=f"{schema}-db-checkpoint") if writers == 1 else None
        )
        self._checkpointing = False
        self._next_checkpoint = 0.0  # time.monotonic() before which no checkpoint starts
        # write_joined: the calls waiting for the next joined transaction, and whether one runs.
        self._joined: list[tuple[Callable[[Connection], Any], asyncio.Future[Any]]] = []
        self._joining = False
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    def migrate(self, **attributes: Any) -> None:
        """Brings the schema to the newest Alembic revision. `attributes` reach the migration
        scripts as `op.get_context().config.attributes` (e.g. a key a data migration needs)."""
        if self._migrations is None:
            return
        config = Config()
        config.set_main_option("script_location", str(self._migrations))
        config.attributes.update(attributes)
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas and the migration Job may start at once: one migrates, the others wait
                # here and then find the schema current (the lock ends with the transaction).
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"),
                    {"name": f"najimi-migrate:{self.schema}"},
                )
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            try:
                return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            except sa.exc.DBAPIError:
                return None

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Runs `work` in one transaction, committed before this returns.

        A transaction that loses a race (a unique key another writer just took, a
        serialization failure or deadlock on PostgreSQL) is run again from the start,
        where it sees the winner's data (e.g. the stored response of an idempotent
        request); after WRITE_ATTEMPTS losses the caller gets ABORTED.
        """
        loop = asyncio.get_running_loop()
        for _attempt in range(WRITE_ATTEMPTS):
            try:
                result = await loop.run_in_executor(self._writer, self.transaction, work, True)
            except sa.exc.DBAPIError as error:
                if not _lost_a_race(error):
                    raise
            else:
                self._checkpoint_soon()
                return result
        raise Aborted("the write kept conflicting with concurrent writes; retry", reason="CONCURRENT_WRITE")

    async def write_joined(self, work: Callable[[Connection], T]) -> T:
        """Like `write`, for many small concurrent writes (group commit): the calls that
        arrive while a joined transaction runs wait for the next one, which carries up to
        MAX_JOINED of them, each `work` in a SAVEPOINT of its own, and commits them at once.
        A call returns only after that commit; one whose work raises has its savepoint rolled
        back, without sinking the others, and gets the exception (one that lost a race runs
        again alone, through `write`). If the joined transaction itself fails, each call runs
        again alone. One joined transaction runs at a time; `write` runs beside it.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._joined.append((work, future))
        if not self._joining:
            self._joining = True
            self._spawn(self._join())
        return await future

    async def _join(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._joined:
                batch, self._joined = self._joined[:MAX_JOINED], self._joined[MAX_JOINED:]
                works = [work for work, _ in batch]
                try:
                    outcomes = await loop.run_in_executor(self._writer, self._run_joined, works)
                except Exception as error:  # the transaction failed as a whole: each alone
                    log.warning("joined_write_failed", error=type(error).__name__, calls=len(batch))
                    outcomes = [(False, None)] * len(batch)
                self._checkpoint_soon()
                for (work, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # the caller went away; its work committed or not, as it went
                        continue
                    if ok:
                        future.set_result(value)
                    elif value is None or (isinstance(value, sa.exc.DBAPIError) and _lost_a_race(value)):
                        self._spawn(self._alone(work, future))
                    else:
                        future.set_exception(value)
        finally:
            self._joining = False

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _alone(self, work: Callable[[Connection], T], future: asyncio.Future[T]) -> None:
        try:
            result = await self.write(work)
        except Exception as error:
            if not future.done():
                future.set_exception(error)
        else:
            if not future.done():
                future.set_result(result)

    def _run_joined(self, works: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
        """Runs each work in its own savepoint of one transaction: (True, result) or (False, error)."""
        outcomes: list[tuple[bool, Any]] = []
        with self.engine.connect().execution_options(write=True) as connection, connection.begin():
            # Plain SQL on the driver's cursor: SQLAlchemy's nested transactions cost several
            # times the database's work for a savepoint.
            cursor = connection.connection.cursor()
            try:
                for work in works:
                    cursor.execute("SAVEPOINT joined_write")
                    try:
                        result = work(connection)
                    except Exception as error:
                        cursor.execute("ROLLBACK TO SAVEPOINT joined_write")
                        outcomes.append((False, error))
                    else:
                        outcomes.append((True, result))
                    cursor.execute("RELEASE SAVEPOINT joined_write")
            finally:
                cursor.close()
        return outcomes

    async def lookup(self, work: Callable[[Connection], T]) -> T:
        """A short point read (one row by key). On SQLite it runs right here: the file is
        local and WAL readers never wait for writers, so the ~200 µs hop to a worker thread
        would cost more than the read. Elsewhere it goes through the reader pool.

        On SQLite no transaction is begun for it: driver SQL (the connection's DBAPI cursor)
        runs in autocommit, each statement reading the latest commit; a SQLAlchemy statement
        begins a read transaction as usual (rolled back at the end)."""
        if self.is_sqlite:
            with self.engine.connect().execution_options(write=False) as connection:
                return work(connection)
        return await self.read(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Runs `work` in a read-only snapshot, beside any writer."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.transaction, work, False)

    def transaction(self, work: Callable[[Connection], T], write: bool = True) -> T:
        """Runs `work` in one transaction on the calling thread (for scripts and tests)."""
        with self.engine.connect().execution_options(write=write) as connection, connection.begin():
            return work(connection)

    async def scrub(self) -> None:
        """SQLite: after an erasure has committed, copies the WAL into the database file and
        truncates it, so the erased rows' old bytes are in neither (secure_delete zeroed them
        in the file). It runs on the writer thread, so no write of this process interleaves,
        and is tried again while a checkpoint or a reader holds the WAL, for up to
        SCRUB_SECONDS. PostgreSQL keeps dead tuples until VACUUM (the README's erasure section)."""
        if not self.is_sqlite:
            return
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + SCRUB_SECONDS
        while await loop.run_in_executor(self._writer, self._truncate_wal):
            if time.monotonic() > deadline:
                log.warning("wal_truncate_busy", schema=self.schema)
                return
            await asyncio.sleep(0.01)

    def _truncate_wal(self) -> bool:
        """One TRUNCATE checkpoint; True when it could not finish (busy)."""
        connection = self.engine.raw_connection()
        try:
            busy, _, _ = connection.driver_connection.execute(  # type: ignore[union-attr]
                "PRAGMA wal_checkpoint(TRUNCATE)"
            ).fetchone()
        finally:
            connection.close()
        return bool(busy)

    def _checkpoint_soon(self) -> None:
        """SQLite: after a write, copies the WAL into the database file in the background
        (at most every CHECKPOINT_SECONDS), beside readers and the writer."""
        if self._checkpointer is None or self._checkpointing or time.monotonic() < self._next_checkpoint:
            return
        self._checkpointing = True
        self._next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        self._checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            # On the driver connection, outside any transaction: PASSIVE copies what no
            # reader still needs and never waits for a lock, so it delays nobody.
            connection = self.engine.raw_connection()
            try:
                connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # type: ignore[union-attr]
            finally:
                connection.close()
        except Exception as error:  # the next write tries again; the writer's own checkpoint remains
            log.warning("wal_checkpoint_failed", error=type(error).__name__)
        finally:
            self._checkpointing = False

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        if self._checkpointer is not None:
            self._checkpointer.shutdown(wait=True)
        self.engine.dispose()


def run_migrations_online() -> None:
    """The body of every service's migrations/env.py: migrate on the connection given."""
    from alembic import context

    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
