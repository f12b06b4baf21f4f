"""Serving through real gRPC: consent, profile and recommendation in process, a real consent
cache, the interaction copy following profile's feed, hand-made models (predictable scores)
activated through ActivateModel, on SQLite and PostgreSQL.

Model A ranks items by their index for c-1 (i19 first) and the other way for c-2; model B
the other way round, so a response shows which model produced it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.servicer import RecommendationServicer
from tests.conftest import InProcessService, error_reason, field_violations, rpc_error
from tests.integration.test_profile_interactions import BROWSING, PURCHASES, Suite, event, start_suite
from tests.integration.test_recommendation_interaction_copy import copy_of, start_recommendation
from tests.recommendation_models import artefact_of, register

ITEMS = [f"i{i}" for i in range(20)]
KNOWN = ["c-1", "c-2"]
CUSTOMERS = ("c-1", "c-2", "c-3", "c-4")
WAIT = 10.0
FOLD_IN_BOUND_SECONDS = 2.0


def item_vectors() -> np.ndarray:
    i = np.arange(len(ITEMS), dtype=np.float32)
    return np.stack([i / 19, 1 - i / 19, 0.1 * (i % 2), np.zeros_like(i)], axis=1)


def model_artefact(flipped: bool):  # type: ignore[no-untyped-def]
    up, down = [1, 0, 0, 0], [0, 1, 0, 0]
    customers = np.asarray([down, up] if flipped else [up, down], dtype=np.float32)
    return artefact_of(ITEMS, KNOWN, item_vectors(), customers, attributes=("age_range:25-34",))


def catalog_item(item_id: str, available: bool = True) -> pb.Item:
    index = int(item_id[1:])
    path = ["grocery", "coffee"] if index % 2 == 0 else ["home", "kitchen"]
    return pb.Item(item_id=item_id, title=f"Item {index}", category_path=path, available=available)


@dataclass
class Serving:
    suite: Suite
    service: InProcessService
    stub: pb_grpc.RecommendationServiceStub
    versions: dict[str, str]  # "A", "B" -> model version

    @property
    def servicer(self) -> RecommendationServicer:
        return self.service.running.app.registrations[0].servicer  # type: ignore[no-any-return]

    def auth(self, principal: str = "service:storefront") -> tuple[tuple[str, str], ...]:
        return self.service.auth(principal)

    async def recommend(
        self, customer_id: str = "", recent: Sequence[str] = (), **options
    ) -> pb.Recommendations:
        response = await self.stub.Recommend(
            pb.RecommendRequest(
                customer_id=customer_id,
                options=pb.RecommendOptions(**options),
                context=pb.RecommendationContext(recent_item_ids=list(recent)),
            ),
            metadata=self.auth(),
        )
        return response.recommendations

    async def activate(self, name: str) -> None:
        version = self.versions[name]
        await self.stub.ActivateModel(
            pb.ActivateModelRequest(model_version=version), metadata=self.auth("admin")
        )
        deadline = time.monotonic() + WAIT
        while (held := self.servicer.active_model.current()) is None or held.version != version:
            assert time.monotonic() < deadline, f"model {name} not loaded"
            await self.servicer.active_model.refresh()

    async def consent_applied(self) -> None:
        """The recommender's consent cache holds every change consent made so far."""
        revision = self.suite.cache.revision
        assert await copy_of(self.service).consent.wait_for_revision(revision, WAIT)

    async def upsert(self, *items: pb.Item) -> None:
        await self.stub.UpsertItems(
            pb.UpsertItemsRequest(request_id=f"u-{time.time_ns()}", items=list(items)),
            metadata=self.auth("service:catalog"),
        )


@pytest.fixture
async def serving(consented_profile, start_service, dev_tokens, database_url) -> Serving:
    suite = await start_suite(consented_profile, database_url, CUSTOMERS)
    service = await start_recommendation(start_service, dev_tokens, suite, database_url)
    found = Serving(suite, service, pb_grpc.RecommendationServiceStub(service.channel), {})
    await found.upsert(*(catalog_item(item_id) for item_id in ITEMS))
    servicer = found.servicer
    for name, flipped in (("A", False), ("B", True)):
        found.versions[name] = await register(
            servicer.registry, servicer.model_dir, model_artefact(flipped), f"model-{name}"
        )
    for customer in ("c-1", "c-2", "c-4"):
        await suite.grant(customer)
    await found.consent_applied()
    return found


def ids(found: pb.Recommendations) -> list[str]:
    return [item.item_id for item in found.items]


async def until(check, what: str, seconds: float = WAIT):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.02)


async def test_a_consented_customer_gets_the_models_ranking_with_reasons_and_categories(serving: Serving):
    await serving.activate("A")
    found = await serving.recommend("c-1", k=3)
    assert ids(found) == ["i19", "i18", "i17"]
    assert found.personalized and found.fallback_reason == pb.FALLBACK_REASON_NONE
    assert found.model_version == serving.versions["A"]
    assert list(found.data_categories_used) == sorted([BROWSING, PURCHASES])
    assert found.consent_revision >= serving.suite.cache.revision > 0
    assert found.recommendation_id and found.serve_time.seconds > 0
    assert [item.rank for item in found.items] == [1, 2, 3]
    assert found.items[0].score > found.items[1].score > found.items[2].score
    top = found.items[0].reasons[0]
    assert (top.kind, top.feature, top.data_category) == (pb.REASON_KIND_FEATURE, "customer:c-1", PURCHASES)
    assert top.contribution == pytest.approx(found.items[0].score, abs=1e-5) and top.text
    other = await serving.recommend("c-2", k=2)
    assert ids(other) == ["i0", "i1"]


async def test_filters_exclusions_availability_deletion_and_diversity(serving: Serving):
    await serving.activate("A")
    grocery = await serving.recommend(
        "c-1", k=3, filter=pb.ItemFilter(category_prefixes=["grocery"], exclude_item_ids=["i18", "nope"])
    )
    assert ids(grocery) == ["i16", "i14", "i12"]
    await serving.upsert(catalog_item("i19", available=False))
    assert ids(await serving.recommend("c-1", k=1)) == ["i18"]
    with_unavailable = await serving.recommend("c-1", k=1, filter=pb.ItemFilter(include_unavailable=True))
    assert ids(with_unavailable) == ["i19"]
    deleted = await serving.stub.DeleteItem(
        pb.DeleteItemRequest(item_id="i18"), metadata=serving.auth("service:catalog")
    )
    assert deleted.deleted
    assert ids(await serving.recommend("c-1", k=1)) == ["i17"]
    error = await rpc_error(
        serving.stub.GetItem(pb.GetItemRequest(item_id="i18"), metadata=serving.auth("service:catalog"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    again = await serving.stub.DeleteItem(
        pb.DeleteItemRequest(item_id="i18", allow_missing=True), metadata=serving.auth("service:catalog")
    )
    assert not again.deleted
    missing = await rpc_error(
        serving.stub.DeleteItem(pb.DeleteItemRequest(item_id="i18"), metadata=serving.auth("service:catalog"))
    )
    assert error_reason(missing) == "ITEM_NOT_FOUND"
    await serving.upsert(catalog_item("i18"))  # created again
    assert ids(await serving.recommend("c-1", k=1)) == ["i18"]
    plain = await serving.recommend("c-1", k=5)
    varied = await serving.recommend("c-1", k=5, diversity=1.0)
    assert ids(plain)[0] == ids(varied)[0] and ids(plain) != ids(varied)
    assert sorted(item.score for item in varied.items) != [item.score for item in varied.items]


async def test_fallbacks_say_why_in_the_documented_order(serving: Serving):
    no_model = await serving.recommend("c-1", k=3)
    assert (no_model.personalized, no_model.fallback_reason) == (False, pb.FALLBACK_REASON_NO_MODEL)
    # Nothing interacted yet: popularity ties, broken by item_id.
    assert no_model.model_version == "" and ids(no_model) == ["i0", "i1", "i10"]
    assert no_model.items[0].reasons[0].kind == pb.REASON_KIND_POPULAR
    anonymous = await serving.recommend("", k=2)
    assert (anonymous.fallback_reason, anonymous.consent_revision) == (pb.FALLBACK_REASON_ANONYMOUS, 0)
    await serving.activate("A")
    refused = await serving.recommend("c-3", k=2, filter=pb.ItemFilter(category_prefixes=["home"]))
    assert refused.fallback_reason == pb.FALLBACK_REASON_NO_CONSENT and ids(refused) == ["i1", "i11"]
    assert not refused.data_categories_used
    cold = await serving.recommend("c-4", k=2)
    assert (cold.personalized, cold.fallback_reason) == (False, pb.FALLBACK_REASON_COLD_START)
    # An anonymous visitor's session items are folded in: results follow the session.
    session = await serving.recommend("", recent=["i3"], k=2)
    assert session.personalized and session.fallback_reason == pb.FALLBACK_REASON_ANONYMOUS
    assert session.model_version == serving.versions["A"]
    assert list(session.data_categories_used) == [BROWSING]
    reason = session.items[0].reasons[0]
    assert (reason.kind, reason.item_id) == (pb.REASON_KIND_SIMILAR_TO_RECENT_ITEM, "i3")


async def test_a_withdrawal_changes_the_very_next_answer(serving: Serving):
    await serving.activate("A")
    assert (await serving.recommend("c-1")).personalized
    await serving.suite.withdraw("c-1", categories=[PURCHASES])
    await serving.consent_applied()
    # Without purchase history the learned row (built from it) is not used.
    partial = await serving.recommend("c-1", exclude_purchased=True)
    assert PURCHASES not in partial.data_categories_used
    assert partial.fallback_reason == pb.FALLBACK_REASON_COLD_START
    await serving.suite.withdraw("c-1")
    await serving.consent_applied()
    withdrawn = await serving.recommend("c-1")
    assert withdrawn.fallback_reason == pb.FALLBACK_REASON_NO_CONSENT and not withdrawn.personalized


async def test_fresh_events_change_the_recommendations_within_two_seconds_without_training(serving: Serving):
    await serving.activate("A")
    assert (await serving.recommend("c-4")).fallback_reason == pb.FALLBACK_REASON_COLD_START
    started = time.monotonic()
    await serving.suite.ingest(
        event("e-1", "c-4", profile_pb.EVENT_TYPE_PRODUCT_VIEW, ("i2",), seconds_ago=1)
    )

    async def folded() -> pb.Recommendations | None:
        found = await serving.recommend("c-4", k=3)
        return found if found.personalized else None

    found = await until(folded, "the fresh view folded in", FOLD_IN_BOUND_SECONDS)
    assert time.monotonic() - started < FOLD_IN_BOUND_SECONDS
    assert found.model_version == serving.versions["A"] and BROWSING in found.data_categories_used
    assert any(reason.item_id == "i2" for item in found.items for reason in item.reasons)
    # A purchase is masked with exclude_purchased (purchase history is granted).
    await serving.suite.ingest(event("e-2", "c-1", profile_pb.EVENT_TYPE_PURCHASE, ("i19",), seconds_ago=1))

    async def masked() -> bool:
        found = await serving.recommend("c-1", k=1, exclude_purchased=True)
        return ids(found) == ["i18"] and PURCHASES in found.data_categories_used

    await until(masked, "the purchase masked", FOLD_IN_BOUND_SECONDS)


async def test_batch_recommend_streams_in_order_from_one_model(serving: Serving):
    await serving.activate("A")
    customers = ["c-2", "c-1", "c-4", "c-3"]
    stream = serving.stub.BatchRecommend(
        pb.BatchRecommendRequest(
            customer_ids=customers, options=pb.RecommendOptions(k=2, exclude_purchased=True)
        ),
        metadata=serving.auth("service:campaign"),
    )
    answers = [response.recommendations async for response in stream]
    assert [a.customer_id for a in answers] == customers
    assert [ids(a) for a in answers[:2]] == [["i0", "i1"], ["i19", "i18"]]
    assert [a.fallback_reason for a in answers[2:]] == [
        pb.FALLBACK_REASON_COLD_START,
        pb.FALLBACK_REASON_NO_CONSENT,
    ]
    assert {a.model_version for a in answers[:2]} == {serving.versions["A"]}
    for answer in answers:
        single = await serving.recommend(answer.customer_id, k=2, exclude_purchased=True)
        assert ids(single) == ids(answer)
        assert [i.score for i in single.items] == pytest.approx([i.score for i in answer.items])


async def test_similar_items_with_and_without_a_model(serving: Serving):
    request = pb.SimilarItemsRequest(item_id="i10", k=3)
    without = await serving.stub.SimilarItems(request, metadata=serving.auth())
    assert without.fallback_reason == pb.FALLBACK_REASON_NO_MODEL and not without.model_version
    assert [item.item_id for item in without.items] == ["i0", "i12", "i14"]  # popular in grocery/coffee
    await serving.activate("A")
    found = await serving.stub.SimilarItems(request, metadata=serving.auth())
    assert found.fallback_reason == pb.FALLBACK_REASON_NONE and found.model_version == serving.versions["A"]
    similar = [item.item_id for item in found.items]
    assert "i10" not in similar and similar[0] in ("i9", "i11")
    assert [i.similarity for i in found.items] == sorted((i.similarity for i in found.items), reverse=True)
    assert found.items[0].reasons[0].feature == f"item:{similar[0]}"
    assert found.items[0].reasons[0].contribution == pytest.approx(found.items[0].similarity, abs=1e-5)
    missing = await rpc_error(
        serving.stub.SimilarItems(pb.SimilarItemsRequest(item_id="nope"), metadata=serving.auth())
    )
    assert error_reason(missing) == "ITEM_NOT_FOUND"


async def test_activations_and_rollbacks_under_load_fail_no_request_and_never_mix_models(serving: Serving):
    await serving.activate("A")
    expected = {serving.versions["A"]: ["i19", "i18", "i17"], serving.versions["B"]: ["i0", "i1", "i2"]}
    seen: set[str] = set()
    stop = asyncio.Event()

    async def caller() -> int:
        count = 0
        while not stop.is_set():
            found = await serving.recommend("c-1", k=3)
            assert ids(found) == expected[found.model_version], found
            seen.add(found.model_version)
            count += 1
        return count

    # A batch's customers span two scoring chunks (256 each): one model for the whole stream.
    batch_ids = ["c-1", *(f"cold-{n}" for n in range(300)), "c-2"]
    expected_c2 = {serving.versions["A"]: ["i0", "i1", "i2"], serving.versions["B"]: ["i19", "i18", "i17"]}

    async def batcher() -> int:
        count = 0
        while not stop.is_set():
            stream = serving.stub.BatchRecommend(
                pb.BatchRecommendRequest(customer_ids=batch_ids, options=pb.RecommendOptions(k=3)),
                metadata=serving.auth("service:campaign"),
            )
            answers = [response.recommendations async for response in stream]
            first, last = answers[0], answers[-1]
            assert first.model_version == last.model_version, (first.model_version, last.model_version)
            assert (
                ids(first) == expected[first.model_version] and ids(last) == expected_c2[last.model_version]
            )
            count += 1
        return count

    callers = [asyncio.create_task(caller()) for _ in range(8)]
    batchers = [asyncio.create_task(batcher()) for _ in range(2)]
    for name in ("B", "A", "B", "A", "B"):  # B, then rollbacks to A and back
        await serving.activate(name)
        await asyncio.sleep(0.05)
    stop.set()
    counts = await asyncio.gather(*callers)
    assert sum(counts) > 20 and seen == set(expected)
    assert all(await asyncio.gather(*batchers))


async def test_an_erased_customer_is_a_cold_start_from_the_next_request(serving: Serving):
    await serving.activate("A")
    assert (await serving.recommend("c-1")).personalized
    privacy = privacy_grpc.DataSubjectServiceStub(serving.service.channel)
    await privacy.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="c-1", request_id="erase-c-1"),
        metadata=serving.auth("service:consent"),
    )
    found = await serving.recommend("c-1")
    assert (found.personalized, found.fallback_reason) == (False, pb.FALLBACK_REASON_COLD_START)
    # A restarted replica (a fresh overlay read from the database) masks the row too.
    active = serving.servicer.active_model
    active._erased.clear()
    await active.refresh()
    assert (await serving.recommend("c-1")).fallback_reason == pb.FALLBACK_REASON_COLD_START
    # So does another model trained before the erasure (a rollback), from its first request.
    active._erased.clear()
    await serving.activate("B")
    assert (await serving.recommend("c-1")).fallback_reason == pb.FALLBACK_REASON_COLD_START
    assert (await serving.recommend("c-2")).personalized


async def test_bad_input_names_each_field(serving: Serving):
    error = await rpc_error(
        serving.stub.Recommend(
            pb.RecommendRequest(
                customer_id="bad id",
                options=pb.RecommendOptions(
                    k=101,
                    diversity=float("nan"),
                    max_reasons=11,
                    filter=pb.ItemFilter(
                        category_prefixes=["a//b"] + ["x"] * 20, exclude_item_ids=["ok", "bad id"]
                    ),
                ),
                context=pb.RecommendationContext(recent_item_ids=["i1"] * 51),
            ),
            metadata=serving.auth(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {
        "customer_id",
        "options.k",
        "options.diversity",
        "options.max_reasons",
        "options.filter.category_prefixes",
        "options.filter.exclude_item_ids[1]",
        "context.recent_item_ids",
    }
    for diversity in (-0.1, 1.5, float("inf")):
        error = await rpc_error(serving.recommend("c-1", diversity=diversity))
        assert set(field_violations(error)) == {"options.diversity"}
    error = await rpc_error(serving.recommend("c-1", filter=pb.ItemFilter(category_prefixes=["a//b"])))
    assert set(field_violations(error)) == {"options.filter.category_prefixes[0]"}
    for customers, field in (
        (["c-1", "c-1"], "customer_ids[1]"),
        ([], "customer_ids"),
        (["ok", ""], "customer_ids[1]"),
    ):
        stream = serving.stub.BatchRecommend(
            pb.BatchRecommendRequest(customer_ids=customers), metadata=serving.auth()
        )
        error = await rpc_error(stream.read())
        assert set(field_violations(error)) == {field}
    error = await rpc_error(
        serving.stub.SimilarItems(
            pb.SimilarItemsRequest(item_id="", k=-1, max_reasons=-1), metadata=serving.auth()
        )
    )
    assert set(field_violations(error)) == {"item_id", "k", "max_reasons"}


async def test_a_consent_cache_staler_than_its_bound_falls_back_and_says_so(serving: Serving):
    await serving.activate("A")
    assert (await serving.recommend("c-1")).personalized
    # The bound is NAJIMI_CONSENT_MAX_STALENESS_SECONDS (30 s by default); a second here,
    # while the consent cache hears a heartbeat every second as long as consent runs.
    serving.servicer.recommender.max_staleness_seconds = 1.5
    assert (await serving.recommend("c-1")).personalized
    await serving.suite.consent.running.stop(0)

    async def stale() -> pb.Recommendations | None:
        found = await serving.recommend("c-1", k=2)
        return found if found.fallback_reason == pb.FALLBACK_REASON_CONSENT_STALE else None

    found = await until(stale, "CONSENT_STALE once consent is silent")
    assert not found.personalized and not found.data_categories_used and ids(found) == ["i0", "i1"]
    assert (await serving.recommend("", k=1)).fallback_reason == pb.FALLBACK_REASON_ANONYMOUS


async def test_a_known_customers_earlier_purchases_are_because_you_bought_reasons(serving: Serving):
    await serving.activate("A")
    await serving.suite.ingest(
        event("e-old", "c-1", profile_pb.EVENT_TYPE_PURCHASE, ("i18",), seconds_ago=60)
    )

    async def stored() -> bool:
        return ids(await serving.recommend("c-1", k=1, exclude_purchased=True)) == ["i19"] and (
            "i18" not in ids(await serving.recommend("c-1", k=3, exclude_purchased=True))
        )

    await until(stored, "the purchase in the interaction copy")
    # A model trained after the purchase was stored: the purchase is what its row learned from.
    servicer = serving.servicer
    serving.versions["A2"] = await register(
        servicer.registry, servicer.model_dir, model_artefact(False), "model-A2"
    )
    await serving.activate("A2")
    found = await serving.recommend("c-1", k=3, max_reasons=10)
    assert ids(found) == ["i19", "i18", "i17"]
    # The scores are the row's alone (i / 19): explaining the row by the purchase changes none.
    assert [item.score for item in found.items] == pytest.approx([19 / 19, 18 / 19, 17 / 19], abs=1e-5)
    bought = [r for r in found.items[0].reasons if r.kind == pb.REASON_KIND_SIMILAR_TO_RECENT_ITEM]
    assert [(r.item_id, r.data_category, r.text) for r in bought] == [
        ("i18", PURCHASES, "Because you bought Item 18.")
    ]
    # The customer's side of the score (the row's remainder and the purchase's part) adds up to it.
    customer_side = [r for r in found.items[0].reasons if r in bought or r.feature == "customer:c-1"]
    assert len(customer_side) == 2
    assert sum(r.contribution for r in customer_side) == pytest.approx(found.items[0].score, abs=1e-5)
    # Without consent to purchase history the row is not used, nor its parts.
    await serving.suite.withdraw("c-1", categories=(PURCHASES,))
    await serving.consent_applied()
    after = await serving.recommend("c-1", k=3, max_reasons=10)
    assert not any(r.item_id == "i18" for item in after.items for r in item.reasons)
