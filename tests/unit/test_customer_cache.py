"""CustomerCache's rules: no answer read before an invalidation is kept after it; the
oldest answer goes first; nothing is kept while the cache is off or after the year turns."""

from __future__ import annotations

from services.profile.customer_cache import CustomerCache


def test_an_answer_read_before_an_invalidation_is_not_kept() -> None:
    cache = CustomerCache(10)
    before = cache.generation
    cache.invalidate(["cus-1"])  # a change committed while the old row was being read
    cache.put("cus-1", "old answer", before)
    assert cache.get("cus-1") is None
    cache.put("cus-1", "new answer", cache.generation)
    assert cache.get("cus-1") == "new answer"
    cache.invalidate(["cus-2"])
    assert cache.get("cus-1") == "new answer"  # only the named customers go
    cache.invalidate(["cus-1"])
    assert cache.get("cus-1") is None


def test_the_oldest_answer_goes_first_when_full() -> None:
    cache = CustomerCache(2)
    for customer in ("cus-1", "cus-2", "cus-3"):
        cache.put(customer, customer.upper(), cache.generation)
    assert (cache.get("cus-1"), cache.get("cus-2"), cache.get("cus-3")) == (None, "CUS-2", "CUS-3")
    cache.put("cus-2", "CUS-2 again", cache.generation)  # replacing takes no room
    assert len(cache) == 2 and cache.get("cus-3") == "CUS-3"


def test_nothing_is_kept_while_off_or_with_no_room() -> None:
    cache = CustomerCache(10)
    cache.put("cus-1", "answer", cache.generation)
    cache.disable()
    assert cache.get("cus-1") is None
    generation = cache.generation
    cache.put("cus-1", "answer", generation)
    assert cache.get("cus-1") is None and not cache.enabled
    cache.enable()
    cache.put("cus-1", "answer", generation)  # read while it was off: may predate a change
    assert cache.get("cus-1") is None
    cache.put("cus-1", "answer", cache.generation)
    assert cache.get("cus-1") == "answer"

    none = CustomerCache(0)
    none.enable()
    none.put("cus-1", "answer", none.generation)
    assert none.get("cus-1") is None and not none.enabled


def test_answers_of_a_year_that_ended_are_dropped() -> None:
    cache = CustomerCache(10)
    cache.put("cus-1", "age band of last year", cache.generation)
    cache._year_ends = 0.0  # the year turned
    assert cache.get("cus-1") is None
    assert cache._year_ends > 0
