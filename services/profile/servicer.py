"""ProfileService over gRPC: protobuf in, domain calls, protobuf out — nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.customers import (
    CUSTOMER_ID,
    Attribute,
    Customer,
    Profile,
    age_range,
    check_profile,
    check_update_mask,
    check_vocabulary_name,
    current_year,
    new_customer_id,
    updated_profile,
)
from services.profile.identity import PII_KINDS, Identifier, Identity, check_identifiers, normalised
from services.profile.interactions import InteractionFeed, cursor_of
from services.profile.masking import mask_email, mask_name, mask_phone
from services.profile.store import ProfileStore, erased_error
from shared.auth import AccessRule, Principal, allow, current_principal
from shared.consent_cache import ConsentCache
from shared.db import now_micros
from shared.errors import InvalidArgument, NotFound, Unimplemented
from shared.proto_time import timestamp_of
from shared.settings import Settings
from shared.validation import Violations, decode_page_token, encode_page_token, page_size_of

MAX_EVENTS_PER_CALL = 1000  # the documented batch limit of IngestEvents and StreamEvents

if TYPE_CHECKING:
    from services.profile.events import EventIngestor

# Who may call each RPC (the proto's "Callers:" lines); anything absent is refused.
_WRITERS = allow("service:storefront", "service:store", "service:crm")
_READERS = allow("service:storefront", "service:store", "service:crm", "service:recommendation")
_RECOMMENDER = allow("service:recommendation")
ACCESS: dict[str, AccessRule] = {
    "CreateCustomer": _WRITERS,
    "GetCustomer": _READERS,
    "UpdateCustomer": _WRITERS,
    "ListCustomers": _READERS,
    "LinkIdentity": _WRITERS,
    "UnlinkIdentity": _WRITERS,
    "ListIdentities": _WRITERS,
    "ResolveIdentity": _READERS,
    "MergeCustomers": _WRITERS,
    "IngestEvents": _WRITERS,
    "StreamEvents": _WRITERS,
    "ListEvents": _WRITERS,
    "GetTraits": _READERS,
    "ListInteractions": _RECOMMENDER,
    "WatchInteractions": _RECOMMENDER,
}

# Principals that see PII unmasked (the proto: "by default only admin").
PII_READERS = frozenset({"admin"})
# Principals that must bind every customer read to a purpose (GetCustomerRequest.purpose).
PURPOSE_BOUND_READERS = frozenset({"service:recommendation"})

GENDER_NAMES = {
    pb.GENDER_UNSPECIFIED: "",
    pb.GENDER_FEMALE: "female",
    pb.GENDER_MALE: "male",
    pb.GENDER_NON_BINARY: "non_binary",
    pb.GENDER_UNDISCLOSED: "undisclosed",
}
GENDER_VALUES = {name: value for value, name in GENDER_NAMES.items()}
IDENTIFIER_KINDS = {
    pb.IDENTIFIER_TYPE_EMAIL: "email",
    pb.IDENTIFIER_TYPE_PHONE: "phone",
    pb.IDENTIFIER_TYPE_LOYALTY_CARD: "loyalty_card",
    pb.IDENTIFIER_TYPE_DEVICE_ID: "device_id",
    pb.IDENTIFIER_TYPE_COOKIE_ID: "cookie_id",
    pb.IDENTIFIER_TYPE_EXTERNAL_ID: "external_id",
}
IDENTIFIER_TYPES = {kind: value for value, kind in IDENTIFIER_KINDS.items()}

# The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


# -- protobuf -> domain ---------------------------------------------------------------


def micros_of(stamp: timestamp_pb2.Timestamp, violations: Violations, path: str) -> int:
    """Microseconds of a timestamp (finer digits are dropped); a violation when it is not valid."""
    if not (_MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
        violations.add(path, "is not a valid timestamp")
        return 0
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def attribute_of(value: pb.AttributeValue, violations: Violations, path: str) -> Attribute:
    kind = value.WhichOneof("value")
    category = value.data_category
    if kind == "string_value":
        return Attribute("string", value.string_value, category)
    if kind == "int_value":
        return Attribute("int", value.int_value, category)
    if kind == "double_value":
        return Attribute("double", value.double_value, category)
    if kind == "bool_value":
        return Attribute("bool", value.bool_value, category)
    if kind == "timestamp_value":
        return Attribute(
            "timestamp", micros_of(value.timestamp_value, violations, f"{path}.timestamp_value"), category
        )
    return Attribute("", "", category)  # no value set: the domain rules report it


def profile_of(customer: pb.Customer, violations: Violations, path: str) -> Profile:
    """The writable fields of `customer`; output-only fields are ignored, as the proto says."""
    return Profile(
        display_name=customer.display_name,
        email=customer.email,
        phone=customer.phone,
        birth_year=customer.birth_year if customer.HasField("birth_year") else None,
        gender=GENDER_NAMES.get(customer.gender, f"unknown:{customer.gender}"),
        region=customer.region,
        language_code=customer.language_code,
        signup_time_us=(
            micros_of(customer.signup_time, violations, f"{path}.signup_time")
            if customer.HasField("signup_time")
            else None
        ),
        attributes={
            key: attribute_of(value, violations, f"{path}.attributes.{key[:64]}")
            for key, value in customer.attributes.items()
        },
    )


def identifier_of(identifier: pb.Identifier) -> Identifier:
    return normalised(
        Identifier(IDENTIFIER_KINDS.get(identifier.type, ""), identifier.value, identifier.issuer)
    )


def _check_batch_size(count: int) -> None:
    if not 1 <= count <= MAX_EVENTS_PER_CALL:
        raise InvalidArgument("events", f"must hold 1 to {MAX_EVENTS_PER_CALL} events, not {count}")


# -- domain -> protobuf ---------------------------------------------------------------


def attribute_message(attribute: Attribute) -> pb.AttributeValue:
    message = pb.AttributeValue(data_category=attribute.data_category)
    value = attribute.value
    if attribute.kind == "string":
        message.string_value = str(value)
    elif attribute.kind == "int":
        message.int_value = int(value)
    elif attribute.kind == "double":
        message.double_value = float(value)
    elif attribute.kind == "bool":
        message.bool_value = bool(value)
    elif attribute.kind == "timestamp":
        message.timestamp_value.FromMicroseconds(int(value))
    return message


def customer_message(customer: Customer, reveal_pii: bool) -> pb.Customer:
    profile = customer.profile
    masked = not reveal_pii
    return pb.Customer(
        customer_id=customer.customer_id,
        display_name=mask_name(profile.display_name) if masked else profile.display_name,
        email=mask_email(profile.email) if masked and profile.email else profile.email,
        phone=mask_phone(profile.phone) if masked else profile.phone,
        # birth_year is input only: responses carry the age band instead.
        age_range=age_range(profile.birth_year, current_year()),
        gender=GENDER_VALUES.get(profile.gender, pb.GENDER_UNSPECIFIED),
        region=profile.region,
        language_code=profile.language_code,
        signup_time=timestamp_of(profile.signup_time_us),
        attributes={key: attribute_message(a) for key, a in profile.attributes.items()},
        create_time=timestamp_of(customer.create_time_us),
        update_time=timestamp_of(customer.update_time_us),
        pii_masked=masked,
        etag=customer.etag,
    )


def identity_message(identity: Identity, reveal_pii: bool) -> pb.Identity:
    identifier = identity.identifier
    value = identifier.value
    if not reveal_pii and identifier.kind in PII_KINDS:
        value = mask_email(value) if identifier.kind == "email" else mask_phone(value)
    return pb.Identity(
        identity_id=identity.identity_id,
        customer_id=identity.customer_id,
        identifier=pb.Identifier(
            type=IDENTIFIER_TYPES[identifier.kind], value=value, issuer=identifier.issuer
        ),
        verified=identity.verified,
        link_time=timestamp_of(identity.link_time_us),
        linked_by=identity.linked_by,
    )


def may_read_pii(principal: Principal) -> bool:
    return str(principal) in PII_READERS


def require_supported_purpose(purpose: str, principal: Principal) -> None:
    """A purpose-bound reader must name a purpose; purpose-bound reads are not served yet."""
    if not purpose and str(principal) in PURPOSE_BOUND_READERS:
        raise InvalidArgument("purpose", f"is required for {principal}", reason="PURPOSE_REQUIRED")
    if purpose:
        # Purpose-bound reads need the customer's consent state (the consent cache).
        raise Unimplemented("reading customers for a purpose is not implemented yet")


class ProfileServicer(pb_grpc.ProfileServiceServicer):
    def __init__(
        self,
        store: ProfileStore,
        consent: ConsentCache,
        settings: Settings,
        ingestor: EventIngestor | None = None,
    ):
        self.ingestor = ingestor  # events: checked, resolved, consented, committed once
        self.store = store
        self.consent = consent  # the consent state every consent-dependent RPC obeys
        self.settings = settings
        # The recommender's feed; the ingestor wakes its watchers after each commit (app.py).
        self.interactions = InteractionFeed(store.db, consent, settings.consent_max_staleness_seconds)

    async def ListInteractions(
        self, request: pb.ListInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        size = 0
        try:
            size = page_size_of(request.page_size)
        except InvalidArgument as error:
            violations.found += error.violations
        try:
            # A page token is a cursor too; when set, since_cursor is ignored (the proto).
            if request.page_token:
                since = cursor_of(request.page_token, "page_token")
            else:
                since = cursor_of(request.since_cursor, "since_cursor")
        except InvalidArgument as error:
            violations.found += error.violations
        violations.raise_if_any()
        page = await self.interactions.page(since, size)
        resume = page.resume.encode()
        return pb.ListInteractionsResponse(
            entries=page.entries, next_page_token="" if page.caught_up else resume, resume_cursor=resume
        )

    async def WatchInteractions(
        self, request: pb.WatchInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchInteractionsResponse]:
        since = cursor_of(request.since_cursor, "since_cursor")
        async for entries, resume in self.interactions.watch(since):
            yield pb.WatchInteractionsResponse(entries=entries, resume_cursor=resume.encode())

    async def IngestEvents(self, request: pb.IngestEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        _check_batch_size(len(request.events))
        assert self.ingestor is not None
        return pb.IngestEventsResponse(results=await self.ingestor.ingest(request.events))

    async def StreamEvents(
        self, requests: AsyncIterator[pb.StreamEventsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        assert self.ingestor is not None
        async for message in requests:
            _check_batch_size(len(message.events))
            yield pb.StreamEventsResponse(results=await self.ingestor.ingest(message.events))

    async def CreateCustomer(
        self, request: pb.CreateCustomerRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        if request.customer_id:
            violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
        profile = profile_of(request.customer, violations, "customer")
        check_profile(violations, "customer", profile, now_micros())
        identifiers = [identifier_of(identifier) for identifier in request.identities]
        check_identifiers(violations, "identities", identifiers)
        violations.raise_if_any()

        principal = current_principal()
        reveal = may_read_pii(principal)

        def render(customer: Customer, identities: list[Identity]) -> bytes:
            return pb.CreateCustomerResponse(
                customer=customer_message(customer, reveal),
                identities=[identity_message(identity, reveal) for identity in identities],
            ).SerializeToString()

        response = await self.store.create_customer(
            principal=str(principal),
            request_id=request.request_id,
            customer_id=request.customer_id or new_customer_id(),
            profile=profile,
            identifiers=identifiers,
            render=render,
        )
        return pb.CreateCustomerResponse.FromString(response)

    async def GetCustomer(self, request: pb.GetCustomerRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
        if request.purpose:
            check_vocabulary_name(violations, "purpose", request.purpose)
        violations.raise_if_any()
        principal = current_principal()
        require_supported_purpose(request.purpose, principal)
        customer = await self.store.get_customer(request.customer_id)
        if customer is None:
            if await self.store.is_erased(request.customer_id):
                raise erased_error(request.customer_id)
            raise NotFound(f"customer {request.customer_id} not found", reason="CUSTOMER_NOT_FOUND")
        return pb.GetCustomerResponse(customer=customer_message(customer, may_read_pii(principal)))

    async def UpdateCustomer(
        self, request: pb.UpdateCustomerRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        customer_id = request.customer.customer_id
        violations.require_id("customer.customer_id", customer_id, CUSTOMER_ID)
        mask = list(request.update_mask.paths)
        mask_problems = len(violations.found)
        check_update_mask(violations, "update_mask", mask)
        mask_is_valid = len(violations.found) == mask_problems
        given = profile_of(request.customer, violations, "customer")
        if mask_is_valid:
            # Only the named fields are checked: a whole profile read back (masked) with a
            # narrow mask is fine; the fields it does not name keep their stored values.
            now = now_micros()
            check_profile(violations, "customer", updated_profile(Profile(), given, mask, now), now)
        violations.raise_if_any()
        updated = await self.store.update_customer(customer_id, given, mask, request.customer.etag)
        return pb.UpdateCustomerResponse(
            customer=customer_message(updated, may_read_pii(current_principal()))
        )

    async def ListCustomers(self, request: pb.ListCustomersRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        updated_after = (
            micros_of(request.updated_after, violations, "updated_after")
            if request.HasField("updated_after")
            else None
        )
        if request.purpose:
            check_vocabulary_name(violations, "purpose", request.purpose)
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        principal = current_principal()
        require_supported_purpose(request.purpose, principal)
        # The filters travel in the token, so a token cannot be replayed with other filters.
        filters = {
            "updated_after": updated_after,
            "show_merged": request.show_merged,
            "purpose": request.purpose,
        }
        position = decode_page_token(request.page_token)
        if position and position.get("filters") != filters:
            raise InvalidArgument("page_token", "was issued for other filters; send the first page's filters")
        after = str(position.get("after", ""))
        found = await self.store.list_customers(after, updated_after, size)
        reveal = may_read_pii(principal)
        next_token = (
            encode_page_token({"after": found[-1].customer_id, "filters": filters})
            if len(found) == size
            else ""
        )
        return pb.ListCustomersResponse(
            customers=[customer_message(c, reveal) for c in found], next_page_token=next_token
        )
