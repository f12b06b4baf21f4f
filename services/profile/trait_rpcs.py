"""ListEvents and GetTraits: request checks, the consent gate and protobuf rendering.

ProfileServicer (servicer.py) delegates both RPCs here. Consent is decided from the
local consent cache and fails closed: when it is staler than
NAJIMI_CONSENT_MAX_STALENESS_SECONDS both RPCs answer UNAVAILABLE (reason
CONSENT_STATE_STALE) rather than show data the customer may have withdrawn.

- ListEvents leaves out events whose data category the customer no longer consents to
  for any purpose (the same test as collection: ConsentIndex.collection_allowed).
- GetTraits uses only the data categories the customer grants to personalize.profiling;
  without a valid profiling consent it returns no trait at all, listing every trait
  input category it holds events of in data_categories_withheld.
"""

from __future__ import annotations

from dataclasses import replace

from najimi.profile.v1 import profile_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.profile import trait_store, traits
from services.profile.customers import CUSTOMER_ID
from services.profile.trait_store import EventQuery
from shared.consent_cache import ConsentCache, consent_state_stale
from shared.db import Database, now_micros
from shared.page_tokens import ServiceTokens
from shared.proto_time import duration_micros_from, duration_of_micros, micros_from, timestamp_of
from shared.validation import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Violations

# The data categories events can belong to (the proto's EventType comments).
EVENT_DATA_CATEGORIES = (
    "user.behavior.browsing_history",
    "user.behavior.search_history",
    "user.behavior.purchase_history",
    "user.behavior.store_visits",
    "user.device.telemetry",
)
KNOWN_EVENT_TYPES = frozenset(pb.EventType.values()) - {pb.EVENT_TYPE_UNSPECIFIED}
KNOWN_CHANNELS = frozenset(pb.Channel.values()) - {pb.CHANNEL_UNSPECIFIED}


def _limit_of(value: int, default: int, maximum: int, violations: Violations, path: str) -> int:
    if value == 0:
        return default
    violations.require_range(path, value, 1, maximum, f"must be between 0 and {maximum}")
    return value


# -- ListEvents ------------------------------------------------------------------------------


def event_query_of(request: pb.ListEventsRequest, pages: ServiceTokens) -> EventQuery:
    """The page of the timeline `request` asks for; INVALID_ARGUMENT naming each bad field."""
    violations = Violations()
    violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
    for index, event_type in enumerate(request.event_types):
        if event_type not in KNOWN_EVENT_TYPES:
            violations.add(f"event_types[{index}]", "must be a known event type")
    for index, channel in enumerate(request.channels):
        if channel not in KNOWN_CHANNELS:
            violations.add(f"channels[{index}]", "must be a known channel")
    start = (
        micros_from(request.start_time, "start_time", violations=violations)
        if request.HasField("start_time")
        else None
    )
    end = (
        micros_from(request.end_time, "end_time", violations=violations)
        if request.HasField("end_time")
        else None
    )
    if start is not None and end is not None and end <= start:
        violations.add("end_time", "must be after start_time")
    size = _limit_of(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, violations, "page_size")
    violations.raise_if_any()

    event_types = tuple(sorted({int(t) for t in request.event_types}))
    channels = tuple(sorted({int(c) for c in request.channels}))
    filters: dict[str, object] = {
        "customer_id": request.customer_id,
        "event_types": list(event_types),
        "channels": list(channels),
        "start": start,
        "end": end,
    }
    position = pages.read("ListEvents", request.page_token, filters, (int, int))
    after = (int(position[0]), int(position[1])) if position else None
    return EventQuery(
        customer_id=request.customer_id,
        event_types=event_types,
        channels=channels,
        start_us=start,
        end_us=end,
        after=after,
        limit=size,
        filters=filters,
    )


def visible_event_categories(consent: ConsentCache, customer_id: str, max_staleness: float) -> list[str]:
    """The event data categories the customer still consents to for some purpose."""
    if consent.staleness > max_staleness:
        raise consent_state_stale()
    now = now_micros()
    return [c for c in EVENT_DATA_CATEGORIES if consent.index.collection_allowed(customer_id, c, now)]


async def list_events(
    database: Database,
    consent: ConsentCache,
    max_staleness: float,
    pages: ServiceTokens,
    request: pb.ListEventsRequest,
) -> pb.ListEventsResponse:
    query = event_query_of(request, pages)
    await database.read(lambda connection: trait_store.require_live_customer(connection, query.customer_id))
    categories = visible_event_categories(consent, query.customer_id, max_staleness)
    # One more than the page: whether a next page exists, without an empty last page.
    wider = replace(query, limit=query.limit + 1)
    found = await database.read(lambda connection: trait_store.list_events(connection, wider, categories))
    page = found[: query.limit]
    token = ""
    if len(found) > query.limit:
        last = page[-1]
        token = pages.issue("ListEvents", query.filters, (last.occurred_at_us, last.seq))
    return pb.ListEventsResponse(events=[entry.event for entry in page], next_page_token=token)


# -- GetTraits ---------------------------------------------------------------------------------


def traits_message(found: traits.Traits) -> pb.Traits:
    message = pb.Traits(
        customer_id=found.customer_id,
        compute_time=timestamp_of(found.computed_at_us),
        data_categories_used=found.data_categories_used,
        data_categories_withheld=found.data_categories_withheld,
    )
    if found.recency is not None:
        message.recency.CopyFrom(
            pb.RecencyTrait(
                last_purchase_time=timestamp_of(found.recency.last_purchase_us),
                days_since_last_purchase=found.recency.days_since,
                explanation=found.recency.explanation,
            )
        )
    if found.frequency is not None:
        message.frequency.CopyFrom(
            pb.FrequencyTrait(
                purchase_count=found.frequency.purchase_count,
                window=duration_of_micros(found.frequency.window_us),
                explanation=found.frequency.explanation,
            )
        )
    if found.monetary is not None:
        message.monetary.CopyFrom(
            pb.MonetaryTrait(
                total_micros=found.monetary.total_micros,
                currency_code=found.monetary.currency_code,
                window=duration_of_micros(found.monetary.window_us),
                explanation=found.monetary.explanation,
            )
        )
    message.category_affinities.extend(
        pb.CategoryAffinity(
            category_path=list(a.category_path),
            score=a.score,
            half_life=duration_of_micros(a.half_life_us),
            explanation=a.explanation,
        )
        for a in found.affinities
    )
    message.item_cadences.extend(
        pb.ItemCadence(
            item_id=c.item_id,
            mean_interval=duration_of_micros(c.mean_interval_us),
            interval_stddev=duration_of_micros(c.interval_stddev_us),
            purchase_count=c.purchase_count,
            last_purchase_time=timestamp_of(c.last_purchase_us),
            next_expected_time=timestamp_of(c.next_expected_us),
            explanation=c.explanation,
        )
        for c in found.cadences
    )
    if found.churn is not None:
        message.churn_risk.CopyFrom(
            pb.ChurnRisk(score=found.churn.score, explanation=found.churn.explanation)
        )
    return message


async def get_traits(
    database: Database, consent: ConsentCache, max_staleness: float, request: pb.GetTraitsRequest
) -> pb.GetTraitsResponse:
    violations = Violations()
    violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
    window = traits.DEFAULT_WINDOW_US
    if request.HasField("window"):
        window = (
            duration_micros_from(
                request.window,
                "window",
                at_least=traits.MIN_WINDOW_US,
                at_most=traits.MAX_WINDOW_US,
                bounds="must be between 1 and 730 days",
                violations=violations,
            )
            or traits.DEFAULT_WINDOW_US
        )
    max_categories = _limit_of(
        request.max_categories, traits.DEFAULT_MAX_CATEGORIES, traits.MAX_LIMIT, violations, "max_categories"
    )
    max_items = _limit_of(
        request.max_items, traits.DEFAULT_MAX_ITEMS, traits.MAX_LIMIT, violations, "max_items"
    )
    violations.raise_if_any()

    customer_id = request.customer_id

    def read(connection: Connection) -> traits.CustomerAggregates:
        trait_store.require_live_customer(connection, customer_id)
        return trait_store.load_aggregates(connection, customer_id)

    aggregates = await database.read(read)
    decision = consent.check_fresh(customer_id, traits.PROFILING, (), max_staleness)
    if decision is None:
        raise consent_state_stale()
    # Without a valid consent to profiling, nothing personal is computed.
    usable = decision.allowed_categories if decision.allowed else ()
    computed = traits.compute_traits(
        customer_id,
        aggregates,
        now_micros(),
        usable,
        window_us=window,
        max_categories=max_categories,
        max_items=max_items,
    )
    return pb.GetTraitsResponse(traits=traits_message(computed))
