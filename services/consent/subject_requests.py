"""Data-subject requests (GDPR articles 15, 17, 20): export or erase one customer everywhere.

A request is stored with one part per service (consent itself and every service of
NAJIMI_DATA_SUBJECT_SERVICES). A background runner carries the parts out by calling
each service's najimi.privacy.v1.DataSubjectService with the request's id as the
idempotency key, retrying a service that fails with exponential back-off until
NAJIMI_DATA_SUBJECT_MAX_ATTEMPTS calls; the state survives restarts. An erasure
erases consent's own part first, which publishes the ERASURE change, then the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from sqlalchemy.engine import Connection

from services.consent import audit
from services.consent.customer_data import erase_customer, export_customer
from services.consent.feed import ChangeFeed
from shared.auth import Principal
from shared.clients import client_for
from shared.data_subject import rfc3339
from shared.db import Database, now_micros
from shared.errors import AlreadyExists, NotFound
from shared.idempotency import Idempotency
from shared.log import get_logger
from shared.proto_time import timestamp_of
from shared.settings import Settings
from shared.tasks import cancel_and_wait

PENDING = pb.DATA_SUBJECT_REQUEST_STATE_PENDING
IN_PROGRESS = pb.DATA_SUBJECT_REQUEST_STATE_IN_PROGRESS
SUCCEEDED = pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED
FAILED = pb.DATA_SUBJECT_REQUEST_STATE_FAILED
OPEN_STATES = (PENDING, IN_PROGRESS)
EXPORT = pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT
ERASE = pb.DATA_SUBJECT_REQUEST_TYPE_ERASE
MONTH_US = 30 * 86_400 * 1_000_000
CALL_TIMEOUT_SECONDS = 30.0
log = get_logger("najimi.consent.requests")

metadata = sa.MetaData()
requests_table = sa.Table(
    "data_subject_requests",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("type", sa.SmallInteger, nullable=False),
    sa.Column("state", sa.SmallInteger, nullable=False),
    sa.Column("created_by", sa.String(160), nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
    sa.Column("updated_at_us", sa.BigInteger, nullable=False),
    sa.Column("due_at_us", sa.BigInteger, nullable=False),
    sa.Column("completed_at_us", sa.BigInteger, nullable=True),
    sa.Column("document", sa.Text, nullable=True),
    sa.Column("export_expires_at_us", sa.BigInteger, nullable=True),
    sa.Column("customer_ref", sa.String(64), nullable=False),
    sa.Column("client_request_id", sa.String(64), nullable=False),
)
parts_table = sa.Table(
    "data_subject_request_services",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("service", sa.String(64), primary_key=True),
    sa.Column("state", sa.SmallInteger, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.Column("completed_at_us", sa.BigInteger, nullable=True),
    sa.Column("erased_records", sa.Text, nullable=False),
    sa.Column("document", sa.Text, nullable=True),
    sa.Column("next_attempt_at_us", sa.BigInteger, nullable=False),
)


def backoff_us(attempts: int) -> int:
    """Wait before the next call: 0.5 s, 1 s, 2 s … at most 60 s."""
    return int(min(60.0, 0.5 * 2 ** max(0, attempts - 1)) * 1_000_000)


def request_message(
    row: sa.Row, parts: list[sa.Row], with_document: bool, now_us: int
) -> pb.DataSubjectRequest:
    message = pb.DataSubjectRequest(
        data_subject_request_id=row.request_id,
        customer_id=row.customer_id,
        type=row.type,
        state=row.state,
        services=[
            pb.DataSubjectServiceStatus(
                service=part.service,
                state=part.state,
                attempts=part.attempts,
                last_error=part.last_error,
                complete_time=timestamp_of(part.completed_at_us),
                erased_records=json.loads(part.erased_records),
            )
            for part in sorted(parts, key=lambda p: p.service)
        ],
        export_expire_time=timestamp_of(row.export_expires_at_us),
        requested_by=row.created_by,
        create_time=timestamp_of(row.created_at_us),
        update_time=timestamp_of(row.updated_at_us),
        complete_time=timestamp_of(row.completed_at_us),
        due_time=timestamp_of(row.due_at_us),
    )
    expired = row.export_expires_at_us is not None and row.export_expires_at_us <= now_us
    if with_document and row.document and not expired:
        message.export_document.update(json.loads(row.document))
    return message


def _parts(connection: Connection, request_id: str) -> list[sa.Row]:
    return list(connection.execute(sa.select(parts_table).where(parts_table.c.request_id == request_id)))


def _load(connection: Connection, request_id: str) -> sa.Row | None:
    return connection.execute(
        sa.select(requests_table).where(requests_table.c.request_id == request_id)
    ).first()


def erase_consent_part(
    connection: Connection,
    customer_id: str,
    ref_key: bytes,
    request_id: str,
    now_us: int,
    idempotency: Idempotency,
    own_request: tuple[str, str] | None = None,
) -> dict[str, int]:
    """Consent's part of an erasure (customer_data.erase_customer), plus the customer's other
    data-subject requests: the closed ones name the customer only by pseudonym from now on
    and lose their export documents. `own_request` is (principal, client request id) of the
    erasure's own CreateDataSubjectRequest: its stored reply stays for retries, pseudonymised."""
    ref = audit.customer_ref(ref_key, customer_id)
    if own_request is not None:
        principal, client_request_id = own_request
        own_reply = idempotency.reply_of(connection, principal, "CreateDataSubjectRequest", client_request_id)
        if own_reply is not None:
            message = pb.DataSubjectRequest.FromString(own_reply)
            message.customer_id = audit.ERASED_PREFIX + ref
            idempotency.detach_reply(
                connection,
                principal,
                "CreateDataSubjectRequest",
                client_request_id,
                message.SerializeToString(),
            )
    erased = erase_customer(connection, customer_id, ref_key, request_id, now_us, idempotency)
    closed = sa.and_(requests_table.c.customer_ref == ref, requests_table.c.state.not_in(OPEN_STATES))
    closed_ids = sa.select(requests_table.c.request_id).where(closed).scalar_subquery()
    connection.execute(
        parts_table.update().where(parts_table.c.request_id.in_(closed_ids)).values(document=None)
    )
    erased["data_subject_requests"] = connection.execute(
        requests_table.update().where(closed).values(customer_id=audit.ERASED_PREFIX + ref, document=None)
    ).rowcount
    return erased


class DataSubjectRequests:
    def __init__(
        self,
        database: Database,
        feed: ChangeFeed,
        settings: Settings,
        ref_key: bytes,
        idempotency: Idempotency,
    ):
        self.db = database
        self.idempotency = idempotency
        self.feed = feed
        self.ref_key = ref_key
        self.max_attempts = settings.data_subject_max_attempts
        self.services = ["consent", *(s for s in settings.data_subject_services.split(",") if s)]
        self._settings = settings
        self._clients: dict[str, tuple[privacy_grpc.DataSubjectServiceStub, grpc.aio.Channel]] = {}
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    # Requests ---------------------------------------------------------------------------------

    async def create(
        self, principal: Principal, request: pb.CreateDataSubjectRequestRequest
    ) -> pb.DataSubjectRequest:
        customer_id, kind, client_request_id = request.customer_id, request.type, request.request_id
        now = now_micros()
        ref = audit.customer_ref(self.ref_key, customer_id)

        def carry_out(connection: Connection) -> bytes:
            open_request = connection.execute(
                sa.select(requests_table.c.request_id).where(
                    requests_table.c.customer_ref == ref,
                    requests_table.c.type == kind,
                    requests_table.c.state.in_(OPEN_STATES),
                )
            ).first()
            if open_request is not None:
                raise AlreadyExists(
                    f"data-subject request {open_request.request_id} of this type is still open",
                    reason="DATA_SUBJECT_REQUEST_OPEN",
                    metadata={"data_subject_request_id": open_request.request_id},
                )
            request_id = f"dsr_{uuid.uuid4().hex}"
            connection.execute(
                requests_table.insert().values(
                    request_id=request_id,
                    customer_id=customer_id,
                    type=kind,
                    state=PENDING,
                    created_by=str(principal),
                    created_at_us=now,
                    updated_at_us=now,
                    due_at_us=now + MONTH_US,
                    completed_at_us=None,
                    document=None,
                    export_expires_at_us=None,
                    customer_ref=ref,
                    client_request_id=client_request_id,
                )
            )
            connection.execute(
                parts_table.insert(),
                [
                    dict(
                        request_id=request_id,
                        service=service,
                        state=PENDING,
                        attempts=0,
                        last_error="",
                        completed_at_us=None,
                        erased_records="{}",
                        document=None,
                        next_attempt_at_us=now,
                    )
                    for service in self.services
                ],
            )
            audit.append_entry(
                connection,
                ref_key=self.ref_key,
                actor=str(principal),
                action=pb.AUDIT_ACTION_DATA_SUBJECT_REQUEST_CREATED,
                customer_id=customer_id,
                request_id=client_request_id,
                details={
                    "data_subject_request_id": request_id,
                    "type": pb.DataSubjectRequestType.Name(kind),  # type: ignore[arg-type]
                },
                now_us=now,
            )
            row = _load(connection, request_id)
            assert row is not None
            return request_message(row, _parts(connection, request_id), False, now).SerializeToString()

        stored = await self.db.write(
            lambda c: self.idempotency.once(
                c, str(principal), "CreateDataSubjectRequest", request, carry_out, customer_id
            )
        )
        self._wake.set()
        return pb.DataSubjectRequest.FromString(stored)

    async def get(self, principal: Principal, request_id: str) -> pb.DataSubjectRequest:
        now = now_micros()

        def read(connection: Connection) -> pb.DataSubjectRequest | None:
            row = _load(connection, request_id)
            if row is None or not (principal.is_admin or row.created_by == str(principal)):
                return None  # another caller's request is as good as absent
            return request_message(row, _parts(connection, request_id), True, now)

        found = await self.db.read(read)
        if found is None:
            raise NotFound(
                f"data-subject request {request_id} not found", reason="DATA_SUBJECT_REQUEST_NOT_FOUND"
            )
        return found

    async def list(
        self,
        principal: Principal,
        customer_id: str,
        kind: int,
        state: int,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[pb.DataSubjectRequest]:
        now = now_micros()

        def read(connection: Connection) -> list[pb.DataSubjectRequest]:
            query = sa.select(requests_table)
            if not principal.is_admin:
                query = query.where(requests_table.c.created_by == str(principal))
            if customer_id:
                query = query.where(
                    requests_table.c.customer_ref == audit.customer_ref(self.ref_key, customer_id)
                )
            if kind:
                query = query.where(requests_table.c.type == kind)
            if state:
                query = query.where(requests_table.c.state == state)
            if after is not None:
                query = query.where(
                    sa.or_(
                        requests_table.c.created_at_us < after[0],
                        sa.and_(
                            requests_table.c.created_at_us == after[0], requests_table.c.request_id < after[1]
                        ),
                    )
                )
            rows = connection.execute(
                query.order_by(
                    requests_table.c.created_at_us.desc(), requests_table.c.request_id.desc()
                ).limit(limit)
            )
            return [request_message(row, _parts(connection, row.request_id), False, now) for row in rows]

        return await self.db.read(read)

    # The runner ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Opens the channels to the other services (on the running loop) and starts the runner."""
        self._clients = {
            name: client_for(
                privacy_grpc.DataSubjectServiceStub, self._settings.address_of(name), self._settings
            )
            for name in self.services
            if name != "consent"
        }
        self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._runner)
        for _, channel in self._clients.values():
            await channel.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._carry_out_due_parts()
            except Exception as error:  # keep running; the parts stay due and are retried
                log.error("data_subject_runner_failed", error=type(error).__name__, exc_info=error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):  # not wait_for: it can swallow a cancel (3.11)
                    await self._wake.wait()
            self._wake.clear()

    async def _carry_out_due_parts(self) -> None:
        now = now_micros()

        def due(connection: Connection) -> list[tuple[sa.Row, list[sa.Row]]]:
            rows = connection.execute(
                sa.select(requests_table).where(requests_table.c.state.in_(OPEN_STATES))
            )
            return [(row, _parts(connection, row.request_id)) for row in rows]

        for request, parts in await self.db.read(due):
            open_parts = [p for p in parts if p.state in OPEN_STATES]
            if request.type == ERASE and any(p.service == "consent" and p.state != SUCCEEDED for p in parts):
                open_parts = [p for p in open_parts if p.service == "consent"]  # publish the erasure first
            ready = [p for p in open_parts if p.next_attempt_at_us <= now]
            await asyncio.gather(*(self._carry_out(request, part) for part in ready))
            await self._complete_if_done(request.request_id)

    async def _carry_out(self, request: sa.Row, part: sa.Row) -> None:
        try:
            document, erased = await self._call(request, part.service)
        except grpc.aio.AioRpcError as error:
            await self._record_failure(
                request.request_id, part.service, f"{error.code().name}: {error.details()}"
            )
            return
        except Exception as error:
            log.error("data_subject_part_failed", service=part.service, exc_info=error)
            await self._record_failure(request.request_id, part.service, f"INTERNAL: {type(error).__name__}")
            return
        now = now_micros()
        await self.db.write(
            lambda c: c.execute(
                parts_table.update()
                .where(parts_table.c.request_id == request.request_id, parts_table.c.service == part.service)
                .values(
                    state=SUCCEEDED,
                    attempts=parts_table.c.attempts + 1,
                    completed_at_us=now,
                    last_error="",
                    erased_records=json.dumps(erased),
                    document=json.dumps(document) if document is not None else None,
                )
            )
        )

    async def _call(self, request: sa.Row, service: str) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """Carries out one service's part; returns (export document, erased counts)."""
        customer_id, request_id = request.customer_id, request.request_id
        if service == "consent":
            now = now_micros()
            if request.type == EXPORT:
                return await self.db.read(lambda c: export_customer(c, customer_id, self.ref_key)), {}
            own = (request.created_by, request.client_request_id)
            erased = await self.db.write(
                lambda c: erase_consent_part(
                    c, customer_id, self.ref_key, request_id, now, self.idempotency, own
                )
            )
            await self.db.scrub()
            await self.feed.refresh()
            return None, erased
        stub, _ = self._clients[service]
        if request.type == EXPORT:
            exported = await stub.ExportCustomerData(
                privacy_pb.ExportCustomerDataRequest(customer_id=customer_id, request_id=request_id),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            return json_format.MessageToDict(exported.document), {}
        erased_response = await stub.EraseCustomerData(
            privacy_pb.EraseCustomerDataRequest(customer_id=customer_id, request_id=request_id),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return None, dict(erased_response.erased_records)

    async def _record_failure(self, request_id: str, service: str, error: str) -> None:
        now = now_micros()

        def record(connection: Connection) -> None:
            part = connection.execute(
                sa.select(parts_table).where(
                    parts_table.c.request_id == request_id, parts_table.c.service == service
                )
            ).one()
            attempts = part.attempts + 1
            connection.execute(
                parts_table.update()
                .where(parts_table.c.request_id == request_id, parts_table.c.service == service)
                .values(
                    attempts=attempts,
                    last_error=error[:500],
                    state=FAILED if attempts >= self.max_attempts else IN_PROGRESS,
                    completed_at_us=now if attempts >= self.max_attempts else None,
                    next_attempt_at_us=now + backoff_us(attempts),
                )
            )
            connection.execute(
                requests_table.update()
                .where(requests_table.c.request_id == request_id)
                .values(state=IN_PROGRESS, updated_at_us=now)
            )

        log.warning("data_subject_part_retry", service=service, error=error[:200])
        await self.db.write(record)

    async def _complete_if_done(self, request_id: str) -> None:
        now = now_micros()

        def complete(connection: Connection) -> None:
            request = _load(connection, request_id)
            parts = _parts(connection, request_id)
            if request is None or request.state not in OPEN_STATES:
                return
            if any(p.state in OPEN_STATES for p in parts):
                if any(p.state != PENDING for p in parts) and request.state == PENDING:
                    connection.execute(
                        requests_table.update()
                        .where(requests_table.c.request_id == request_id)
                        .values(state=IN_PROGRESS, updated_at_us=now)
                    )
                return
            succeeded = all(p.state == SUCCEEDED for p in parts)
            values: dict[str, Any] = dict(
                state=SUCCEEDED if succeeded else FAILED, updated_at_us=now, completed_at_us=now
            )
            if request.type == EXPORT and succeeded:
                values["document"] = json.dumps(
                    {
                        "customer_id": request.customer_id,
                        "generated_at": rfc3339(now),
                        "services": {p.service: json.loads(p.document or "{}") for p in parts},
                    }
                )
                values["export_expires_at_us"] = now + MONTH_US
            if request.type == ERASE and succeeded:
                values["customer_id"] = audit.ERASED_PREFIX + request.customer_ref
            connection.execute(
                requests_table.update().where(requests_table.c.request_id == request_id).values(**values)
            )
            audit.append_entry(
                connection,
                ref_key=self.ref_key,
                actor="system",
                action=pb.AUDIT_ACTION_DATA_SUBJECT_REQUEST_COMPLETED,
                customer_id=request.customer_id,
                request_id=request.client_request_id,
                details={
                    "data_subject_request_id": request_id,
                    "state": pb.DataSubjectRequestState.Name(values["state"]),
                    "failed_services": sorted(p.service for p in parts if p.state == FAILED),
                },
                now_us=now,
            )
            if request.type == ERASE and succeeded:
                audit.pseudonymise(connection, request.customer_id, request.customer_ref)

        await self.db.write(complete)
        await self.db.scrub()
