"""The replenishment engine's schema (migration 0004): the constraints the implementers rely on."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from services.replenishment.app import MIGRATIONS
from services.replenishment.store import (
    ORDER_FEED,
    SLOT_FEED,
    allocate_revision,
    current_revision,
    orders,
    readings,
)
from shared.db import Database


def _order(order_id: str, state: str, slot_id: str = "black") -> dict[str, object]:
    return dict(
        order_id=order_id,
        device_id="dev_1",
        slot_id=slot_id,
        customer_id="cus_1",
        item_id="ink",
        quantity=1,
        unit_price_micros=1,
        total_price_micros=1,
        currency_code="EUR",
        state=state,
        order_trigger="AUTOMATIC",
        test=False,
        pending_until_us=1,
        create_time_us=1,
        update_time_us=1,
        revision=1,
    )


def _reading(reading_id: str) -> dict[str, object]:
    return dict(
        device_id="dev_1",
        reading_id=reading_id,
        slot_id="black",
        level=50.0,
        measure_time_us=1,
        receive_time_us=2,
        epoch=0,
    )


@pytest.fixture
def database(database_url):
    database = Database(database_url, "replenishment", MIGRATIONS)
    database.migrate()
    yield database
    database.close()


def _insert(database: Database, table: sa.Table, row: dict[str, object]) -> None:
    database.transaction(lambda c: c.execute(table.insert().values(**row)))


def test_a_slot_has_at_most_one_open_order(database):
    _insert(database, orders, _order("o1", "PENDING"))
    for state in ["PENDING", "PLACED", "SHIPPED"]:
        with pytest.raises(sa.exc.IntegrityError):
            _insert(database, orders, _order(f"o-{state}", state))
    # Closed orders do not count, and another slot has its own.
    for state in ["DELIVERED", "CANCELLED", "REJECTED"]:
        _insert(database, orders, _order(f"o-{state}", state))
    _insert(database, orders, _order("o-red", "PENDING", slot_id="red"))
    # Once the open one closes, the slot may order again.
    database.transaction(
        lambda c: c.execute(orders.update().where(orders.c.order_id == "o1").values(state="DELIVERED"))
    )
    _insert(database, orders, _order("o2", "PENDING"))


def test_a_reading_id_is_stored_once_per_device(database):
    _insert(database, readings, _reading("r1"))
    with pytest.raises(sa.exc.IntegrityError):
        _insert(database, readings, _reading("r1"))
    _insert(database, readings, {**_reading("r1"), "device_id": "dev_2"})


def test_each_feed_counts_its_own_revisions(database):
    assert database.transaction(lambda c: allocate_revision(c, ORDER_FEED)) == 1
    assert database.transaction(lambda c: allocate_revision(c, ORDER_FEED)) == 2
    assert database.transaction(lambda c: allocate_revision(c, SLOT_FEED)) == 1
    assert database.transaction(lambda c: current_revision(c, ORDER_FEED), write=False) == 2


def test_the_migration_goes_down_and_up_again(database):
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    for target in ["0003", "head"]:
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if target == "0003" else command.upgrade)(config, target)
    _insert(database, orders, _order("o1", "PENDING"))
    with pytest.raises(sa.exc.IntegrityError):
        _insert(database, orders, _order("o2", "PLACED"))
