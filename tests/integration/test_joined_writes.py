"""Database.write_joined (group commit) on SQLite and PostgreSQL: concurrent calls share one
transaction, each in a savepoint; a failing call sinks only itself; a call that lost a race
runs again alone; a call returns only once its work is committed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from shared.db import MAX_JOINED, Database
from shared.errors import Aborted

metadata = sa.MetaData()
items = sa.Table("items", metadata, sa.Column("key", sa.String(32), primary_key=True))


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url, "joined")
    metadata.create_all(database.engine)
    yield database
    database.close()


def _keys(database: Database) -> set[str]:
    return set(database.transaction(lambda connection: connection.execute(sa.select(items.c.key)).scalars()))


def _insert(key: str) -> Any:
    def work(connection: sa.Connection) -> str:
        connection.execute(items.insert().values(key=key))
        return key

    return work


def _count_batches(database: Database) -> list[int]:
    """The sizes of the joined transactions that run from now on."""
    sizes: list[int] = []
    run = database._run_joined

    def counted(works: list[Any]) -> list[tuple[bool, Any]]:
        sizes.append(len(works))
        return run(works)

    database._run_joined = counted  # type: ignore[method-assign]
    return sizes


async def test_calls_waiting_for_a_joined_transaction_share_the_next(database: Database) -> None:
    sizes = _count_batches(database)
    release = threading.Event()

    def first(connection: sa.Connection) -> str:
        release.wait(10)
        connection.execute(items.insert().values(key="first"))
        return "first"

    leader = asyncio.ensure_future(database.write_joined(first))
    await asyncio.sleep(0)  # the first joined transaction starts (and waits for `release`)
    followers = [
        asyncio.ensure_future(database.write_joined(_insert(f"k{i}"))) for i in range(MAX_JOINED + 5)
    ]
    await asyncio.sleep(0)
    release.set()
    assert await leader == "first"
    assert await asyncio.gather(*followers) == [f"k{i}" for i in range(MAX_JOINED + 5)]
    assert sizes == [1, MAX_JOINED, 5]
    assert _keys(database) == {"first", *(f"k{i}" for i in range(MAX_JOINED + 5))}


async def test_a_failing_call_sinks_only_itself(database: Database) -> None:
    def fails(connection: sa.Connection) -> str:
        connection.execute(items.insert().values(key="doomed"))
        raise ValueError("no")

    results = await asyncio.gather(
        database.write_joined(_insert("a")),
        database.write_joined(fails),
        database.write_joined(_insert("b")),
        database.write_joined(_insert("a")),  # a duplicate key of this very transaction
        database.write_joined(_insert("c")),
        return_exceptions=True,
    )
    assert results[0] == "a" and results[2] == "b" and results[4] == "c"
    assert isinstance(results[1], ValueError)
    # A unique key taken is a lost race: it ran again alone, as `write` runs it, and kept losing.
    assert isinstance(results[3], Aborted)
    assert _keys(database) == {"a", "b", "c"}  # the failed call's row was rolled back


async def test_a_call_that_lost_a_race_runs_again_alone(database: Database) -> None:
    database.transaction(lambda connection: connection.execute(items.insert().values(key="taken")))
    attempts: list[bool] = []

    def racer(connection: sa.Connection) -> str:
        attempts.append(True)
        if len(attempts) == 1:  # as if a concurrent writer had just taken the key
            connection.execute(items.insert().values(key="taken"))
        connection.execute(items.insert().values(key=f"racer{len(attempts)}"))
        return f"attempt {len(attempts)}"

    assert await database.write_joined(racer) == "attempt 2"
    assert _keys(database) == {"taken", "racer2"}


async def test_a_call_returns_once_its_work_is_committed(database: Database) -> None:
    async def write_then_look(key: str) -> bool:
        await database.write_joined(_insert(key))
        # Another connection (the reader pool) sees it: it was committed before the return.
        return key in await database.read(
            lambda connection: set(connection.execute(sa.select(items.c.key)).scalars())
        )

    assert await asyncio.gather(*(write_then_look(f"k{i}") for i in range(20))) == [True] * 20
