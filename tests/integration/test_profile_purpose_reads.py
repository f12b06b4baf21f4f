"""Purpose-bound reads: GetCustomer and ListCustomers with a purpose show only what the
customer consents to for it, through a real consent service (services/profile/withholding.py)."""

from __future__ import annotations

import grpc
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, field_violations, rpc_error
from tests.integration.test_consent_decisions import grant, withdraw

RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
TELEMETRY = "user.device.telemetry"
AGE, GENDER, LOCATION, CONTACT = (
    "user.demographic.age_range",
    "user.demographic.gender",
    "user.location.imprecise",
    "user.contact",
)


def read_for(purpose: str, customer_id: str = "cus-1") -> pb.GetCustomerRequest:
    return pb.GetCustomerRequest(customer_id=customer_id, purpose=purpose)


async def test_a_purpose_bound_read_shows_only_consented_categories(consented_profile, database_url):
    profile, consent = await consented_profile(database_url)
    stub, consent_stub = (
        pb_grpc.ProfileServiceStub(profile.channel),
        consent_grpc.ConsentServiceStub(consent.channel),
    )
    cache = profile.running.app.registrations[0].servicer.consent
    recommender, storefront = profile.auth("service:recommendation"), profile.auth("service:storefront")
    await stub.CreateCustomer(
        pb.CreateCustomerRequest(
            request_id="create-1",
            customer_id="cus-1",
            customer=pb.Customer(
                display_name="Hanako Sato",
                email="hanako@example.com",
                birth_year=1990,
                gender=pb.GENDER_FEMALE,
                region="JP-13",
                language_code="ja",
                attributes={
                    "tier": pb.AttributeValue(string_value="gold", data_category=PURCHASES),
                    "thermostat": pb.AttributeValue(bool_value=True, data_category=TELEMETRY),
                },
            ),
        ),
        metadata=profile.auth("admin"),
    )
    full = (await stub.GetCustomer(pb.GetCustomerRequest(customer_id="cus-1"), metadata=storefront)).customer

    # No consent yet: every field of a category is withheld; account data stays.
    nothing = (await stub.GetCustomer(read_for(RECS), metadata=recommender)).customer
    assert list(nothing.withheld_data_categories) == sorted(
        [AGE, GENDER, LOCATION, CONTACT, PURCHASES, TELEMETRY]
    )
    assert (nothing.display_name, nothing.email, nothing.age_range, nothing.region) == ("", "", "", "")
    assert nothing.gender == pb.GENDER_UNSPECIFIED and not nothing.attributes
    assert (nothing.language_code, nothing.signup_time, nothing.etag) == (
        "ja",
        full.signup_time,
        full.etag,
    )

    granted = await consent_stub.GrantConsent(
        grant(customer="cus-1", purpose=RECS, categories=(AGE, GENDER, PURCHASES), request_id="g-1"),
        metadata=consent.auth(),
    )
    assert await cache.wait_for_revision(granted.consent.revision, 5)
    some = (await stub.GetCustomer(read_for(RECS), metadata=recommender)).customer
    assert list(some.withheld_data_categories) == sorted([CONTACT, LOCATION, TELEMETRY])
    assert (some.age_range, some.gender, some.region, some.display_name) == (
        full.age_range,
        pb.GENDER_FEMALE,
        "",
        "",
    )
    assert dict(some.attributes) == {"tier": full.attributes["tier"]}
    listed = await stub.ListCustomers(pb.ListCustomersRequest(purpose=RECS), metadata=recommender)
    assert list(listed.customers) == [some]

    # A withdrawal shows at once.
    withdrawn = await consent_stub.WithdrawConsent(
        withdraw(customer="cus-1", purpose=RECS, categories=(GENDER,), request_id="w-1"),
        metadata=consent.auth(),
    )
    assert await cache.wait_for_revision(withdrawn.consent.revision, 5)
    fewer = (await stub.GetCustomer(read_for(RECS), metadata=recommender)).customer
    assert fewer.gender == pb.GENDER_UNSPECIFIED and GENDER in fewer.withheld_data_categories
    assert fewer.age_range == full.age_range

    # The views are copies: a read without a purpose still sees everything (masked).
    again = (await stub.GetCustomer(pb.GetCustomerRequest(customer_id="cus-1"), metadata=storefront)).customer
    assert again == full and not again.withheld_data_categories

    error = await rpc_error(stub.GetCustomer(read_for("marketing.no_such_purpose"), metadata=recommender))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "UNKNOWN_PURPOSE"
    assert "purpose" in field_violations(error)
    error = await rpc_error(
        stub.ListCustomers(pb.ListCustomersRequest(purpose="marketing.no_such_purpose"), metadata=recommender)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "purpose" in field_violations(error)


async def test_a_purpose_bound_read_fails_closed_without_consent_state(start_service):
    profile = await start_service("profile", consent_address="127.0.0.1:1")  # nothing listens there
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    error = await rpc_error(stub.GetCustomer(read_for(RECS), metadata=profile.auth("service:recommendation")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "CONSENT_STATE_STALE"
