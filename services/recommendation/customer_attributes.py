"""Customers' consented attributes for serving, from profile's purpose-bound read, cached.

Serving uses a customer's attributes (age range, gender, region, custom attributes) as
the model's customer features: the only features of a customer the model does not know
(a cold start served from their attributes), and the current ones beside a known
customer's learned row. They come from GetCustomer with purpose personalize.recommendations,
which clears every field the customer does not consent to for it; each request checks
the categories again against the consent cache, so a withdrawal stops an attribute's use
from the very next request even while its value is cached. Values are cached for
TTL_SECONDS (a changed attribute is used within that), failures for FAILURE_SECONDS,
and an erasure drops the customer's entry at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.recommendation.interactions import PURPOSE
from services.recommendation.training.dataset import ATTRIBUTE_CATEGORIES, consented_attributes
from services.recommendation.training.features import CUSTOM_PREFIX, CustomerAttributes, customer_metadata
from shared.log import get_logger

log = get_logger("najimi.recommendation.customer_attributes")

TTL_SECONDS = 60.0
FAILURE_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 1.0
MAX_CUSTOMERS = 100_000
NONE = CustomerAttributes("")


def attribute_features(
    customer: CustomerAttributes, attributes: Sequence[str]
) -> tuple[tuple[str, str], ...]:
    """(feature name, data category) of the customer's attributes among `attributes`
    ("age_range", "gender", "region", "custom:<key>"), named as training names them."""
    found: list[tuple[str, str]] = []
    for name in customer_metadata(customer, attributes):
        kind, _, rest = name.partition(":")
        if kind == CUSTOM_PREFIX[:-1]:
            category = customer.custom_categories.get(rest.partition(":")[0], "")
        else:
            category = ATTRIBUTE_CATEGORIES.get(kind, "")
        if category:
            found.append((name, category))
    return tuple(found)


class CustomerAttributeCache:
    def __init__(self, profile: profile_grpc.ProfileServiceStub | None, clock=time.monotonic):  # type: ignore[no-untyped-def]
        self.profile = profile
        self.clock = clock
        self._cached: OrderedDict[str, tuple[float, CustomerAttributes]] = OrderedDict()
        self._reading: dict[str, asyncio.Future[CustomerAttributes]] = {}
        self._generation = 0

    async def of(self, customer_id: str) -> CustomerAttributes:
        found = self._cached.get(customer_id)
        if found is not None and found[0] > self.clock():
            return found[1]
        reading = self._reading.get(customer_id)
        if reading is not None:  # concurrent requests of one customer share one read
            return await asyncio.shield(reading)
        future: asyncio.Future[CustomerAttributes] = asyncio.get_running_loop().create_future()
        self._reading[customer_id] = future
        generation = self._generation
        try:
            attributes, ttl = await self._read(customer_id)
            if generation == self._generation:
                self._cached[customer_id] = (self.clock() + ttl, attributes)
                self._cached.move_to_end(customer_id)
                if len(self._cached) > MAX_CUSTOMERS:
                    self._cached.popitem(last=False)
            future.set_result(attributes)
            return attributes
        finally:
            if not future.done():
                future.set_result(NONE)
            self._reading.pop(customer_id, None)

    async def _read(self, customer_id: str) -> tuple[CustomerAttributes, float]:
        if self.profile is None:
            return NONE, TTL_SECONDS
        try:
            response = await self.profile.GetCustomer(
                profile_pb.GetCustomerRequest(customer_id=customer_id, purpose=PURPOSE),
                timeout=READ_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return NONE, TTL_SECONDS
            log.warning("customer_attributes_unavailable", code=error.code().name)
            return NONE, FAILURE_SECONDS
        except Exception as error:  # profile's trouble must not fail a recommendation
            log.warning("customer_attributes_unavailable", error=type(error).__name__)
            return NONE, FAILURE_SECONDS
        return consented_attributes(response.customer), TTL_SECONDS

    def forget(self, customer_ids: Iterable[str]) -> None:
        """These customers changed (erased): read them again."""
        self._generation += 1
        for customer_id in customer_ids:
            self._cached.pop(customer_id, None)
