"""ProfileService over gRPC: protobuf in, domain calls, protobuf out — nothing else."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile import identity_store, trait_rpcs
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
from services.profile.identity import (
    IDENTITY_ID,
    PII_KINDS,
    Identifier,
    Identity,
    check_identifier,
    check_identifiers,
    normalised,
)
from services.profile.interactions import InteractionFeed
from services.profile.masking import mask_email, mask_name, mask_phone
from services.profile.merges import PII_EMAIL, PII_NAME, PII_PHONE, Conflict, MergeOutcome
from services.profile.store import ProfileStore, erased_error
from services.profile.trait_worker import TraitWorker
from services.profile.withholding import withheld_view
from shared.access_policy import PII_READERS, PURPOSE_BOUND_READERS
from shared.auth import Principal, current_principal
from shared.consent_cache import ConsentCache, consent_state_stale
from shared.db import now_micros
from shared.errors import InvalidArgument, NotFound
from shared.page_tokens import PageTokens
from shared.proto_time import micros_from, timestamp_of
from shared.settings import Settings
from shared.validation import Violations, is_valid_id, page_size_of

MAX_EVENTS_PER_CALL = 1000  # the documented batch limit of IngestEvents and StreamEvents

if TYPE_CHECKING:
    from services.profile.events import EventIngestor


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
SERVICE = pb.DESCRIPTOR.services_by_name["ProfileService"]


# -- protobuf -> domain ---------------------------------------------------------------


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
    if kind == "point_in_time":
        micros = micros_from(value.point_in_time, f"{path}.point_in_time", violations=violations)
        return Attribute("timestamp", micros or 0, category)
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
            micros_from(customer.signup_time, f"{path}.signup_time", violations=violations) or 0
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
        message.point_in_time.FromMicroseconds(int(value))
    return message


def customer_message(customer: Customer, reveal_pii: bool) -> pb.Customer:
    if customer.merged_into:
        # A merged customer is a tombstone: its id, its times and where it went.
        return pb.Customer(
            customer_id=customer.customer_id,
            create_time=timestamp_of(customer.create_time_us),
            update_time=timestamp_of(customer.update_time_us),
            merged_into=customer.merged_into,
        )
    profile = customer.profile
    masked = not reveal_pii
    return pb.Customer(
        merged_from=customer.merged_from,
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


_CONFLICT_MASKS = {PII_NAME: mask_name, PII_EMAIL: mask_email, PII_PHONE: mask_phone}


def conflict_message(conflict: Conflict, reveal_pii: bool) -> pb.AttributeConflict:
    def shown(value: str) -> str:
        if reveal_pii or not conflict.pii or not value:
            return value
        return _CONFLICT_MASKS[conflict.pii](value)

    return pb.AttributeConflict(
        field=conflict.field,
        source_value=shown(conflict.source_value),
        target_value=shown(conflict.target_value),
    )


def merge_response(outcome: MergeOutcome, reveal_pii: bool) -> pb.MergeCustomersResponse:
    return pb.MergeCustomersResponse(
        customer=customer_message(outcome.target, reveal_pii),
        moved_identity_count=outcome.moved_identities,
        moved_event_count=outcome.moved_events,
        filled_attribute_count=outcome.filled,
        conflicts=[conflict_message(conflict, reveal_pii) for conflict in outcome.conflicts],
        merge_time=timestamp_of(outcome.merged_at_us),
    )


def required_identifier(message: Any, field_name: str, violations: Violations) -> Identifier:
    """The normalised identifier in `message.<field_name>`; violations when missing or malformed."""
    if not message.HasField(field_name):
        violations.add(field_name, "is required")
        return Identifier("", "")
    identifier = identifier_of(getattr(message, field_name))
    check_identifier(violations, field_name, identifier)
    return identifier


def id_or_identifier(
    message: Any,
    oneof: str,
    id_field: str,
    pattern: re.Pattern[str],
    violations: Violations,
    missing: tuple[str, str],
) -> tuple[str | None, Identifier | None]:
    """The set side of a oneof of `id_field` (checked against `pattern`) and `identifier`:
    (id, None) or (None, identifier); the violation `missing` (field, description) when
    neither is set."""
    which = message.WhichOneof(oneof)
    if which == id_field:
        violations.require_id(id_field, getattr(message, id_field), pattern)
        return getattr(message, id_field), None
    if which == "identifier":
        return None, required_identifier(message, "identifier", violations)
    violations.add(*missing)
    return None, None


def may_read_pii(principal: Principal) -> bool:
    return str(principal) in PII_READERS


def require_purpose_if_bound(purpose: str, principal: Principal) -> None:
    """A purpose-bound reader must name the purpose it reads customers for."""
    if not purpose and str(principal) in PURPOSE_BOUND_READERS:
        raise InvalidArgument("purpose", f"is required for {principal}", reason="PURPOSE_REQUIRED")


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
        tokens = PageTokens.from_settings(settings)
        self.pages = tokens.of_service(SERVICE)
        # The recommender's feed; the ingestor wakes its watchers after each commit (app.py).
        self.interactions = InteractionFeed(store.db, consent, settings.consent_max_staleness_seconds, tokens)
        # Keeps the trait aggregates current by following the events (started in app.py).
        self.trait_worker = TraitWorker(store.db)

    async def ListInteractions(
        self, request: pb.ListInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        problems: list[InvalidArgument] = []
        size = 0
        try:
            size = page_size_of(request.page_size)
        except InvalidArgument as error:
            problems.append(error)
        try:
            # A page token is a cursor too; when set, since_cursor is ignored (the proto).
            if request.page_token:
                since = self.interactions.cursors.cursor_of(request.page_token, "page_token")
            else:
                since = self.interactions.cursors.cursor_of(request.since_cursor, "since_cursor")
        except InvalidArgument as error:
            problems.append(error)
        if len(problems) == 1:
            raise problems[0]  # with its own reason (e.g. INVALID_PAGE_TOKEN)
        if problems:
            raise InvalidArgument.of([v for problem in problems for v in problem.violations])
        page = await self.interactions.page(since, size)
        resume = self.interactions.cursors.text(page.resume)
        return pb.ListInteractionsResponse(
            entries=page.entries, next_page_token="" if page.caught_up else resume, resume_cursor=resume
        )

    async def WatchInteractions(
        self, request: pb.WatchInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchInteractionsResponse]:
        since = self.interactions.cursors.cursor_of(request.since_cursor, "since_cursor")
        async for entries, resume in self.interactions.watch(since):
            yield pb.WatchInteractionsResponse(entries=entries, resume_cursor=resume)

    async def IngestEvents(self, request: pb.IngestEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        _check_batch_size(len(request.events))
        assert self.ingestor is not None
        return pb.IngestEventsResponse(results=await self.ingestor.ingest(request.events))

    async def StreamEvents(
        self, requests: AsyncIterator[pb.StreamEventsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        assert self.ingestor is not None

        async def batches() -> AsyncIterator[Sequence[pb.Event]]:
            async for message in requests:
                _check_batch_size(len(message.events))
                yield message.events

        # Several messages are taken in at once; each answer still waits for its commit.
        async for results in self.ingestor.ingest_stream(batches()):
            yield pb.StreamEventsResponse(results=results)

    # -- timeline and traits (services/profile/trait_rpcs.py) -------------------------------

    async def ListEvents(self, request: pb.ListEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        staleness = self.settings.consent_max_staleness_seconds
        return await trait_rpcs.list_events(self.store.db, self.consent, staleness, self.pages, request)

    async def GetTraits(self, request: pb.GetTraitsRequest, context: grpc.aio.ServicerContext) -> Any:
        staleness = self.settings.consent_max_staleness_seconds
        return await trait_rpcs.get_traits(self.store.db, self.consent, staleness, request)

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
            request=request,
            customer_id=request.customer_id or new_customer_id(),
            profile=profile,
            identifiers=identifiers,
            render=render,
        )
        return pb.CreateCustomerResponse.FromString(response)

    async def GetCustomer(self, request: pb.GetCustomerRequest, context: grpc.aio.ServicerContext) -> Any:
        customer_id, purpose = request.customer_id, request.purpose
        # The usual request is decided valid without collecting violations (the hot path).
        if purpose or not is_valid_id(customer_id, CUSTOMER_ID):
            violations = Violations()
            violations.require_id("customer_id", customer_id, CUSTOMER_ID)
            if purpose:
                check_vocabulary_name(violations, "purpose", purpose)
            violations.raise_if_any()
        principal = current_principal()
        require_purpose_if_bound(purpose, principal)
        reveal_pii = may_read_pii(principal)
        if purpose:
            view = await self._view_for(purpose)
            answer = await self._customer_answer(customer_id, reveal_pii)
            return pb.GetCustomerResponse(customer=view(answer.customer))
        return await self._customer_answer(customer_id, reveal_pii)

    async def _customer_answer(self, customer_id: str, reveal_pii: bool) -> pb.GetCustomerResponse:
        """GetCustomer's answer (PII masked unless `reveal_pii`), from the cache when it has it."""
        cache = self.store.customer_cache  # masked answers only (customer_cache.py)
        if not reveal_pii:
            cached: pb.GetCustomerResponse | None = cache.get(customer_id)
            if cached is not None:
                return cached
        generation = cache.generation  # taken before the read: see CustomerCache.put
        customer = await self.store.get_customer(customer_id)
        if customer is None:
            if await self.store.is_erased(customer_id):
                raise erased_error(customer_id)
            raise NotFound(f"customer {customer_id} not found", reason="CUSTOMER_NOT_FOUND")
        response = pb.GetCustomerResponse(customer=customer_message(customer, reveal_pii))
        if not reveal_pii:
            cache.put(customer_id, response, generation)
        return response

    async def _view_for(self, purpose: str) -> Callable[[pb.Customer], pb.Customer]:
        """How a customer read for `purpose` looks (withholding.py), by the consent cache:
        UNAVAILABLE when the consent state is too old (fail closed), INVALID_ARGUMENT when
        the purpose is not in the consent vocabulary."""
        consent = self.consent
        if consent.staleness > self.settings.consent_max_staleness_seconds:
            raise consent_state_stale()
        if not await consent.knows_purpose(purpose):
            raise InvalidArgument(
                "purpose",
                "is not a purpose of the consent vocabulary (ListPurposes)",
                reason="UNKNOWN_PURPOSE",
            )

        def view(customer: pb.Customer) -> pb.Customer:
            if customer.merged_into:
                return customer  # a tombstone holds no data of any category
            return withheld_view(
                customer, lambda held: consent.check(customer.customer_id, purpose, held).allowed_categories
            )

        return view

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
            micros_from(request.min_update_time, "min_update_time", violations=violations)
            if request.HasField("min_update_time")
            else None
        )
        if request.purpose:
            check_vocabulary_name(violations, "purpose", request.purpose)
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        principal = current_principal()
        require_purpose_if_bound(request.purpose, principal)
        view = await self._view_for(request.purpose) if request.purpose else None
        filters = {
            "min_update_time": updated_after,
            "show_merged": request.show_merged,
            "purpose": request.purpose,
        }
        position = self.pages.read("ListCustomers", request.page_token, filters, (str,))
        after = str(position[0]) if position else ""
        found = await self.store.list_customers(after, updated_after, size, request.show_merged)
        reveal = may_read_pii(principal)
        next_token = (
            self.pages.issue("ListCustomers", filters, (found[-1].customer_id,)) if len(found) == size else ""
        )
        page = [customer_message(c, reveal) for c in found]
        return pb.ListCustomersResponse(
            customers=page if view is None else [view(c) for c in page], next_page_token=next_token
        )

    # -- identities and merges (services/profile/identity_store.py, merges.py) ---------

    async def LinkIdentity(self, request: pb.LinkIdentityRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
        identifier = required_identifier(request, "identifier", violations)
        violations.raise_if_any()
        principal = current_principal()
        reveal = may_read_pii(principal)

        def render(identity: Identity) -> bytes:
            return pb.LinkIdentityResponse(identity=identity_message(identity, reveal)).SerializeToString()

        response = await identity_store.link_identity(
            self.store,
            principal=str(principal),
            request=request,
            customer_id=request.customer_id,
            identifier=identifier,
            verified=request.verified,
            render=render,
        )
        return pb.LinkIdentityResponse.FromString(response)

    async def UnlinkIdentity(
        self, request: pb.UnlinkIdentityRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
        identity_id, identifier = id_or_identifier(
            request,
            "identity",
            "identity_id",
            IDENTITY_ID,
            violations,
            ("identity_id", "one of identity_id or identifier is required"),
        )
        violations.raise_if_any()
        removed = await identity_store.unlink_identity(
            self.store, request.customer_id, identity_id, identifier
        )
        return pb.UnlinkIdentityResponse(
            identity=identity_message(removed, may_read_pii(current_principal()))
        )

    async def ListIdentities(
        self, request: pb.ListIdentitiesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id, CUSTOMER_ID)
        kinds = set()
        for index, value in enumerate(request.types):
            if value in IDENTIFIER_KINDS:
                kinds.add(IDENTIFIER_KINDS[value])
            else:
                violations.add(
                    f"types[{index}]", "must be one of the IdentifierType values other than UNSPECIFIED"
                )
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        filters = {"customer_id": request.customer_id, "types": sorted(kinds)}
        position = self.pages.read("ListIdentities", request.page_token, filters, (int, str))
        after = (int(position[0]), str(position[1])) if position else None
        found = await identity_store.list_identities(
            self.store, request.customer_id, sorted(kinds), after, size
        )
        next_token = (
            self.pages.issue("ListIdentities", filters, (found[-1].link_time_us, found[-1].identity_id))
            if len(found) == size
            else ""
        )
        reveal = may_read_pii(current_principal())
        return pb.ListIdentitiesResponse(
            identities=[identity_message(identity, reveal) for identity in found], next_page_token=next_token
        )

    async def ResolveIdentity(
        self, request: pb.ResolveIdentityRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        customer_id, identifier = id_or_identifier(
            request,
            "subject",
            "customer_id",
            CUSTOMER_ID,
            violations,
            ("identifier", "one of identifier or customer_id is required"),
        )
        violations.raise_if_any()
        resolution = await identity_store.resolve(self.store, customer_id, identifier)
        response = pb.ResolveIdentityResponse(
            customer_id=resolution.customer_id, merged_customer_ids=resolution.merged_customer_ids
        )
        if resolution.identity is not None:
            response.identity.CopyFrom(
                identity_message(resolution.identity, may_read_pii(current_principal()))
            )
        return response

    async def MergeCustomers(
        self, request: pb.MergeCustomersRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        violations.require_id("source_customer_id", request.source_customer_id, CUSTOMER_ID)
        violations.require_id("target_customer_id", request.target_customer_id, CUSTOMER_ID)
        violations.raise_if_any()
        if request.source_customer_id == request.target_customer_id:
            raise InvalidArgument(
                "target_customer_id",
                "must differ from source_customer_id: a customer cannot be merged into itself",
                reason="MERGE_INTO_ITSELF",
            )
        principal = current_principal()
        reveal = may_read_pii(principal)
        response = await identity_store.merge_customers(
            self.store,
            principal=str(principal),
            request=request,
            source_id=request.source_customer_id,
            target_id=request.target_customer_id,
            render=lambda outcome: merge_response(outcome, reveal).SerializeToString(),
        )
        self.interactions.poke()  # the merge notice is in the interaction feed
        return pb.MergeCustomersResponse.FromString(response)
