"""Loads the demo data (services/demo_generator.py) through the services' own RPCs.

`make run` calls `load_demo` once every service is SERVING. In order:
1. customers (profile CreateCustomer, with their e-mail, loyalty card and cookie id
   linked), 2. their consents (consent GrantConsent), 3. the catalog (recommendation
   UpsertItems, in batches of at most 1000), 4. the demo device (replenishment
   RegisterDevice), 5. about six months of events (profile IngestEvents, batches of 1000).

Every call carries a fixed request id or event id, so loading twice changes nothing. The
generator's end time is fixed at the first load (kept in <data_dir>/demo-data.json), so a
later run regenerates exactly the same data. A complete load is recorded there too: the
next start checks with one call per service that the data is still there and sends
nothing else.

Events whose data category the customer has not consented to come back
REJECTED_CONSENT and are not stored: that is intended (a few customers consent
narrowly or not at all, demo-chloe not at all), and the report counts them. They are
never sent again. So that a consented event is not refused because the profile
service's consent cache has not seen its grant yet, the events wait until it has seen
the last grant (`_await_consent`).

A demo customer erased by a data-subject request cannot be created again
(FAILED_PRECONDITION, reason CUSTOMER_ERASED): the load skips that customer, their
consents and events (and the device, if it was theirs), and says so.

The demo device's token is returned only once; it is kept in <data_dir>/demo-devices.json
(`DeviceBook`: name -> device id and token) so a grpcurl user can act as that device.

`register_demo_devices` (after the load, on every start: it is idempotent) registers the
simulated demo devices (`demo_fleet`: one water filter, printer and coffee machine of
demo customers who granted `replenishment.automatic_ordering`, their slots AUTO) into the
same file; `make run` then plays them with services/replenishment/simulator.py.
"""

from __future__ import annotations

import asyncio
import json
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
    AUTOMATIC_ORDERING,
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
from services.replenishment.simulator import (
    DEMO_DEVICES_FILE,
    DeviceBook,
    DeviceCredentials,
    DeviceSpec,
    SlotSpec,
    register_devices,
    rotate_token,
)
from shared.errors import error_reason

CATALOG_BATCH = 1000  # UpsertItems takes at most 1000 items
EVENT_BATCH = 1000  # IngestEvents takes at most 1000 events
PARALLEL_CALLS = 8  # unary calls in flight while loading customers and consents
PARALLEL_BATCHES = 4  # IngestEvents batches in flight
CALL_TIMEOUT = 30.0
RETRY_SECONDS = 20.0  # how long to keep retrying UNAVAILABLE (a service starting, stale consent)
DEVICE_OWNER = "demo-aiko"
# The category of every demo customer's loyalty tier: a purpose-bound read withholds it
# until the profile service has seen a grant of it (see _await_consent).
BARRIER_CATEGORY = "user.behavior.purchase_history"
ANCHOR_FILE = "demo-data.json"

T = TypeVar("T")


def _device_request() -> repl_pb.RegisterDeviceRequest:
    return repl_pb.RegisterDeviceRequest(
        request_id="demo-device-aiko-printer",
        customer_id=DEVICE_OWNER,
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


def _read_anchor(data_dir: Path | None) -> dict[str, Any]:
    if data_dir is None:
        return {}
    try:
        anchor = json.loads((data_dir / ANCHOR_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return anchor if isinstance(anchor, dict) else {}


def demo_end_us(data_dir: Path | None) -> int:
    """Where the demo's months of events end: today's midnight (UTC) at the first load.

    Kept in <data_dir>/demo-data.json, so that every later load regenerates the same data.
    """
    try:
        return int(_read_anchor(data_dir)["end_us"])
    except (KeyError, TypeError, ValueError):
        pass
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end_us = int(today.timestamp()) * 1_000_000
    if data_dir is not None:
        (data_dir / ANCHOR_FILE).write_text(json.dumps({"end_us": end_us, "end": today.isoformat()}) + "\n")
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


@dataclass
class CustomerLoad:
    """What became of the demo customers: ready (created now or earlier) or erased earlier."""

    ready: int = 0
    existing: int = 0  # created earlier under another request id (e.g. by hand with grpcurl)
    erased: list[str] = field(default_factory=list)


def _create_customers(
    channel: grpc.Channel, metadata: Any, customers: Sequence[DemoCustomer]
) -> CustomerLoad:
    stub = profile_grpc.ProfileServiceStub(channel)
    deadline = time.monotonic() + RETRY_SECONDS

    def create(customer: DemoCustomer) -> str:
        request = customer_request(customer)
        try:
            _with_retry(
                lambda: stub.CreateCustomer(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:
                return "existing"
            # A data-subject erasure keeps the id from being used again: leave it erased.
            if error_reason(error) == "CUSTOMER_ERASED":
                return "erased"
            raise
        return "ready"

    load = CustomerLoad()
    for customer, outcome in zip(customers, _in_parallel(create, customers, PARALLEL_CALLS), strict=True):
        if outcome == "erased":
            load.erased.append(customer.customer_id)
        else:
            load.ready += 1
            load.existing += outcome == "existing"
    return load


def _grant_consents(
    channel: grpc.Channel, metadata: Any, customers: Sequence[DemoCustomer]
) -> tuple[int, consent_pb.GrantConsentRequest | None]:
    """Grants every demo consent; returns how many, and the grant sent last (see _await_consent)."""
    stub = consent_grpc.ConsentServiceStub(channel)
    requests = [request for customer in customers for request in grant_requests(customer)]
    # The last grant is sent alone, after all others: once the profile service sees it,
    # it has seen them all (the change feed is in revision order).
    witnesses = [r for r in requests if BARRIER_CATEGORY in r.data_categories]
    last = witnesses[-1] if witnesses else None
    deadline = time.monotonic() + RETRY_SECONDS

    def grant(request: consent_pb.GrantConsentRequest) -> None:
        _with_retry(lambda: stub.GrantConsent(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline)

    _in_parallel(grant, [r for r in requests if r is not last], PARALLEL_CALLS)
    if last is not None:
        grant(last)
    return len(requests), last


def _await_consent(channel: grpc.Channel, metadata: Any, last: consent_pb.GrantConsentRequest) -> bool:
    """Waits until the profile service's consent cache holds the `last` grant, so that no
    event is refused for a grant it has not seen yet. A purpose-bound GetCustomer withholds
    the customer's loyalty tier (BARRIER_CATEGORY) until then. False if that never happens."""
    stub = profile_grpc.ProfileServiceStub(channel)
    request = profile_pb.GetCustomerRequest(customer_id=last.customer_id, purpose=last.purpose)
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.02
    while True:
        try:
            customer = _with_retry(
                lambda: stub.GetCustomer(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline
            ).customer
        except grpc.RpcError:
            return False  # the witness was erased or cannot be read: load without waiting
        if customer.merged_into or BARRIER_CATEGORY not in customer.withheld_data_categories:
            return True
        if time.monotonic() + delay > deadline:
            return False
        time.sleep(delay)
        delay = min(0.5, delay * 2)


@dataclass
class EventLoad:
    """What became of the demo events (per EventResultStatus name), and examples of problems."""

    statuses: Counter[str] = field(default_factory=Counter)
    # Refused for consent although the customer granted the category when the demo was
    # generated: consent withdrawn since, or the customer merged into one who did not grant it.
    refused_despite_grant: int = 0
    problems: list[str] = field(default_factory=list)
    unimplemented: bool = False
    seconds: float = 0.0


def _ingest_events(
    channel: grpc.Channel,
    metadata: Any,
    events: Sequence[DemoEvent],
    collectable: Mapping[str, frozenset[str]],
    batch_size: int = EVENT_BATCH,
) -> EventLoad:
    """Sends every event once: a refusal for consent is counted, never sent again."""
    stub = profile_grpc.ProfileServiceStub(channel)
    load = EventLoad()
    started = time.monotonic()
    deadline = started + RETRY_SECONDS

    def send(batch: Sequence[DemoEvent]) -> list[tuple[DemoEvent, profile_pb.EventResult]]:
        request = profile_pb.IngestEventsRequest(events=[event_message(event) for event in batch])
        reply = _with_retry(
            lambda: stub.IngestEvents(request, metadata=metadata, timeout=CALL_TIMEOUT), deadline
        )
        return list(zip(batch, reply.results, strict=True))

    batches = [events[start : start + batch_size] for start in range(0, len(events), batch_size)]
    try:
        outcomes = [pair for done in _in_parallel(send, batches, PARALLEL_BATCHES) for pair in done]
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            load.unimplemented = True
            return load
        raise
    for event, result in outcomes:
        status = profile_pb.EventResultStatus.Name(result.status).removeprefix("EVENT_RESULT_STATUS_")
        load.statuses[status] += 1
        if status == "REJECTED_CONSENT" and event.data_category in collectable[event.customer_id]:
            load.refused_despite_grant += 1
        if status in ("INVALID", "UNKNOWN_CUSTOMER") and len(load.problems) < 5:
            violations = "; ".join(f"{v.field}: {v.description}" for v in result.violations)
            load.problems.append(f"{event.event_id} ({event.event_type}) {status} {violations}".strip())
    load.seconds = time.monotonic() - started
    return load


def _register_device(channel: grpc.Channel, metadata: Any, data_dir: Path | None) -> str:
    """Registers the demo device; returns its id. Its token comes only in the first reply."""
    request = _device_request()
    registered = repl_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
        request, metadata=metadata, timeout=CALL_TIMEOUT
    )
    if data_dir is not None and registered.device_token:
        DeviceBook(data_dir / DEMO_DEVICES_FILE).put(
            DeviceCredentials(
                AIKO_PRINTER,
                registered.device.device_id,
                request.customer_id,
                request.kind,
                registered.device_token,
            )
        )
    return str(registered.device.device_id)


AIKO_PRINTER = "aiko-printer"  # the demo device's name in demo-devices.json (not simulated)
# The simulated demo devices: (name, device kind, slot id), one of each kind.
FLEET_KINDS = (
    ("water-filter", "water_filter", "filter"),
    ("printer", "printer", "ink"),
    ("coffee-machine", "coffee_machine", "care"),
)


def demo_fleet(data: DemoData, erased: Sequence[str] = ()) -> list[DeviceSpec]:
    """One device of each kind, of the first demo customer (but demo-aiko, whose printer
    the README drives by hand) who has one and lets it re-order: its consumable's slot,
    AUTO, priced from the catalog, delivered in 2 days."""
    items = {item.item_id: item for item in data.items}
    specs = []
    for name, kind, slot_id in FLEET_KINDS:
        for customer in data.customers:
            granted = any(grant.purpose == AUTOMATIC_ORDERING for grant in customer.consents)
            habit = next((h for h in customer.habits if h.device == kind), None)
            if customer.customer_id == DEVICE_OWNER or customer.customer_id in erased:
                continue
            if granted and habit is not None and habit.item_id in items:
                item = items[habit.item_id]
                specs.append(
                    DeviceSpec(
                        name=name,
                        customer_id=customer.customer_id,
                        kind=kind,
                        serial_number=f"DEMO-{name}-{customer.customer_id}",
                        manufacturer=item.brand or "Najimi Sim",
                        display_name=f"Demo {kind.replace('_', ' ')}",
                        slots=(
                            SlotSpec(
                                slot_id,
                                item.item_id,
                                display_name=item.title[:200],
                                unit_price_micros=item.price_micros,
                                currency_code=CURRENCY,
                                lead_time_us=2 * DAY_US,
                            ),
                        ),
                    )
                )
                break
    return specs


def register_demo_devices(
    address: str,
    token: str,
    data_dir: Path,
    data: DemoData,
    erased: Sequence[str] = (),
    printer_id: str = "",
) -> list[DeviceCredentials]:
    """Registers the demo fleet (a retry is safe); the tokens go into demo-devices.json.
    The demo device (`printer_id`) gets a new token when the file lacks its own (a data
    directory from before the file named its devices)."""

    async def register() -> list[DeviceCredentials]:
        async with grpc.aio.insecure_channel(address) as channel:
            book = DeviceBook(data_dir / DEMO_DEVICES_FILE)
            known = book.entries.get(AIKO_PRINTER)
            if printer_id and (known is None or known.device_id != printer_id):
                stub = repl_grpc.ReplenishmentServiceStub(channel)
                new_token = await rotate_token(stub, token, printer_id)
                book.put(DeviceCredentials(AIKO_PRINTER, printer_id, DEVICE_OWNER, "printer", new_token))
            return await register_devices(channel, token, demo_fleet(data, erased), book)

    return asyncio.run(register())


@dataclass
class LoadReport:
    """What one load did: the generated data and what each service made of it."""

    data: DemoData
    customers: CustomerLoad
    grants: int
    device_id: str
    events: EventLoad
    seconds: float
    already_loaded: bool = False  # found complete from an earlier start: nothing was sent

    @property
    def existing_customers(self) -> int:
        return self.customers.existing

    def customers_line(self) -> str:
        segments = Counter(c.segment for c in self.data.customers)
        line = (
            f"{self.customers.ready} customers ({', '.join(f'{n} {s}' for s, n in sorted(segments.items()))})"
        )
        erased = self.customers.erased
        if erased:
            names = ", ".join(erased[:5]) + (" …" if len(erased) > 5 else "")
            line += f"; {len(erased)} erased by a data-subject request, skipped with their data: {names}"
        return line

    def grants_line(self) -> str:
        without = sum(1 for c in self.data.customers if not c.consents)
        return f"{self.grants} consents ({without} customers gave none)"

    def catalog_line(self) -> str:
        return f"{len(self.data.items)} catalog items"

    def device_line(self) -> str:
        if self.device_id:
            return f"device {self.device_id} (its token is in demo-devices.json)"
        return f"no demo device ({DEVICE_OWNER} was erased)"

    def event_lines(self) -> list[str]:
        data, events = self.data, self.events
        if events.unimplemented:
            return [f"{len(data.events):,} events not loaded: IngestEvents is not implemented yet"]
        days = (data.end_us - data.start_us) // DAY_US
        counted = ", ".join(
            f"{n:,} {_STATUS_WORDS.get(status, status.lower())}"
            for status, n in events.statuses.most_common()
        )
        lines = [f"{events.statuses.total():,} events over {days} days: {counted} ({events.seconds:.1f} s)"]
        if events.refused_despite_grant:
            lines.append(
                f"{events.refused_despite_grant:,} of the refused events' customers had granted the "
                "category: withdrawn since, or merged into a customer who did not"
            )
        lines.extend(f"problem: {problem}" for problem in events.problems)
        return lines

    def lines(self) -> list[str]:
        """The load in a few human lines."""
        if self.already_loaded:
            data = self.data
            return [
                f"already loaded by an earlier start ({len(data.customers)} customers, "
                f"{len(data.items)} items, {len(data.events):,} events); `make reset` starts afresh"
            ]
        return [
            self.customers_line(),
            self.grants_line(),
            self.catalog_line(),
            self.device_line(),
            *self.event_lines(),
        ]


_STATUS_WORDS = {
    "ACCEPTED": "accepted",
    "DUPLICATE": "already there",
    "REJECTED_CONSENT": "refused for consent (not granted by the customer)",
    "INVALID": "invalid",
    "UNKNOWN_CUSTOMER": "for unknown customers",
}


def _already_loaded(addresses: Mapping[str, str], metadata: Any, loaded: Mapping[str, Any]) -> bool:
    """Whether every service still holds what an earlier complete load left: a customer,
    a consent change, the last catalog item and the device (one cheap call each)."""
    options = {"metadata": metadata, "timeout": CALL_TIMEOUT}

    def profile(channel: grpc.Channel) -> bool:
        stub = profile_grpc.ProfileServiceStub(channel)
        return bool(stub.ListCustomers(profile_pb.ListCustomersRequest(page_size=1), **options).customers)

    def consent(channel: grpc.Channel) -> bool:
        stub = consent_grpc.ConsentServiceStub(channel)
        return bool(
            stub.ListConsentChanges(consent_pb.ListConsentChangesRequest(page_size=1), **options).changes
        )

    def recommendation(channel: grpc.Channel) -> bool:
        stub = rec_grpc.RecommendationServiceStub(channel)
        return bool(stub.GetItem(rec_pb.GetItemRequest(item_id=loaded["last_item"]), **options).item.item_id)

    def replenishment(channel: grpc.Channel) -> bool:
        stub = repl_grpc.ReplenishmentServiceStub(channel)
        request = repl_pb.GetDeviceRequest(device_id=loaded["device_id"])
        return not loaded["device_id"] or bool(stub.GetDevice(request, **options).device.device_id)

    deadline = time.monotonic() + RETRY_SECONDS
    for name, holds in (
        ("profile", profile),
        ("consent", consent),
        ("recommendation", recommendation),
        ("replenishment", replenishment),
    ):
        with grpc.insecure_channel(addresses[f"NAJIMI_{name.upper()}_ADDRESS"]) as channel:
            try:
                if not _with_retry(lambda: holds(channel), deadline):  # noqa: B023 (called at once)
                    return False
            except grpc.RpcError:
                return False
    return True


def load_demo(
    addresses: Mapping[str, str],
    admin_token: str,
    data_dir: Path | None = None,
    customers: int = DEFAULT_CUSTOMERS,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> LoadReport:
    """Loads the demo data through the running services (see the module docstring).

    Unless `force`, a data directory whose demo-data.json records a complete load, and
    whose services still hold it, is left as it is (the report says `already_loaded`).
    `progress` is told of each step as it ends."""
    started = time.monotonic()
    say = progress or (lambda _line: None)
    metadata = (("authorization", f"Bearer {admin_token}"),)
    data = generate(demo_end_us(data_dir), customers=customers)
    loaded = _read_anchor(data_dir).get("loaded")
    if not force and isinstance(loaded, dict) and loaded.get("customers") == len(data.customers):
        if _already_loaded(addresses, metadata, loaded):
            device_id = str(loaded.get("device_id", ""))
            seconds = time.monotonic() - started
            return LoadReport(data, CustomerLoad(), 0, device_id, EventLoad(), seconds, already_loaded=True)
    report = LoadReport(data, CustomerLoad(), 0, "", EventLoad(), 0.0)
    with grpc.insecure_channel(addresses["NAJIMI_PROFILE_ADDRESS"]) as channel:
        report.customers = _create_customers(channel, metadata, data.customers)
    say(report.customers_line())
    erased = set(report.customers.erased)
    present = [c for c in data.customers if c.customer_id not in erased]
    with grpc.insecure_channel(addresses["NAJIMI_CONSENT_ADDRESS"]) as channel:
        report.grants, last_grant = _grant_consents(channel, metadata, present)
    say(report.grants_line())
    with grpc.insecure_channel(addresses["NAJIMI_RECOMMENDATION_ADDRESS"]) as channel:
        stub = rec_grpc.RecommendationServiceStub(channel)
        for request in catalog_requests(data.items):
            stub.UpsertItems(request, metadata=metadata, timeout=CALL_TIMEOUT)
    say(report.catalog_line())
    if DEVICE_OWNER not in erased:
        with grpc.insecure_channel(addresses["NAJIMI_REPLENISHMENT_ADDRESS"]) as channel:
            report.device_id = _register_device(channel, metadata, data_dir)
    say(report.device_line())
    events = [e for e in data.events if e.customer_id not in erased]
    collectable = {c.customer_id: c.collectable_categories for c in present}
    with grpc.insecure_channel(addresses["NAJIMI_PROFILE_ADDRESS"]) as channel:
        if last_grant is not None:
            _await_consent(channel, metadata, last_grant)
        report.events = event_load = _ingest_events(channel, metadata, events, collectable)
    for line in report.event_lines():
        say(line)
    report.seconds = time.monotonic() - started
    if data_dir is not None and not event_load.unimplemented:
        anchor = _read_anchor(data_dir)
        anchor["loaded"] = {
            "customers": len(data.customers),
            "last_item": data.items[-1].item_id,
            "device_id": report.device_id,
        }
        (data_dir / ANCHOR_FILE).write_text(json.dumps(anchor) + "\n")
    return report
