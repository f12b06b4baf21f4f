"""Identities (link, unlink, list, resolve) and customer merges over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.store import event_head, events, identities
from shared.db import Database, now_micros
from tests.conftest import error_reason, field_violations, rpc_error
from tests.integration.test_consent_decisions import grant

EMAIL = pb.IDENTIFIER_TYPE_EMAIL
PHONE = pb.IDENTIFIER_TYPE_PHONE
CARD = pb.IDENTIFIER_TYPE_LOYALTY_CARD
DEVICE = pb.IDENTIFIER_TYPE_DEVICE_ID
COOKIE = pb.IDENTIFIER_TYPE_COOKIE_ID
EXTERNAL = pb.IDENTIFIER_TYPE_EXTERNAL_ID
BROWSING = "user.behavior.browsing_history"
PURCHASES = "user.behavior.purchase_history"


def ident(kind: int, value: str, issuer: str = "") -> pb.Identifier:
    return pb.Identifier(type=kind, value=value, issuer=issuer)


def error_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


class Profile:
    """A started profile service with its stubs and the callers the tests use."""

    def __init__(self, service):
        self.service = service
        self.stub = pb_grpc.ProfileServiceStub(service.channel)
        self.data_subject = privacy_grpc.DataSubjectServiceStub(service.channel)
        self.admin = service.auth("admin")
        self.crm = service.auth("service:crm")

    async def create(
        self, customer_id: str, customer: pb.Customer | None = None, identifiers=(), request_id: str = ""
    ) -> pb.CreateCustomerResponse:
        return await self.stub.CreateCustomer(
            pb.CreateCustomerRequest(
                request_id=request_id or f"create-{customer_id}",
                customer_id=customer_id,
                customer=customer or pb.Customer(),
                identities=list(identifiers),
            ),
            metadata=self.admin,
        )

    async def link(
        self, customer_id: str, identifier: pb.Identifier, request_id: str, metadata=None, verified=False
    ) -> pb.Identity:
        response = await self.stub.LinkIdentity(
            pb.LinkIdentityRequest(
                request_id=request_id, customer_id=customer_id, identifier=identifier, verified=verified
            ),
            metadata=metadata or self.admin,
        )
        return response.identity

    async def resolve(self, metadata=None, **subject) -> pb.ResolveIdentityResponse:
        return await self.stub.ResolveIdentity(
            pb.ResolveIdentityRequest(**subject), metadata=metadata or self.admin
        )

    async def merge(self, source: str, target: str, request_id: str, metadata=None):
        return await self.stub.MergeCustomers(
            pb.MergeCustomersRequest(
                request_id=request_id, source_customer_id=source, target_customer_id=target
            ),
            metadata=metadata or self.admin,
        )

    async def get(self, customer_id: str) -> pb.Customer:
        response = await self.stub.GetCustomer(
            pb.GetCustomerRequest(customer_id=customer_id), metadata=self.admin
        )
        return response.customer

    async def all_identities(self, customer_id: str, page_size: int = 0, types=()) -> list[pb.Identity]:
        found, token = [], ""
        while True:
            page = await self.stub.ListIdentities(
                pb.ListIdentitiesRequest(
                    customer_id=customer_id, page_size=page_size, page_token=token, types=list(types)
                ),
                metadata=self.admin,
            )
            found.extend(page.identities)
            token = page.next_page_token
            if not token:
                return found


async def _profile(start_service, database_url=None) -> Profile:
    return Profile(await start_service("profile", database_url))


def _read_tables(database_url: str, *names: str) -> dict[str, list[dict[str, object]]]:
    database = Database(database_url, "profile")
    try:
        return database.transaction(
            lambda c: {
                name: [dict(row._mapping) for row in c.execute(sa.text(f"SELECT * FROM {name}"))]  # noqa: S608
                for name in names
            }
        )
    finally:
        database.close()


async def _insert_events(database_url: str, customer_id: str, count: int) -> list[bytes]:
    """Stores `count` events of the customer straight into the events table, as ingestion
    does (seq from event_head); returns their payloads."""
    database = Database(database_url, "profile")
    now = now_micros()
    payloads = []
    rows = []
    for index in range(count):
        event = pb.Event(
            event_id=f"{customer_id}-event-{index}",
            customer_id=customer_id,
            channel=pb.CHANNEL_WEB,
            event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
            occur_time=timestamp_pb2.Timestamp(seconds=now // 1_000_000 - 3600 + index),
            items=[pb.EventItem(item_id=f"sku-{index}", category_path=["food", "coffee"])],
            resolved_customer_id=customer_id,
            data_category=BROWSING,
            receive_time=timestamp_pb2.Timestamp(seconds=now // 1_000_000),
        )
        payloads.append(event.SerializeToString())
        rows.append(
            {
                "event_id": event.event_id,
                "customer_id": customer_id,
                "event_type": event.event_type,
                "channel": event.channel,
                "data_category": BROWSING,
                "occurred_at_us": event.occur_time.ToMicroseconds(),
                "received_at_us": now,
                "value_micros": 0,
                "currency_code": "",
                "payload": payloads[-1],
            }
        )

    def write(connection):
        connection.execute(
            event_head.update().where(event_head.c.id == 1).values(seq=event_head.c.seq + count)
        )
        last = connection.execute(sa.select(event_head.c.seq)).scalar_one()
        for offset, row in enumerate(rows):
            row["seq"] = last - count + 1 + offset
        connection.execute(events.insert(), rows)

    try:
        await database.write(write)
    finally:
        database.close()
    return payloads


# -- identities ------------------------------------------------------------------------


async def test_link_resolve_list_and_unlink(start_service, database_url):
    profile = await _profile(start_service, database_url)
    created = await profile.create("cus-1", identifiers=[ident(EMAIL, "Hana@Example.com")])
    await profile.create("cus-2")
    crm = profile.crm

    card = await profile.link("cus-1", ident(CARD, "4000-1234", "najimi-card"), "link-1", crm, verified=True)
    assert card.identity_id.startswith("idn_") and card.customer_id == "cus-1"
    assert card.identifier == ident(CARD, "4000-1234", "najimi-card")
    assert card.verified and card.linked_by == "service:crm" and card.link_time.seconds > 1_700_000_000
    # A retry returns the first result; another request linking the same identifier to the
    # same customer returns the existing identity.
    retried = await profile.link(
        "cus-1", ident(CARD, "4000-1234", "najimi-card"), "link-1", crm, verified=True
    )
    assert retried == card
    again = await profile.link("cus-1", ident(CARD, "4000-1234", "najimi-card"), "link-2", crm)
    assert again.identity_id == card.identity_id
    # The same value from another issuer is another identifier.
    other_card = await profile.link("cus-1", ident(CARD, "4000-1234", "other-card"), "link-3", crm)
    assert other_card.identity_id != card.identity_id

    # Linked to another customer: ALREADY_EXISTS naming that customer; nothing changes.
    error = await rpc_error(profile.link("cus-2", ident(CARD, "4000-1234", "najimi-card"), "link-4", crm))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error) == "IDENTITY_LINKED_ELSEWHERE"
    assert error_metadata(error)["customer_id"] == "cus-1"
    error = await rpc_error(profile.link("cus-2", ident(EMAIL, " HANA@example.COM "), "link-5", crm))
    assert error_reason(error) == "IDENTITY_LINKED_ELSEWHERE"

    # E-mail and phone are masked for callers that may not read PII; admin sees them.
    phone = await profile.link("cus-1", ident(PHONE, "+81312345678"), "link-6", crm)
    assert phone.identifier.value == "+81*******78"
    resolved = await profile.resolve(identifier=ident(EMAIL, "  hana@EXAMPLE.com"), metadata=crm)
    assert resolved.customer_id == "cus-1" and not resolved.merged_customer_ids
    assert resolved.identity.identifier.value == "h***@example.com"
    assert resolved.identity.identity_id == created.identities[0].identity_id
    resolved = await profile.resolve(identifier=ident(PHONE, "+81312345678"))
    assert resolved.identity.identifier.value == "+81312345678"
    by_id = await profile.resolve(customer_id="cus-1", metadata=crm)
    assert by_id.customer_id == "cus-1" and not by_id.HasField("identity")

    listed = await profile.all_identities("cus-1")
    assert [i.identity_id for i in listed] == [
        created.identities[0].identity_id,
        card.identity_id,
        other_card.identity_id,
        phone.identity_id,
    ]
    assert listed[0].identifier.value == "hana@example.com"  # admin: unmasked, normalised
    assert [i.identity_id for i in await profile.all_identities("cus-2")] == []

    # Unlink by id and by identifier; then the identifier resolves to nobody.
    removed = await profile.stub.UnlinkIdentity(
        pb.UnlinkIdentityRequest(customer_id="cus-1", identity_id=card.identity_id), metadata=crm
    )
    assert removed.identity.identity_id == card.identity_id and removed.identity.verified
    removed = await profile.stub.UnlinkIdentity(
        pb.UnlinkIdentityRequest(customer_id="cus-1", identifier=ident(EMAIL, "HANA@example.com")),
        metadata=crm,
    )
    assert removed.identity.identifier.value == "h***@example.com"
    error = await rpc_error(profile.resolve(identifier=ident(EMAIL, "hana@example.com")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "IDENTITY_NOT_FOUND"
    for request in (
        pb.UnlinkIdentityRequest(customer_id="cus-1", identity_id=card.identity_id),
        pb.UnlinkIdentityRequest(customer_id="cus-2", identity_id=phone.identity_id),
    ):
        error = await rpc_error(profile.stub.UnlinkIdentity(request, metadata=crm))
        assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "IDENTITY_NOT_FOUND"
    assert [i.identity_id for i in await profile.all_identities("cus-1")] == [
        other_card.identity_id,
        phone.identity_id,
    ]
    # Once unlinked, the identifier is free for another customer.
    moved = await profile.link("cus-2", ident(CARD, "4000-1234", "najimi-card"), "link-7", crm)
    assert moved.customer_id == "cus-2" and moved.identity_id != card.identity_id

    tables = _read_tables(database_url, "identities")
    stored = b"".join(
        value if isinstance(value, bytes) else str(value).encode()
        for row in tables["identities"]
        for value in row.values()
    )
    for plaintext in (b"4000-1234", b"+81312345678", b"hana@example.com"):
        assert plaintext not in stored


async def test_a_link_changes_update_time_but_not_the_etag(start_service):
    profile = await _profile(start_service)
    created = await profile.create("cus-1")
    await profile.link("cus-1", ident(COOKIE, "ck-1"), "link-1")
    after = await profile.get("cus-1")
    assert after.update_time.ToMicroseconds() > created.customer.update_time.ToMicroseconds()
    assert after.etag == created.customer.etag


async def test_list_identities_pages_and_filters(start_service, database_url):
    profile = await _profile(start_service, database_url)
    await profile.create("cus-1")
    linked = []
    for index, identifier in enumerate(
        [
            ident(COOKIE, "ck-1"),
            ident(DEVICE, "dev-1"),
            ident(COOKIE, "ck-2"),
            ident(EXTERNAL, "S-1", "shopify"),
            ident(COOKIE, "ck-3"),
            ident(EMAIL, "a@example.com"),
            ident(COOKIE, "ck-4"),
        ]
    ):
        linked.append(await profile.link("cus-1", identifier, f"link-{index}"))
    ids = [i.identity_id for i in linked]

    first = await profile.stub.ListIdentities(
        pb.ListIdentitiesRequest(customer_id="cus-1", page_size=3), metadata=profile.admin
    )
    assert [i.identity_id for i in first.identities] == ids[:3] and first.next_page_token
    assert [i.identity_id for i in await profile.all_identities("cus-1", page_size=3)] == ids
    assert [i.identity_id for i in await profile.all_identities("cus-1", page_size=7)] == ids
    cookies = await profile.all_identities("cus-1", page_size=2, types=[COOKIE])
    assert [i.identifier.value for i in cookies] == ["ck-1", "ck-2", "ck-3", "ck-4"]
    some = await profile.all_identities("cus-1", page_size=1, types=[EXTERNAL, DEVICE, DEVICE])
    assert [i.identifier.value for i in some] == ["dev-1", "S-1"]

    # A token is bound to its filters and its customer.
    for request in (
        pb.ListIdentitiesRequest(customer_id="cus-1", page_token=first.next_page_token, types=[COOKIE]),
        pb.ListIdentitiesRequest(customer_id="cus-2", page_token=first.next_page_token),
    ):
        error = await rpc_error(profile.stub.ListIdentities(request, metadata=profile.admin))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(error)


def _token(position: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


FILTERS = {"customer_id": "cus-1", "types": []}


@pytest.mark.parametrize(
    ("call", "request_message", "field"),
    [
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(customer_id="cus-1", identifier=ident(COOKIE, "c")),
            "request_id",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="a b", customer_id="cus-1", identifier=ident(COOKIE, "c")),
            "request_id",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", identifier=ident(COOKIE, "c")),
            "customer_id",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="c" * 65, identifier=ident(COOKIE, "c")),
            "customer_id",
        ),
        ("LinkIdentity", pb.LinkIdentityRequest(request_id="r", customer_id="cus-1"), "identifier"),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(0, "x")),
            "identifier.type",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(99, "x")),
            "identifier.type",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(COOKIE, "")),
            "identifier.value",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(COOKIE, "x" * 257)),
            "identifier.value",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(EMAIL, "not-mail")),
            "identifier.value",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(
                request_id="r", customer_id="cus-1", identifier=ident(EMAIL, "h***@x.com")
            ),
            "identifier.value",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(
                request_id="r", customer_id="cus-1", identifier=ident(PHONE, "0312345678")
            ),
            "identifier.value",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(EXTERNAL, "S-1")),
            "identifier.issuer",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(request_id="r", customer_id="cus-1", identifier=ident(COOKIE, "c", "x")),
            "identifier.issuer",
        ),
        (
            "LinkIdentity",
            pb.LinkIdentityRequest(
                request_id="r", customer_id="cus-1", identifier=ident(CARD, "c", "Big Co")
            ),
            "identifier.issuer",
        ),
        ("UnlinkIdentity", pb.UnlinkIdentityRequest(identity_id="idn_1"), "customer_id"),
        ("UnlinkIdentity", pb.UnlinkIdentityRequest(customer_id="cus-1"), "identity_id"),
        ("UnlinkIdentity", pb.UnlinkIdentityRequest(customer_id="cus-1", identity_id=""), "identity_id"),
        (
            "UnlinkIdentity",
            pb.UnlinkIdentityRequest(customer_id="cus-1", identity_id="x" * 41),
            "identity_id",
        ),
        (
            "UnlinkIdentity",
            pb.UnlinkIdentityRequest(customer_id="cus-1", identifier=ident(PHONE, "12")),
            "identifier.value",
        ),
        ("ListIdentities", pb.ListIdentitiesRequest(), "customer_id"),
        ("ListIdentities", pb.ListIdentitiesRequest(customer_id="cus-1", types=[COOKIE, 0]), "types[1]"),
        ("ListIdentities", pb.ListIdentitiesRequest(customer_id="cus-1", types=[42]), "types[0]"),
        ("ListIdentities", pb.ListIdentitiesRequest(customer_id="cus-1", page_size=-1), "page_size"),
        ("ListIdentities", pb.ListIdentitiesRequest(customer_id="cus-1", page_size=1001), "page_size"),
        ("ListIdentities", pb.ListIdentitiesRequest(customer_id="cus-1", page_token="%%%"), "page_token"),
        (
            "ListIdentities",
            pb.ListIdentitiesRequest(customer_id="cus-1", page_token=_token([1])),
            "page_token",
        ),
        *[
            (
                "ListIdentities",
                pb.ListIdentitiesRequest(
                    customer_id="cus-1", page_token=_token({"after": after, "filters": FILTERS})
                ),
                "page_token",
            )
            for after in (
                None,
                [1],
                ["x", "idn_1"],
                [True, "idn_1"],
                [2**70, "idn_1"],
                [1, 2],
                [1, "a b"],
                [1.5, "x"],
            )
        ],
        ("ResolveIdentity", pb.ResolveIdentityRequest(), "identifier"),
        ("ResolveIdentity", pb.ResolveIdentityRequest(customer_id=""), "customer_id"),
        ("ResolveIdentity", pb.ResolveIdentityRequest(customer_id="a/b"), "customer_id"),
        ("ResolveIdentity", pb.ResolveIdentityRequest(identifier=ident(0, "x")), "identifier.type"),
        ("ResolveIdentity", pb.ResolveIdentityRequest(identifier=ident(EXTERNAL, "x")), "identifier.issuer"),
        (
            "MergeCustomers",
            pb.MergeCustomersRequest(source_customer_id="a", target_customer_id="b"),
            "request_id",
        ),
        (
            "MergeCustomers",
            pb.MergeCustomersRequest(request_id="r", target_customer_id="b"),
            "source_customer_id",
        ),
        (
            "MergeCustomers",
            pb.MergeCustomersRequest(request_id="r", source_customer_id="a"),
            "target_customer_id",
        ),
        (
            "MergeCustomers",
            pb.MergeCustomersRequest(request_id="r", source_customer_id="a", target_customer_id="b c"),
            "target_customer_id",
        ),
        (
            "MergeCustomers",
            pb.MergeCustomersRequest(request_id="r", source_customer_id="a", target_customer_id="a"),
            "target_customer_id",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(start_service, call, request_message, field):
    profile = await _profile(start_service)
    await profile.create("cus-1")
    error = await rpc_error(getattr(profile.stub, call)(request_message, metadata=profile.admin))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in field_violations(error), field_violations(error)


async def test_unknown_and_erased_customers_are_not_found(start_service, database_url):
    profile = await _profile(start_service, database_url)
    await profile.create("gone", identifiers=[ident(COOKIE, "ck-gone")])
    await profile.data_subject.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="gone", request_id="dsr-1"), metadata=profile.admin
    )
    for customer_id, reason in (("nobody", "CUSTOMER_NOT_FOUND"), ("gone", "CUSTOMER_ERASED")):
        for call in (
            profile.link(customer_id, ident(COOKIE, "ck-1"), "link-1"),
            profile.stub.UnlinkIdentity(
                pb.UnlinkIdentityRequest(customer_id=customer_id, identity_id="idn_1"), metadata=profile.admin
            ),
            profile.stub.ListIdentities(
                pb.ListIdentitiesRequest(customer_id=customer_id), metadata=profile.admin
            ),
            profile.resolve(customer_id=customer_id),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == reason
    error = await rpc_error(profile.resolve(identifier=ident(COOKIE, "ck-gone")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "IDENTITY_NOT_FOUND"


async def test_a_customer_has_at_most_1000_identities(start_service, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'limit.db'}"
    profile = await _profile(start_service, database_url)
    await profile.create("cus-1")
    database = Database(database_url, "profile")
    try:
        # 999 links stored directly (their hashes are random: no identifier resolves to them).
        await database.write(
            lambda c: c.execute(
                identities.insert(),
                [
                    {
                        "identity_id": f"idn_bulk{index}",
                        "customer_id": "cus-1",
                        "kind": "cookie_id",
                        "issuer": "",
                        "lookup_hash": os.urandom(32),
                        "value_ciphertext": b"\x00",
                        "verified": False,
                        "link_time_us": index,
                        "linked_by": "admin",
                    }
                    for index in range(999)
                ],
            )
        )
    finally:
        database.close()
    await profile.link("cus-1", ident(COOKIE, "ck-1000"), "link-1000")
    error = await rpc_error(profile.link("cus-1", ident(COOKIE, "ck-1001"), "link-1001"))
    assert (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(error) == "IDENTITY_LIMIT_REACHED"
    )
    # Linking one it already has still answers with the existing identity.
    assert (await profile.link("cus-1", ident(COOKIE, "ck-1000"), "link-1002")).identifier.value == "ck-1000"


async def test_racing_links_of_one_identifier_link_it_once(start_service, database_url):
    profile = await _profile(start_service, database_url)
    for index in range(4):
        await profile.create(f"cus-{index}")
    results = await asyncio.gather(
        *[profile.link(f"cus-{index % 4}", ident(DEVICE, "dev-1"), f"link-{index}") for index in range(12)],
        return_exceptions=True,
    )
    winners = {r.customer_id for r in results if isinstance(r, pb.Identity)}
    assert len(winners) == 1
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            assert error_reason(result) == "IDENTITY_LINKED_ELSEWHERE"
    assert len(_read_tables(database_url, "identities")["identities"]) == 1


async def test_who_may_call(start_service):
    profile = await _profile(start_service)
    await profile.create("cus-1", identifiers=[ident(COOKIE, "ck-1")])
    for principal in ("service:storefront", "service:store", "service:crm"):
        resolved = await profile.resolve(
            identifier=ident(COOKIE, "ck-1"), metadata=profile.service.auth(principal)
        )
        assert resolved.customer_id == "cus-1"
    # The recommender never looks customers up by identifier (e-mail, phone, ...) nor by old id.
    recommender = profile.service.auth("service:recommendation")
    for lookup in (
        profile.resolve(identifier=ident(COOKIE, "ck-1"), metadata=recommender),
        profile.resolve(customer_id="cus-1", metadata=recommender),
    ):
        error = await rpc_error(lookup)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"
    for principal in ("service:recommendation", "service:fulfilment"):
        metadata = profile.service.auth(principal)
        for call in (
            profile.link("cus-1", ident(COOKIE, "ck-2"), "link-1", metadata),
            profile.stub.UnlinkIdentity(
                pb.UnlinkIdentityRequest(customer_id="cus-1", identity_id="idn_1"), metadata=metadata
            ),
            profile.stub.ListIdentities(pb.ListIdentitiesRequest(customer_id="cus-1"), metadata=metadata),
            profile.merge("cus-1", "cus-2", "merge-1", metadata),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(
        profile.resolve(identifier=ident(COOKIE, "ck-1"), metadata=profile.service.auth("service:fulfilment"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(profile.stub.ResolveIdentity(pb.ResolveIdentityRequest(customer_id="cus-1")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# -- merges ----------------------------------------------------------------------------


def _source_customer() -> pb.Customer:
    return pb.Customer(
        display_name="Hana Sato",
        email="Hana.Sato@example.com",
        phone="+819012345678",
        birth_year=1990,
        gender=pb.GENDER_FEMALE,
        region="JP-27",
        attributes={
            "tier": pb.AttributeValue(string_value="silver", data_category=PURCHASES),
            "pet_owner": pb.AttributeValue(bool_value=True, data_category="user.demographic.profile"),
        },
    )


def _target_customer() -> pb.Customer:
    return pb.Customer(
        email="hana.sato@EXAMPLE.com",  # the same address, other case: no conflict
        phone="+819087654321",
        region="JP-13",
        language_code="ja",
        attributes={"tier": pb.AttributeValue(string_value="gold", data_category=PURCHASES)},
    )


async def test_a_merge_moves_identities_and_events_and_fills_gaps(start_service, database_url):
    profile = await _profile(start_service, database_url)
    source = await profile.create(
        "anon-1", _source_customer(), [ident(COOKIE, "ck-1"), ident(DEVICE, "dev-1")], request_id="c-1"
    )
    target = await profile.create("acct-1", _target_customer(), [ident(EMAIL, "hana.sato@example.com")])
    later = await profile.link("anon-1", ident(COOKIE, "ck-2"), "link-1")
    payloads = await _insert_events(database_url, "anon-1", 3)
    await _insert_events(database_url, "acct-1", 2)

    merged = await profile.merge("anon-1", "acct-1", "merge-1", profile.crm)
    assert merged.moved_identity_count == 3 and merged.moved_event_count == 3
    # display_name, birth_year, gender and the attribute pet_owner came from the source.
    assert merged.filled_attribute_count == 4
    conflicts = {c.field: (c.source_value, c.target_value) for c in merged.conflicts}
    assert conflicts == {
        "phone": ("+81********78", "+81********21"),  # masked for service:crm
        "region": ("JP-27", "JP-13"),
        "signup_time": conflicts["signup_time"],
        "attributes.tier": (f"silver ({PURCHASES})", f"gold ({PURCHASES})"),
    }
    assert merged.merge_time.seconds > 1_700_000_000
    customer = merged.customer
    assert customer.customer_id == "acct-1" and customer.pii_masked and customer.display_name == "H*** S***"
    assert customer.merged_from == ["anon-1"] and not customer.merged_into
    assert customer.etag != target.customer.etag

    got = await profile.get("acct-1")
    assert got.display_name == "Hana Sato" and got.email == "hana.sato@EXAMPLE.com"
    assert got.phone == "+819087654321" and got.region == "JP-13" and got.language_code == "ja"
    assert got.gender == pb.GENDER_FEMALE and got.age_range == source.customer.age_range
    assert got.signup_time == target.customer.signup_time
    assert got.attributes["tier"].string_value == "gold" and got.attributes["pet_owner"].bool_value
    assert got.merged_from == ["anon-1"]

    # The source is a tombstone that still resolves.
    tombstone = await profile.get("anon-1")
    assert tombstone == pb.Customer(
        customer_id="anon-1",
        merged_into="acct-1",
        create_time=source.customer.create_time,
        update_time=customer.update_time,
    )
    resolved = await profile.resolve(customer_id="anon-1")
    assert resolved.customer_id == "acct-1" and resolved.merged_customer_ids == ["anon-1"]
    resolved = await profile.resolve(identifier=ident(COOKIE, "ck-1"))
    assert resolved.customer_id == "acct-1" and resolved.identity.customer_id == "acct-1"
    assert not resolved.merged_customer_ids

    # Identities moved with their link times: oldest link first (then by id) across both.
    listed = await profile.all_identities("acct-1")
    assert [i.identity_id for i in listed] == [
        *sorted(i.identity_id for i in source.identities),  # linked together: by id
        target.identities[0].identity_id,
        later.identity_id,
    ]
    assert {i.customer_id for i in listed} == {"acct-1"}

    # Events are the target's now: the owner column moved, the payloads are as they were.
    tables = _read_tables(database_url, "events", "merges", "customers")
    owners = {row["event_id"]: row["customer_id"] for row in tables["events"]}
    assert owners == {f"{c}-event-{i}": "acct-1" for c, n in (("anon-1", 3), ("acct-1", 2)) for i in range(n)}
    assert sorted(
        bytes(r["payload"]) for r in tables["events"] if r["event_id"].startswith("anon")
    ) == sorted(payloads)

    # The merge is recorded with its conflicts; PII in it is encrypted.
    [record] = tables["merges"]
    assert (record["source_customer_id"], record["target_customer_id"]) == ("anon-1", "acct-1")
    assert record["merged_by"] == "service:crm" and record["request_id"] == "merge-1"
    assert {c["field"] for c in json.loads(record["conflicts"])} == set(conflicts)
    assert json.loads(record["moved"])["events"] == 3
    stored = json.dumps([tables["merges"], tables["customers"]], default=str)
    for plaintext in ("+819012345678", "+819087654321", "Hana Sato"):
        assert plaintext not in stored
    [source_row] = [row for row in tables["customers"] if row["customer_id"] == "anon-1"]
    assert source_row["email_ciphertext"] is None and source_row["attributes"] == "{}"

    # The source takes no more changes; admin sees the conflicts unmasked.
    for call in (
        profile.link("anon-1", ident(COOKIE, "ck-3"), "link-2"),
        profile.stub.ListIdentities(pb.ListIdentitiesRequest(customer_id="anon-1"), metadata=profile.admin),
        profile.stub.UnlinkIdentity(
            pb.UnlinkIdentityRequest(customer_id="anon-1", identity_id=later.identity_id),
            metadata=profile.admin,
        ),
        profile.stub.UpdateCustomer(
            pb.UpdateCustomerRequest(
                customer=pb.Customer(customer_id="anon-1", region="JP"),
                update_mask=field_mask_pb2.FieldMask(paths=["region"]),
            ),
            metadata=profile.admin,
        ),
    ):
        error = await rpc_error(call)
        assert (
            error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "CUSTOMER_MERGED"
        )
        assert error_metadata(error)["merged_into"] == "acct-1"
    again = await profile.merge("anon-1", "acct-1", "merge-2")
    assert {c.field: c.source_value for c in again.conflicts}["phone"] == "+819012345678"


async def test_merges_are_idempotent(start_service, database_url):
    first_service = await start_service("profile", database_url)
    profile = Profile(first_service)
    await profile.create("anon-1", _source_customer(), [ident(COOKIE, "ck-1")])
    await profile.create("acct-1", _target_customer())
    await _insert_events(database_url, "anon-1", 2)
    first = await profile.merge("anon-1", "acct-1", "merge-1", profile.crm)
    assert await profile.merge("anon-1", "acct-1", "merge-1", profile.crm) == first

    # After a restart: the retry returns the first result, and so does another request
    # merging the same pair (with the target as it is now).
    await first_service.running.stop(0)
    profile = Profile(await start_service("profile", database_url))
    assert await profile.merge("anon-1", "acct-1", "merge-1", profile.crm) == first
    other = await profile.merge("anon-1", "acct-1", "merge-2", profile.crm)
    assert other == first
    assert (await profile.merge("anon-1", "acct-1", "merge-2", profile.crm)) == other

    # A request id already used for another merge is refused.
    await profile.create("cus-x")
    await profile.create("cus-y")
    error = await rpc_error(profile.merge("cus-x", "cus-y", "merge-1", profile.crm))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
    assert "request_id" in field_violations(error)
    assert not (await profile.get("cus-x")).merged_into

    tables = _read_tables(database_url, "merges", "events")
    assert len(tables["merges"]) == 1
    assert {row["customer_id"] for row in tables["events"]} == {"acct-1"}


async def test_racing_merges_merge_once(start_service, database_url):
    profile = await _profile(start_service, database_url)
    await profile.create("a", identifiers=[ident(COOKIE, "ck-a")])
    await profile.create("b", identifiers=[ident(COOKIE, "ck-b")])
    # Copies of one request: one merge, one answer.
    same = await asyncio.gather(*[profile.merge("a", "b", "merge-1", profile.crm) for _ in range(6)])
    assert all(result == same[0] for result in same)

    # Opposite merges of one pair: exactly one wins, the other finds its customer merged.
    await profile.create("c", identifiers=[ident(COOKIE, "ck-c")])
    await profile.create("d", identifiers=[ident(COOKIE, "ck-d")])
    results = await asyncio.gather(
        profile.merge("c", "d", "merge-cd"), profile.merge("d", "c", "merge-dc"), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, pb.MergeCustomersResponse)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(losses[0]) == "CUSTOMER_MERGED"
    survivor = wins[0].customer.customer_id
    assert {(await profile.resolve(identifier=ident(COOKIE, v))).customer_id for v in ("ck-c", "ck-d")} == {
        survivor
    }
    assert len(_read_tables(database_url, "merges")["merges"]) == 2


async def test_merges_that_cannot_be_done_say_why(start_service, database_url):
    profile = await _profile(start_service, database_url)
    for customer_id in ("a", "b", "c", "gone"):
        await profile.create(customer_id, identifiers=[ident(COOKIE, f"ck-{customer_id}")])
    await profile.data_subject.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="gone", request_id="dsr-1"), metadata=profile.admin
    )
    await profile.merge("a", "b", "merge-ab")

    cases = [
        ("a", "a", grpc.StatusCode.INVALID_ARGUMENT, "MERGE_INTO_ITSELF"),
        ("nobody", "b", grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND"),
        ("c", "nobody", grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND"),
        ("gone", "c", grpc.StatusCode.NOT_FOUND, "CUSTOMER_ERASED"),
        ("c", "gone", grpc.StatusCode.NOT_FOUND, "CUSTOMER_ERASED"),
        # Into a merged customer: resolve it first.
        ("c", "a", grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_MERGED"),
        # A merged source cannot move again.
        ("a", "c", grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_MERGED"),
        # Back the other way would be a cycle.
        ("b", "a", grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_MERGED"),
    ]
    for index, (source, target, code, reason) in enumerate(cases):
        error = await rpc_error(profile.merge(source, target, f"merge-{index}"))
        assert (error.code(), error_reason(error)) == (code, reason), (source, target, error.details())
    error = await rpc_error(profile.merge("b", "a", "merge-ba"))
    assert "cycle" in error.details()
    assert error_metadata(error)["field"] == "target_customer_id"
    # Nothing changed: c is live, with its identity.
    assert not (await profile.get("c")).merged_into
    assert (await profile.resolve(identifier=ident(COOKIE, "ck-c"))).customer_id == "c"
    # A failed request id is not spent: it may be used again for a merge that can be done.
    assert (await profile.merge("c", "b", "merge-0")).customer.customer_id == "b"


async def test_chains_of_merges_resolve_to_the_survivor(start_service, database_url):
    profile = await _profile(start_service, database_url)
    for customer_id in ("a", "b", "c"):
        await profile.create(customer_id, identifiers=[ident(COOKIE, f"ck-{customer_id}")])
    await profile.merge("a", "b", "merge-1")
    await profile.merge("b", "c", "merge-2")
    resolved = await profile.resolve(customer_id="a")
    assert resolved.customer_id == "c" and resolved.merged_customer_ids == ["a", "b"]
    assert (await profile.resolve(customer_id="c")).merged_customer_ids == []
    assert (await profile.resolve(identifier=ident(COOKIE, "ck-a"))).customer_id == "c"
    assert (await profile.get("c")).merged_from == ["b"]
    assert (await profile.get("a")).merged_into == "b"
    assert [i.identifier.value for i in await profile.all_identities("c")] == ["ck-a", "ck-b", "ck-c"]

    listed = await profile.stub.ListCustomers(pb.ListCustomersRequest(), metadata=profile.admin)
    assert [c.customer_id for c in listed.customers] == ["c"]
    listed = await profile.stub.ListCustomers(
        pb.ListCustomersRequest(show_merged=True), metadata=profile.admin
    )
    assert [(c.customer_id, c.merged_into) for c in listed.customers] == [("a", "b"), ("b", "c"), ("c", "")]


async def test_erasing_a_customer_erases_its_aliases(start_service, database_url):
    profile = await _profile(start_service, database_url)
    for customer_id in ("a", "b", "c", "other"):
        await profile.create(customer_id, _source_customer(), [ident(COOKIE, f"ck-{customer_id}")])
    await _insert_events(database_url, "a", 2)
    await profile.merge("a", "b", "merge-1")
    await profile.merge("b", "c", "merge-2")
    await profile.link("c", ident(EMAIL, "c@example.com"), "link-1")

    erased = await profile.data_subject.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="c", request_id="dsr-1"),
        metadata=profile.service.auth("service:consent"),
    )
    assert erased.erased_records["customers"] == 3 and erased.erased_records["identities"] == 4
    for customer_id in ("a", "b", "c"):
        error = await rpc_error(profile.get(customer_id))
        assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "CUSTOMER_ERASED"
        error = await rpc_error(profile.resolve(customer_id=customer_id))
        assert error_reason(error) == "CUSTOMER_ERASED"
        # An alias id is as spent as the customer's own.
        error = await rpc_error(profile.create(customer_id, request_id=f"again-{customer_id}"))
        assert (
            error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "CUSTOMER_ERASED"
        )
    assert (await profile.get("other")).display_name == "Hana Sato"

    tables = _read_tables(
        database_url,
        "customers",
        "identities",
        "merges",
        "events",
        "erasures",
        "idempotency",
    )
    assert [row["customer_id"] for row in tables["customers"]] == ["other"]
    assert tables["merges"] == [] and tables["events"] == []
    assert len(tables["identities"]) == 1
    assert len(tables["erasures"]) == 3  # keyed hashes of a, b and c
    assert {row["customer_id"] for row in tables["idempotency"]} == {"other", None}
    assert {row["rpc"] for row in tables["idempotency"]} == {"CreateCustomer", "EraseCustomerData"}


async def test_events_sent_for_a_merged_customer_reach_the_survivor(consented_profile, database_url):
    service, consent = await consented_profile(database_url)
    profile = Profile(service)
    await profile.create("anon-1", identifiers=[ident(COOKIE, "ck-1")])
    await profile.create("acct-1")
    granted = await consent_grpc.ConsentServiceStub(consent.channel).GrantConsent(
        grant(customer="acct-1", categories=(BROWSING,), request_id="g-1"), metadata=consent.auth()
    )
    cache = service.running.app.registrations[0].servicer.consent
    assert await cache.wait_for_revision(granted.consent.revision, 5)
    await profile.merge("anon-1", "acct-1", "merge-1")

    occurred = timestamp_pb2.Timestamp(seconds=now_micros() // 1_000_000 - 60)
    item = pb.EventItem(item_id="sku-1", category_path=["food", "coffee"])
    sent = [
        pb.Event(
            event_id="e-by-id",
            customer_id="anon-1",
            channel=pb.CHANNEL_WEB,
            event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
            occur_time=occurred,
            items=[item],
        ),
        pb.Event(
            event_id="e-by-cookie",
            identifier=ident(COOKIE, "ck-1"),
            channel=pb.CHANNEL_WEB,
            event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
            occur_time=occurred,
            items=[item],
        ),
    ]
    results = await profile.stub.IngestEvents(pb.IngestEventsRequest(events=sent), metadata=profile.crm)
    assert [(r.status, r.customer_id) for r in results.results] == [
        (pb.EVENT_RESULT_STATUS_ACCEPTED, "acct-1"),
        (pb.EVENT_RESULT_STATUS_ACCEPTED, "acct-1"),
    ]
    owners = {row["event_id"]: row["customer_id"] for row in _read_tables(database_url, "events")["events"]}
    assert owners == {"e-by-id": "acct-1", "e-by-cookie": "acct-1"}
