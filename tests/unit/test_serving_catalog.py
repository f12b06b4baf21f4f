"""The serving catalog's candidate masks: whole-segment category prefixes, availability,
deletions, popularity order, and the model's rows the catalog lacks."""

import numpy as np

from services.recommendation.catalog import Item, category_key
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving_catalog import ServingCatalog, without
from tests.recommendation_models import artefact_of


def catalog() -> ServingCatalog:
    found = ServingCatalog(None)  # type: ignore[arg-type]  # no database: fed by apply()
    found.apply(
        [
            (Item("beans", "Beans", ("grocery", "coffee", "beans"), available=True), False),
            (Item("machine", "Machine", ("grocery", "coffee-machines"), available=True), False),
            (Item("filter", "Filter", ("grocery", "coffee"), available=False), False),
            (Item("gone", "Gone", ("grocery", "coffee"), available=True), True),
            (Item("tea", "Tea", ("grocery", "tea"), available=True), False),
        ]
    )
    found._counts = {"tea": 5, "machine": 3, "beans": 3}
    return found


def allowed_ids(snapshot, mask) -> list[str]:  # type: ignore[no-untyped-def]
    return [snapshot.ids[row] for row in np.flatnonzero(mask)]


def test_prefixes_match_whole_segments_and_unavailable_and_deleted_items_are_left_out() -> None:
    snapshot = catalog().snapshot()
    coffee = (category_key(("grocery", "coffee")),)
    assert allowed_ids(snapshot, snapshot.mask(coffee, False)) == ["beans"]
    assert allowed_ids(snapshot, snapshot.mask(coffee, True)) == ["beans", "filter"]
    assert allowed_ids(snapshot, snapshot.mask((), False)) == ["beans", "machine", "tea"]
    assert snapshot.mask(coffee, False) is snapshot.mask(coffee, False)  # built once per filter
    assert (snapshot.title_of("tea"), snapshot.title_of("nope")) == ("Tea", "")
    assert allowed_ids(snapshot, without(snapshot.mask((), False), snapshot.rows, ["tea", "nope"])) == [
        "beans",
        "machine",
    ]
    # Most popular first, ties by item_id.
    popular = snapshot.popular(snapshot.mask((), True), 10)
    assert [snapshot.ids[row] for row in popular] == ["tea", "beans", "machine", "filter"]


def test_a_change_builds_a_new_snapshot_and_the_model_never_gets_items_the_catalog_lacks() -> None:
    held = catalog()
    before = held.snapshot()
    held.deleted("beans")
    after = held.snapshot()
    assert before is not after and "beans" not in allowed_ids(after, after.mask((), False))
    assert "beans" in allowed_ids(before, before.mask((), False))  # a request keeps its snapshot
    vectors = np.eye(3, dtype=np.float32)
    model = ServingModel.from_artefact(artefact_of(["tea", "unknown", "beans"], ["c"], vectors, vectors[:1]))
    mask = after.model_mask(model, (), False)
    assert list(mask) == [True, False, False]


def test_a_filters_candidates_are_its_rows_from_its_second_request_within_the_budget(monkeypatch) -> None:
    from services.recommendation import serving_catalog

    snapshot = catalog().snapshot()
    ids = ["beans", "filter", "machine", "tea", "unknown"]
    vectors = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    model = ServingModel.from_artefact(artefact_of(ids, ["c"], vectors, vectors[:1]))
    coffee = (category_key(("grocery", "coffee")),)
    assert snapshot.model_candidates(model, coffee, True) is None  # asked once: not worth a copy
    found = snapshot.model_candidates(model, coffee, True)
    assert found is not None and list(found.rows) == [0, 1]  # beans, filter
    assert np.array_equal(found.items, model.items[[0, 1]]) and found.items.flags["C_CONTIGUOUS"]
    assert snapshot.model_candidates(model, coffee, True) is found
    # A filter keeping more than CANDIDATES_BELOW_SHARE of the items gains nothing by a copy.
    for _ in range(2):
        assert snapshot.model_candidates(model, (), True) is None
    row = model.items[0].nbytes
    tea = (category_key(("grocery", "tea")),)
    machine = (category_key(("grocery", "coffee-machines")),)

    def twice(prefixes: tuple[str, ...], include_unavailable: bool = False) -> list[bool]:
        return [snapshot.model_candidates(model, prefixes, include_unavailable) is not None for _ in range(2)]

    # None is larger than MAX_CANDIDATE_BYTES / CANDIDATE_BUDGET_PARTS ...
    monkeypatch.setattr(serving_catalog, "MAX_CANDIDATE_BYTES", 16 * row - 1)
    assert twice(tea) == [False, False]
    # ... and past the budget the least recently used are let go.
    snapshot = catalog().snapshot()
    monkeypatch.setattr(serving_catalog, "CANDIDATE_BUDGET_PARTS", 1)
    monkeypatch.setattr(serving_catalog, "MAX_CANDIDATE_BYTES", 2 * row)
    assert twice(coffee, True) == twice(tea) == twice(machine) == [False, True]
    assert {key[1:] for key in snapshot._candidates} == {(tea, False), (machine, False)}
    assert snapshot._candidate_bytes == 2 * row
    assert snapshot.model_candidates(model, tea, False) is not None  # used: machine is now the oldest
    assert twice(coffee) == [False, True]  # beans alone
    assert {key[1:] for key in snapshot._candidates} == {(tea, False), (coffee, False)}
    assert snapshot._candidate_bytes == 2 * row


async def test_a_poll_rereads_late_commits_but_not_a_bulk_load_long_past(monkeypatch) -> None:
    """Each poll reads from POLL_OVERLAP_US before the newest write seen, or before the
    previous poll began if that is later: what was written before that had committed."""
    from services.recommendation import serving_catalog

    clock = {"now": 0}
    asked: list[int] = []

    class Database:
        async def read(self, work):  # type: ignore[no-untyped-def]
            return work(None)

    def changes(connection, since_us):  # type: ignore[no-untyped-def]
        asked.append(since_us)
        return []

    loaded_at = 100_000_000  # a bulk load's update times, then no write
    monkeypatch.setattr(serving_catalog, "now_micros", lambda: clock["now"])
    monkeypatch.setattr(serving_catalog, "catalog_changes", changes)
    monkeypatch.setattr(serving_catalog, "newest_item_update_us", lambda connection: loaded_at)
    found = ServingCatalog(Database())  # type: ignore[arg-type]
    found.apply([(Item("beans", "Beans", ("grocery",), available=True, update_time_us=loaded_at), False)])
    overlap = serving_catalog.POLL_OVERLAP_US
    for now in (loaded_at + 1_000_000, loaded_at + 5_000_000, loaded_at + 30_000_000, loaded_at + 31_000_000):
        clock["now"] = now
        await found.refresh()
    # Within the overlap of the load, a late commit of it is still read.
    assert asked[:2] == [loaded_at - overlap, loaded_at + 1_000_000 - overlap]
    assert asked[2] == loaded_at + 5_000_000 - overlap
    assert asked[3] == loaded_at + 30_000_000 - overlap > loaded_at  # the load is not read again


async def test_a_poll_that_finds_the_table_went_back_loads_it_all_again(monkeypatch) -> None:
    """A restored database: the table's newest update time is below an item already held."""
    from services.recommendation import serving_catalog

    table = {
        item_id: Item(item_id, item_id, ("grocery", "coffee"), available=True, update_time_us=time_us)
        for item_id, time_us in (("beans", 100), ("filter", 150), ("grinder", 200))
    }

    class Database:
        async def read(self, work):  # type: ignore[no-untyped-def]
            return work(None)

    def changes(connection, since_us):  # type: ignore[no-untyped-def]
        return [(item, False) for item in table.values() if item.update_time_us >= since_us]

    def newest(connection):  # type: ignore[no-untyped-def]
        return max((item.update_time_us for item in table.values()), default=0)

    monkeypatch.setattr(serving_catalog, "catalog_changes", changes)
    monkeypatch.setattr(serving_catalog, "newest_item_update_us", newest)
    reloads: list[int] = []  # a reload recounts popularity; a plain poll does not
    monkeypatch.setattr(serving_catalog, "popularity_counts", lambda connection: reloads.append(1) or {})
    found = ServingCatalog(Database())  # type: ignore[arg-type]
    await found.refresh()
    await found.refresh()
    assert found.snapshot().ids == ["beans", "filter", "grinder"] and reloads == []
    del table["grinder"]  # restored to before it was written
    await found.refresh()
    assert found.snapshot().ids == ["beans", "filter"] and reloads == [1]
