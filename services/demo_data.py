"""Loads the demo data (services/demo_generator.py) through the services' own RPCs.

`make run` calls `load_demo_data` once every service is SERVING. In order:
1. customers (profile CreateCustomer, with their e-mail, loyalty card and cookie id
   linked), 2. their consents (consent GrantConsent), 3. the catalog (recommendation
   UpsertItems, in batches of at most 1000), 4. the demo device (replenishment
   RegisterDevice), 5. about six months of events (profile IngestEvents, batches of 1000).

Every call carries a fixed request id or event id, so loading twice changes nothing: a
second run finds the customers, consents, items and device as they were and every event
a DUPLICATE. The generator's end time is fixed at the first load (kept in
<data_dir>/demo-data.json), so a later run regenerates exactly the same data.

Events whose data category the customer has not consented to come back
REJECTED_CONSENT and are not stored: that is intended (a few customers consent
narrowly or not at all, demo-chloe not at all), and the summary counts them. An event
rejected although the customer did consent means the profile service's consent cache
had not seen the grant yet; those are sent again for a few seconds.

The demo device's token is returned only once; it is kept in <data_dir>/demo-devices.json
so a grpcurl user can act as that device.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as repl_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from services.demo_generator import (
    CURRENCY,
    DAY_US,
    DEFAULT_CUSTOMERS,
    LOYALTY_ISSUER,
    CatalogItem,
    DemoCustomer,
    DemoData,
    DemoEvent,
    generate,
)

CATALOG_BATCH = 1000  # UpsertItems takes at most 1000 items
EVENT_BATCH = 1000  # IngestEvents takes at most 1000 events
PARALLEL_CALLS = 8  # unary calls in flight while loading customers and consents
PARALLEL_BATCHES = 4  # IngestEvents batches in flight
CALL_TIMEOUT = 30.0
RETRY_SECONDS = 20.0  # how long to keep retrying UNAVAILABLE, or a grant not yet seen
ANCHOR_FILE = "demo-data.json"

T = TypeVar("T")


def _device_request() -> repl_pb.RegisterDeviceRequest:
    return repl_pb.RegisterDeviceRequest(
        request_id="demo-device-aiko-printer",
        customer_id="demo-aiko",
        manufacturer="Inkwell",
        model="IW-200",
        kind="printer",
        serial_number="IW200-0001",
        display_name="Aiko's printer",
        slots=[
            repl_pb.Slot(
                slot_id="black",
                display_name="Black ink",
                item_id="ink-black-xl",
                capacity=100.0,
                unit="percent",
                reorder_quantity=1,
                unit_price_micros=4_200_000_000,
                currency_code="JPY",
                policy=repl_pb.SLOT_POLICY_NOTIFY_ONLY,
                lead_time=duration_pb2.Duration(seconds=2 * 86400),
            ),
            repl_pb.Slot(
                slot_id="colour",
                display_name="Colour ink",
                item_id="ink-colour",
                capacity=100.0,
                unit="percent",
                reorder_quantity=1,
                unit_price_micros=5_100_000_000,
                currency_code="JPY",
                policy=repl_pb.SLOT_POLICY_NOTIFY_ONLY,
                lead_time=duration_pb2.Duration(seconds=2 * 86400),
            ),
        ],
    )


# -- generated data -> protobuf -----------------------------------------------------------


def customer_request(customer: DemoCustomer) -> profile_pb.CreateCustomerRequest:
    """The CreateCustomer of one demo customer (request id as in the first demo)."""
    message = profile_pb.Customer(
        display_name=customer.display_name,
        email=customer.email,
        phone=customer.phone,
        birth_year=customer.birth_year,
        gender=profile_pb.Gender.Value(f"GENDER_{customer.gender}"),
        region=customer.region,
        language_code=customer.language_code,
        attributes={
            "loyalty_tier": profile_pb.AttributeValue(
                string_value=customer.loyalty_tier, data_category="user.behavior.purchase_history"
            )
        },
    )
    message.signup_time.FromMicroseconds(customer.signup_us)
    return profile_pb.CreateCustomerRequest(
        request_id=f"demo-{customer.customer_id}",
        customer_id=customer.customer_id,
        customer=message,
        identities=[
            profile_pb.Identifier(type=profile_pb.IDENTIFIER_TYPE_EMAIL, value=customer.email),
            profile_pb.Identifier(
                type=profile_pb.IDENTIFIER_TYPE_LOYALTY_CARD,
                value=customer.loyalty_card,
                issuer=LOYALTY_ISSUER,
            ),
            profile_pb.Identifier(type=profile_pb.IDENTIFIER_TYPE_COOKIE_ID, value=customer.cookie_id),
        ],
    )


def grant_requests(customer: DemoCustomer) -> list[consent_pb.GrantConsentRequest]:
    return [
        consent_pb.GrantConsentRequest(
            customer_id=customer.customer_id,
            purpose=grant.purpose,
            data_categories=list(grant.data_categories),
            notice_version=1,
            collection_method=consent_pb.CollectionMethod.Value(
                f"COLLECTION_METHOD_{grant.collection_method}"
            ),
            jurisdiction=customer.region,
            request_id=grant.request_id(customer.customer_id),
        )
        for grant in customer.consents
    ]


def item_message(item: CatalogItem) -> rec_pb.Item:
    return rec_pb.Item(
        item_id=item.item_id,
        title=item.title,
        category_path=list(item.category_path),
        brand=item.brand,
        price_micros=item.price_micros,
        currency_code=CURRENCY,
        tags=list(item.tags),
        available=True,
    )


def catalog_requests(items: Sequence[CatalogItem]) -> list[rec_pb.UpsertItemsRequest]:
    """The catalog in batches of at most CATALOG_BATCH items, each with a fixed request id."""
    return [
        rec_pb.UpsertItemsRequest(
            request_id=f"demo-catalog-v2-{start // CATALOG_BATCH:03d}",
            items=[item_message(item) for item in items[start : start + CATALOG_BATCH]],
        )
        for start in range(0, len(items), CATALOG_BATCH)
    ]


_IDENTIFIER_TYPES = {
    "loyalty_card": profile_pb.IDENTIFIER_TYPE_LOYALTY_CARD,
    "cookie_id": profile_pb.IDENTIFIER_TYPE_COOKIE_ID,
}


def event_message(event: DemoEvent) -> profile_pb.Event:
    message = profile_pb.Event(
        event_id=event.event_id,
        channel=profile_pb.Channel.Value(f"CHANNEL_{event.channel}"),
        event_type=profile_pb.EventType.Value(f"EVENT_TYPE_{event.event_type}"),
        items=[
            profile_pb.EventItem(
                item_id=line.item_id,
                category_path=list(line.category_path),
                quantity=line.quantity,
                unit_price_micros=line.unit_price_micros,
                currency_code=CURRENCY if line.unit_price_micros else "",
            )
            for line in event.items
        ],
        search_query=event.search_query,
        rating_value=event.rating_value,
        value_micros=event.value_micros,
        currency_code=event.currency_code,
        order_id=event.order_id,
        store_id=event.store_id,
    )
    if event.identified_by:
        message.identifier.CopyFrom(
            profile_pb.Identifier(
                type=_IDENTIFIER_TYPES[event.identified_by],
                value=event.identifier_value,
                issuer=LOYALTY_ISSUER if event.identified_by == "loyalty_card" else "",
            )
        )
    else:
        message.customer_id = event.customer_id
    message.occur_time.FromMicroseconds(event.occurred_at_us)
    if event.properties:
        message.properties.update(dict(event.properties))
    return message


# -- loading ------------------------------------------------------------------------------


def demo_end_us(data_dir: Path | None) -> int:
    """Where the demo's months of events end: today's midnight (UTC) at the first load.

    Kept in <data_dir>/demo-data.json, so that every later load regenerates the same data.
    """
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end_us = int(today.timestamp()) * 1_000_000
    if data_dir is None:
        return end_us
    path = data_dir / ANCHOR_FILE
    try:
        return int(json.loads(path.read_text())["end_us"])
    except (OSError, ValueError, KeyError, TypeError):
        path.write_text(json.dumps({"end_us": end_us, "end": today.isoformat()}) + "\n")
        return end_us


def _with_retry(call: Callable[[], T], deadline: float) -> T:
    """`call()`, again after UNAVAILABLE (a service still starting, a stale consent cache)."""
    delay = 0.1
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2.0, delay * 2)


def _in_parallel(function: Callable[[T], Any], values: Sequence[T], workers: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, values))


def _create_customers(channel: grpc.Channel, metadata: Any, customers: Sequence[DemoCustomer]) -> int:
    """Creates the customers; returns how many already existed under another request id."""
    stub = profile_grpc.ProfileServiceStub(channel)
    deadline = time.monotonic() + RETRY_SECONDS

    def create(customer: DemoCustomer) -> bool:
        request = customer_request(customer)
        try:
            _with_retry(
                lambda: stub.CreateCustomer(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline
            )
        except grpc.RpcError as error:
            # Created earlier under another request id (e.g. by hand with grpcurl): keep it.
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:
                return True
            raise
        return False

    return sum(_in_parallel(create, customers, PARALLEL_CALLS))


def _grant_consents(channel: grpc.Channel, metadata: Any, customers: Sequence[DemoCustomer]) -> int:
    stub = consent_grpc.ConsentServiceStub(channel)
    requests = [request for customer in customers for request in grant_requests(customer)]
    deadline = time.monotonic() + RETRY_SECONDS

    def grant(request: consent_pb.GrantConsentRequest) -> None:
        _with_retry(lambda: stub.GrantConsent(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline)

    _in_parallel(grant, requests, PARALLEL_CALLS)
    return len(requests)


@dataclass
class EventLoad:
    """What became of the demo events (per EventResultStatus name), and examples of problems."""

    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    unimplemented: bool = False
    seconds: float = 0.0


def _ingest_events(
    channel: grpc.Channel, metadata: Any, data: DemoData, batch_size: int = EVENT_BATCH
) -> EventLoad:
    stub = profile_grpc.ProfileServiceStub(channel)
    collectable = {c.customer_id: c.collectable_categories for c in data.customers}
    load = EventLoad()
    started = time.monotonic()
    deadline = started + RETRY_SECONDS

    def send(batch: Sequence[DemoEvent]) -> list[tuple[DemoEvent, profile_pb.EventResult]]:
        request = profile_pb.IngestEventsRequest(events=[event_message(event) for event in batch])
        reply = _with_retry(
            lambda: stub.IngestEvents(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline
        )
        return list(zip(batch, reply.results, strict=True))

    pending: Sequence[DemoEvent] = data.events
    delay = 0.25
    while pending:
        batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)]
        try:
            outcomes = [pair for done in _in_parallel(send, batches, PARALLEL_BATCHES) for pair in done]
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                load.unimplemented = True
                return load
            raise
        again: list[DemoEvent] = []
        for event, result in outcomes:
            status = profile_pb.EventResultStatus.Name(result.status).removeprefix("EVENT_RESULT_STATUS_")
            # A rejection for a category the customer did grant: the profile service's
            # consent cache has not caught up with the grants yet. Send it again shortly.
            if status == "REJECTED_CONSENT" and event.data_category in collectable[event.customer_id]:
                if time.monotonic() < deadline:
                    again.append(event)
                    continue
                status = "REJECTED_CONSENT_UNEXPECTEDLY"
            load.statuses[status] += 1
            if (
                status in ("INVALID", "UNKNOWN_CUSTOMER", "REJECTED_CONSENT_UNEXPECTEDLY")
                and len(load.problems) < 5
            ):
                violations = "; ".join(f"{v.field}: {v.description}" for v in result.violations)
                load.problems.append(f"{event.event_id} ({event.event_type}) {status} {violations}".strip())
        pending = again
        if pending:
            time.sleep(delay)
            delay = min(2.0, delay * 2)
    load.seconds = time.monotonic() - started
    return load


@dataclass
class LoadReport:
    """What one load did: the generated data and what each service made of it."""

    data: DemoData
    existing_customers: int
    grants: int
    device_id: str
    events: EventLoad
    seconds: float

    def summary(self) -> str:
        data, events = self.data, self.events
        without = sum(1 for c in data.customers if not c.consents)
        segments = Counter(c.segment for c in data.customers)
        days = (data.end_us - data.start_us) // DAY_US
        parts = [
            f"{len(data.customers)} customers ({', '.join(f'{n} {s}' for s, n in sorted(segments.items()))}"
            + (f"; {self.existing_customers} existed already" if self.existing_customers else "")
            + ")",
            f"{self.grants} consents ({without} customers without any)",
            f"{len(data.items)} items",
            f"device {self.device_id} (token in demo-devices.json)",
        ]
        if events.unimplemented:
            parts.append(f"{len(data.events)} events not loaded: IngestEvents is not implemented yet")
        else:
            counted = ", ".join(
                f"{n} {status.lower().replace('_', ' ')}" for status, n in events.statuses.most_common()
            )
            parts.append(f"{len(data.events)} events over {days} days ({counted}) in {events.seconds:.1f} s")
            parts.extend(f"problem: {problem}" for problem in events.problems)
        return "; ".join(parts) + f"; loaded in {self.seconds:.1f} s"


def load_demo(
    addresses: Mapping[str, str],
    admin_token: str,
    data_dir: Path | None = None,
    customers: int = DEFAULT_CUSTOMERS,
) -> LoadReport:
    """Loads the demo data through the running services (see the module docstring)."""
    started = time.monotonic()
    metadata = (("authorization", f"Bearer {admin_token}"),)
    data = generate(demo_end_us(data_dir), customers=customers)
    with grpc.insecure_channel(addresses["NAJIMI_PROFILE_ADDRESS"]) as channel:
        existing = _create_customers(channel, metadata, data.customers)
    # Consents right after the customers: the profile service's consent cache then has
    # the catalog and device steps' time to see them before the events arrive.
    with grpc.insecure_channel(addresses["NAJIMI_CONSENT_ADDRESS"]) as channel:
        grants = _grant_consents(channel, metadata, data.customers)
    with grpc.insecure_channel(addresses["NAJIMI_RECOMMENDATION_ADDRESS"]) as channel:
        stub = rec_grpc.RecommendationServiceStub(channel)
        for request in catalog_requests(data.items):
            stub.UpsertItems(request, metadata=metadata, timeout=CALL_TIMEOUT)
    with grpc.insecure_channel(addresses["NAJIMI_REPLENISHMENT_ADDRESS"]) as channel:
        registered = repl_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
            _device_request(), metadata=metadata, timeout=CALL_TIMEOUT
        )
    if data_dir is not None and registered.device_token:
        path = data_dir / "demo-devices.json"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({f"device:{registered.device.device_id}": registered.device_token}, file, indent=2)
    with grpc.insecure_channel(addresses["NAJIMI_PROFILE_ADDRESS"]) as channel:
        events = _ingest_events(channel, metadata, data)
    return LoadReport(data, existing, grants, registered.device.device_id, events, time.monotonic() - started)


def load_demo_data(addresses: Mapping[str, str], admin_token: str, data_dir: Path | None = None) -> str:
    """Loads the demo data through the running services; returns a one-line summary."""
    return load_demo(addresses, admin_token, data_dir).summary()
