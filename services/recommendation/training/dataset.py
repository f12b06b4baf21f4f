"""What a training run reads: the local consented interaction copy and the catalog (this
service's store), and customers' consented attributes from profile over gRPC.

Profile's purpose-bound ListCustomers (purpose personalize.recommendations, as
service:recommendation) clears every field whose data category the customer does not
grant for that purpose, so whatever attribute it returns may be learned from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from sqlalchemy.engine import Connection

from services.recommendation.catalog import Item
from services.recommendation.interactions import PURPOSE, StoredInteraction, all_interactions, read_cursor
from services.recommendation.store import catalog_items
from services.recommendation.training.features import CustomerAttributes
from shared.clients import client_for
from shared.db import Database
from shared.settings import Settings

PROFILE_PAGE = 1000
# The consent data categories of the built-in attributes (profile_service.proto, Customer).
ATTRIBUTE_CATEGORIES = {
    "age_range": "user.demographic.age_range",
    "gender": "user.demographic.gender",
    "region": "user.location.imprecise",
}


@dataclass(frozen=True)
class TrainingData:
    interactions: list[StoredInteraction]
    items: list[Item]  # the whole catalog, in item_id order
    customers: dict[str, CustomerAttributes]  # live customers, by id
    data_cursor: str  # the interaction-copy cursor the interactions were read at


class TrainingSource:
    """Reads a run's data: the copy and the catalog in one read transaction, then profile
    (at settings.profile_address, as this service: its token and TLS; a stub given in
    `profile` instead, e.g. in tests)."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        profile: profile_grpc.ProfileServiceStub | None = None,
    ):
        self.settings = settings
        self.db = database
        self.profile = profile

    async def load(self) -> TrainingData:
        def read(connection: Connection) -> tuple[list[StoredInteraction], list[Item], str]:
            return all_interactions(connection), catalog_items(connection), read_cursor(connection)

        interactions, catalog, cursor = await self.db.read(read)
        if self.profile is not None:
            return TrainingData(interactions, catalog, await customers(self.profile), cursor)
        # A channel per run: a run is minutes apart from the next, and the worker holds nothing open.
        stub, channel = client_for(
            profile_grpc.ProfileServiceStub, self.settings.profile_address, self.settings
        )
        try:
            return TrainingData(interactions, catalog, await customers(stub), cursor)
        finally:
            await channel.close()


async def customers(profile: profile_grpc.ProfileServiceStub) -> dict[str, CustomerAttributes]:
    """Every live customer's attributes, as far as they consent to them for recommendations."""
    found: dict[str, CustomerAttributes] = {}
    token = ""
    while True:
        page = await profile.ListCustomers(
            profile_pb.ListCustomersRequest(page_size=PROFILE_PAGE, page_token=token, purpose=PURPOSE)
        )
        found.update((c.customer_id, consented_attributes(c)) for c in page.customers)
        token = page.next_page_token
        if not token:
            return found


def consented_attributes(customer: profile_pb.Customer) -> CustomerAttributes:
    """The attributes a purpose-bound read returned, and the data categories they belong to."""
    gender = (
        profile_pb.Gender.Name(customer.gender).removeprefix("GENDER_").lower()
        if customer.gender != profile_pb.GENDER_UNSPECIFIED
        else ""
    )
    custom: dict[str, str] = {}
    custom_categories: dict[str, str] = {}
    for key, value in customer.attributes.items():
        text = attribute_text(value)
        if text:
            custom[key] = text
            custom_categories[key] = value.data_category
    return CustomerAttributes(
        customer.customer_id,
        age_range=customer.age_range,
        gender=gender,
        region=customer.region,
        custom=custom,
        custom_categories=custom_categories,
    )


def attribute_text(value: profile_pb.AttributeValue) -> str:
    """A custom attribute's value as a feature value: numbers coarsened so they repeat."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return f"{value.double_value:.2g}"
    if kind == "point_in_time":
        return str(_year(value.point_in_time))
    return ""


def _year(timestamp: Timestamp) -> int:
    return timestamp.ToDatetime().year


def used_categories(data: TrainingData, attributes: Sequence[str]) -> list[str]:
    """The consent data categories of the customer data a model built from `data` learns from."""
    found = {interaction.data_category for interaction in data.interactions}
    for customer in data.customers.values():
        for attribute in attributes:
            key = attribute.removeprefix("custom:")
            if attribute.startswith("custom:"):
                if key in customer.custom_categories:
                    found.add(customer.custom_categories[key])
            elif getattr(customer, attribute, ""):
                found.add(ATTRIBUTE_CATEGORIES[attribute])
    return sorted(found)
