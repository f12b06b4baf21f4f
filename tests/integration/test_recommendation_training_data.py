"""A training run's data, read through the real stack (consent, profile and recommendation
in-process, real gRPC, SQLite and PostgreSQL): the consented interaction copy, the whole
catalog, and each customer's attributes as far as they consent to them for
personalize.recommendations."""

from __future__ import annotations

from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc

from services.recommendation.training.dataset import TrainingSource, used_categories
from services.recommendation.training.features import CustomerAttributes
from tests.integration.test_profile_interactions import BROWSING, PURCHASES, purchase, start_suite, view
from tests.integration.test_recommendation_interaction_copy import copy_of, start_recommendation, until

AGE, GENDER, LOCATION = "user.demographic.age_range", "user.demographic.gender", "user.location.imprecise"
TELEMETRY = "user.device.telemetry"


async def test_a_run_reads_the_copy_the_catalog_and_only_consented_attributes(
    consented_profile, start_service, dev_tokens, database_url
):
    suite = await start_suite(consented_profile, database_url, customers_=())
    for customer_id, birth_year, gender, region in (
        ("c-1", 1990, pb.GENDER_FEMALE, "JP-13"),
        ("c-2", 1970, pb.GENDER_MALE, "JP-27"),
    ):
        await suite.stub.CreateCustomer(
            pb.CreateCustomerRequest(
                request_id=f"create-{customer_id}",
                customer_id=customer_id,
                customer=pb.Customer(
                    birth_year=birth_year,
                    gender=gender,
                    region=region,
                    attributes={
                        "tier": pb.AttributeValue(string_value="gold", data_category=PURCHASES),
                        "thermostat": pb.AttributeValue(bool_value=True, data_category=TELEMETRY),
                    },
                ),
            ),
            metadata=suite.profile.auth("admin"),
        )
    # c-1 grants everything the model may use but telemetry; c-2 only its purchases.
    await suite.grant("c-1", categories=(PURCHASES, BROWSING, AGE, GENDER, LOCATION))
    await suite.grant("c-2", categories=(PURCHASES,))
    await suite.ingest(
        view("e-1", "c-1", "a"), purchase("e-2", "c-1", ("b",)), purchase("e-3", "c-2", ("a",))
    )
    recommendation = await start_recommendation(start_service, dev_tokens, suite, database_url)
    await until(recommendation, lambda entries: len(entries) == 3)
    catalog = rec_grpc.RecommendationServiceStub(recommendation.channel)
    await catalog.UpsertItems(
        rec_pb.UpsertItemsRequest(
            request_id="items-1",
            items=[rec_pb.Item(item_id=i, title=i.upper(), available=i != "c") for i in ("a", "b", "c")],
        ),
        metadata=recommendation.auth("admin"),
    )

    copy = copy_of(recommendation)
    data = await TrainingSource(copy._settings, copy.db).load()

    assert sorted((i.customer_id, i.item_id, i.event_id) for i in data.interactions) == [
        ("c-1", "a", "e-1"),
        ("c-1", "b", "e-2"),
        ("c-2", "a", "e-3"),
    ]
    assert [item.item_id for item in data.items] == ["a", "b", "c"]  # unavailable items too
    assert data.data_cursor == await copy.cursor() and data.data_cursor
    c1 = data.customers["c-1"]
    assert (c1.gender, c1.region, c1.custom) == ("female", "JP-13", {"tier": "gold"})
    assert c1.age_range and c1.custom_categories == {"tier": PURCHASES}
    assert data.customers["c-2"] == CustomerAttributes(
        "c-2", custom={"tier": "gold"}, custom_categories={"tier": PURCHASES}
    )
    assert used_categories(data, ["age_range", "gender", "region", "custom:tier"]) == sorted(
        [AGE, BROWSING, GENDER, LOCATION, PURCHASES]
    )
    assert used_categories(data, ["region"]) == sorted([BROWSING, LOCATION, PURCHASES])
