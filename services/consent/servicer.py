"""ConsentService over gRPC: protobuf in, domain calls, protobuf out — nothing else."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf.message import Message
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import Connection

from services.consent import audit
from services.consent.decisions import (
    MAX_DECISIONS,
    DecisionInput,
    Recorder,
    check_common,
    check_decision,
    current_row,
    purpose_consent,
    record_decisions,
)
from services.consent.feed import ChangeFeed
from services.consent.notices import NoticeSchedule
from services.consent.receipts import ReceiptSigner, receipt_from_stored
from services.consent.store import (
    ConsentStore,
    DataCategory,
    DataUse,
    Purpose,
    allocate_revision,
    changes_after,
    consent_history,
    current_revision,
    insert_change,
    notice_of,
    notices,
    receipts,
)
from services.consent.subject_requests import DataSubjectRequests
from services.consent.vocabulary import Vocabulary, check_labels, check_vocabulary_name, insert_purpose
from shared.auth import current_principal
from shared.db import now_micros
from shared.errors import InvalidArgument, NotFound, OutOfRange
from shared.idempotency import Idempotency
from shared.page_tokens import PageTokens
from shared.proto_time import duration_of, micros_from, seconds_from, timestamp_of
from shared.validation import Violations, is_valid_id, page_size_of

MAX_BATCH_CHECKS = 1000
MAX_NOTICE_TEXT = 65536
DEFAULT_HEARTBEAT_SECONDS = 5.0
SERVICE = pb.DESCRIPTOR.services_by_name["ConsentService"]
# A purpose's consent_validity at most (the proto): 100 years, so an expiry stays a valid time.
MAX_CONSENT_VALIDITY_SECONDS = 100 * 366 * 86_400
# How far ahead a privacy notice version may be scheduled (the proto).
MAX_NOTICE_LEAD_US = 5 * 366 * 86_400 * 1_000_000


def data_category_message(category: DataCategory) -> pb.DataCategory:
    return pb.DataCategory(
        name=category.name,
        display_name=category.display_name,
        description=category.description,
        sensitive=category.sensitive,
        create_time=timestamp_of(category.created_at_us),
    )


def purpose_message(purpose: Purpose, current_notice_version: int = 0) -> pb.Purpose:
    return pb.Purpose(
        name=purpose.name,
        display_name=purpose.display_name,
        description=purpose.description,
        data_categories=purpose.data_categories,
        data_uses=[
            pb.ServiceDataUse(service=u.service, data_categories=u.data_categories, description=u.description)
            for u in purpose.data_uses
        ],
        consent_validity=duration_of(purpose.consent_validity_seconds),
        current_notice_version=current_notice_version,
        create_time=timestamp_of(purpose.created_at_us),
    )


def _expiry(message: Any, field: str, violations: Violations) -> int | None:
    """A grant's expire_time in microseconds; None when unset (or invalid: a violation)."""
    if not message.HasField("expire_time"):
        return None
    return micros_from(message.expire_time, field, violations=violations)


def _history_record(row: sa.Row) -> pb.ConsentRecord:
    return pb.ConsentRecord(
        revision=row.revision,
        purpose=row.purpose,
        decision=row.decision,
        granted_data_categories=json.loads(row.categories),
        withdrawn_data_categories=json.loads(row.withdrawn_categories),
        notice_version=row.notice_version,
        collection_method=row.collection_method,
        jurisdiction=row.jurisdiction,
        grant_time=timestamp_of(row.given_at_us),
        expire_time=timestamp_of(row.expires_at_us),
        receipt_id=row.receipt_id,
        actor=row.actor,
    )


class ConsentServicer(pb_grpc.ConsentServiceServicer):
    def __init__(
        self,
        store: ConsentStore,
        feed: ChangeFeed,
        signer: ReceiptSigner,
        audit_key: bytes,
        vocabulary: Vocabulary,
        requests: DataSubjectRequests,
        idempotency: Idempotency,
        tokens: PageTokens,
    ):
        self.pages = tokens.of_service(SERVICE)
        self.store = store
        self.db = store.db
        self.feed = feed
        self.signer = signer
        self.audit_key = audit_key
        self.vocabulary = vocabulary
        self.requests = requests
        self.idempotency = idempotency

    async def reload_vocabulary(self) -> None:
        self.vocabulary = await self.db.read(Vocabulary.load)

    async def _create_once(
        self,
        rpc: str,
        request: Message,
        carry_out: Callable[[Connection], bytes],
        customer_id: str | None = None,
    ) -> bytes:
        principal = str(current_principal())
        return await self.db.write(
            lambda connection: self.idempotency.once(
                connection, principal, rpc, request, carry_out, customer_id
            )
        )

    def _recorder(self, request_id: str) -> Recorder:
        return Recorder(str(current_principal()), request_id, now_micros(), self.signer, self.audit_key)

    # Vocabulary -------------------------------------------------------------------------

    async def ListPurposes(self, request: pb.ListPurposesRequest, context: grpc.aio.ServicerContext) -> Any:
        size = page_size_of(request.page_size)
        position = self.pages.read("ListPurposes", request.page_token, {}, (str,))
        found = await self.store.list_purposes(str(position[0]) if position else "", size)
        now = now_micros()

        def versions(connection: Connection) -> dict[str, int]:
            return {p.name: NoticeSchedule.load(connection, p.name).in_effect(now) for p in found}

        current = await self.db.read(versions)
        return pb.ListPurposesResponse(
            purposes=[purpose_message(p, current[p.name]) for p in found],
            next_page_token=(
                self.pages.issue("ListPurposes", {}, (found[-1].name,)) if len(found) == size else ""
            ),
        )

    async def ListDataCategories(
        self, request: pb.ListDataCategoriesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        size = page_size_of(request.page_size)
        position = self.pages.read("ListDataCategories", request.page_token, {}, (str,))
        found = await self.store.list_data_categories(str(position[0]) if position else "", size)
        return pb.ListDataCategoriesResponse(
            data_categories=[data_category_message(c) for c in found],
            next_page_token=(
                self.pages.issue("ListDataCategories", {}, (found[-1].name,)) if len(found) == size else ""
            ),
        )

    async def CreateDataCategory(
        self, request: pb.CreateDataCategoryRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        category = request.data_category
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        check_vocabulary_name(violations, "data_category.name", category.name)
        check_labels(violations, "data_category", category.display_name, category.description)
        violations.raise_if_any()
        recorder = self._recorder(request.request_id)

        def create(connection: Connection) -> bytes:
            stored = self.store.insert_data_category(
                connection, category.name, category.display_name, category.description, category.sensitive
            )
            audit.append_entry(
                connection,
                ref_key=self.audit_key,
                actor=recorder.actor,
                action=pb.AUDIT_ACTION_DATA_CATEGORY_CREATED,
                customer_id="",
                request_id=recorder.request_id,
                details={"data_category": stored.name},
                now_us=recorder.now_us,
            )
            return pb.CreateDataCategoryResponse(
                data_category=data_category_message(stored)
            ).SerializeToString()

        response = await self._create_once("CreateDataCategory", request, create)
        await self.reload_vocabulary()
        return pb.CreateDataCategoryResponse.FromString(response)

    async def CreatePurpose(self, request: pb.CreatePurposeRequest, context: grpc.aio.ServicerContext) -> Any:
        given = request.purpose
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        check_vocabulary_name(violations, "purpose.name", given.name)
        check_labels(violations, "purpose", given.display_name, given.description)
        if not given.data_categories:
            violations.add("purpose.data_categories", "must name at least one data category")
        # A set: a repeated field's `in` scans it, which made this loop quadratic in the request.
        purpose_categories = set(given.data_categories)
        for index, use in enumerate(given.data_uses):
            violations.require_text(f"purpose.data_uses[{index}].service", use.service, 64)
            violations.require_text(f"purpose.data_uses[{index}].description", use.description, 2000)
            # The first stray category of a use is enough to name it (not one violation per entry).
            stray = next((i for i, c in enumerate(use.data_categories) if c not in purpose_categories), None)
            if stray is not None:
                violations.add(
                    f"purpose.data_uses[{index}].data_categories[{stray}]",
                    "must be one of the purpose's categories",
                )
        validity = None
        if given.HasField("consent_validity"):
            seconds = seconds_from(
                given.consent_validity,
                "purpose.consent_validity",
                at_least=1,
                at_most=MAX_CONSENT_VALIDITY_SECONDS,
                bounds="must be from 1 second to 100 years",
                violations=violations,
            )
            validity = None if seconds is None else int(seconds)
        violations.raise_if_any()
        recorder = self._recorder(request.request_id)
        purpose = Purpose(
            name=given.name,
            display_name=given.display_name,
            description=given.description,
            data_categories=list(dict.fromkeys(given.data_categories)),
            data_uses=[DataUse(u.service, list(u.data_categories), u.description) for u in given.data_uses],
            consent_validity_seconds=validity,
            created_at_us=recorder.now_us,
        )

        def create(connection: Connection) -> bytes:
            known = set(Vocabulary.load(connection).categories)
            stored = insert_purpose(connection, purpose, known)
            audit.append_entry(
                connection,
                ref_key=self.audit_key,
                actor=recorder.actor,
                action=pb.AUDIT_ACTION_PURPOSE_CREATED,
                customer_id="",
                request_id=recorder.request_id,
                details={"purpose": stored.name},
                now_us=recorder.now_us,
            )
            return pb.CreatePurposeResponse(purpose=purpose_message(stored)).SerializeToString()

        response = await self._create_once("CreatePurpose", request, create)
        await self.reload_vocabulary()
        return pb.CreatePurposeResponse.FromString(response)

    # Notices ----------------------------------------------------------------------------

    async def CreatePrivacyNotice(
        self, request: pb.CreatePrivacyNoticeRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        notice = request.notice
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        self.vocabulary.check_purpose(violations, "notice.purpose", notice.purpose)
        if not notice.text and not notice.url:
            violations.add("notice.text", "text or url is required")
        violations.limit_text("notice.text", notice.text, MAX_NOTICE_TEXT)
        if notice.url and not notice.url.startswith("https://"):
            violations.add("notice.url", "must be an https URL")
        violations.limit_text("notice.url", notice.url, 2048)
        violations.limit_text("notice.change_summary", notice.change_summary, 2000)
        violations.limit_text("notice.language_code", notice.language_code, 35)
        recorder = self._recorder(request.request_id)
        effective = recorder.now_us
        if notice.HasField("effective_time"):
            effective = (
                micros_from(
                    notice.effective_time,
                    "notice.effective_time",
                    # A minute of leeway for the caller's clock.
                    not_before=recorder.now_us - 60_000_000,
                    not_after=recorder.now_us + MAX_NOTICE_LEAD_US,
                    bounds="must not lie in the past, nor more than 5 years ahead",
                    violations=violations,
                )
                or recorder.now_us
            )
        violations.raise_if_any()

        def create(connection: Connection) -> bytes:
            schedule = NoticeSchedule.load(connection, notice.purpose)
            latest = schedule.latest()
            if latest is not None and effective < latest.effective_at_us:
                raise InvalidArgument(
                    "notice.effective_time", "must not be before the previous version's effective_time"
                )
            version = (latest.version if latest else 0) + 1
            connection.execute(
                notices.insert().values(
                    purpose=notice.purpose,
                    version=version,
                    text=notice.text,
                    url=notice.url,
                    material=notice.material,
                    effective_at_us=effective,
                    language_code=notice.language_code or "en",
                    change_summary=notice.change_summary,
                    created_at_us=recorder.now_us,
                )
            )
            revision = 0
            if notice.material:
                revision = allocate_revision(connection)
                insert_change(
                    connection,
                    pb.ConsentChange(
                        revision=revision,
                        kind=pb.CONSENT_CHANGE_KIND_NOTICE,
                        purpose=notice.purpose,
                        status=pb.CONSENT_STATUS_NEEDS_RENEWAL,
                        notice_version=version,
                        change_time=timestamp_of(recorder.now_us),
                        effective_time=timestamp_of(effective),
                    ),
                )
            audit.append_entry(
                connection,
                ref_key=self.audit_key,
                actor=recorder.actor,
                action=pb.AUDIT_ACTION_PRIVACY_NOTICE_CREATED,
                customer_id="",
                request_id=recorder.request_id,
                details={
                    "purpose": notice.purpose,
                    "version": version,
                    "material": notice.material,
                    "revision": revision,
                },
                now_us=recorder.now_us,
            )
            row = connection.execute(
                sa.select(notices).where(notices.c.purpose == notice.purpose, notices.c.version == version)
            ).one()
            return pb.CreatePrivacyNoticeResponse(
                notice=notice_of(row), revision=revision
            ).SerializeToString()

        response = pb.CreatePrivacyNoticeResponse.FromString(
            await self._create_once("CreatePrivacyNotice", request, create)
        )
        await self.feed.refresh()
        return response

    async def GetPrivacyNotice(
        self, request: pb.GetPrivacyNoticeRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        self.vocabulary.check_purpose(violations, "purpose", request.purpose)
        violations.require_count("version", request.version)
        violations.raise_if_any()
        now = now_micros()

        def get(connection: Connection) -> pb.PrivacyNotice:
            version = request.version or NoticeSchedule.load(connection, request.purpose).in_effect(now)
            row = connection.execute(
                sa.select(notices).where(notices.c.purpose == request.purpose, notices.c.version == version)
            ).first()
            if row is None:
                raise NotFound(
                    f"{request.purpose} has no notice version {request.version or 'in effect'}",
                    reason="NOTICE_NOT_FOUND",
                )
            return notice_of(row)

        return pb.GetPrivacyNoticeResponse(notice=await self.db.read(get))

    async def ListPrivacyNotices(
        self, request: pb.ListPrivacyNoticesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        if request.purpose:
            self.vocabulary.check_purpose(violations, "purpose", request.purpose)
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        filters = {"purpose": request.purpose}
        position = self.pages.read("ListPrivacyNotices", request.page_token, filters, (str, int))

        def page(connection: Connection) -> list[sa.Row]:
            query = sa.select(notices)
            if request.purpose:
                query = query.where(notices.c.purpose == request.purpose)
            if position:
                query = query.where(
                    sa.or_(
                        notices.c.purpose > position[0],
                        sa.and_(notices.c.purpose == position[0], notices.c.version < position[1]),
                    )
                )
            return list(
                connection.execute(query.order_by(notices.c.purpose, notices.c.version.desc()).limit(size))
            )

        rows = await self.db.read(page)
        token = (
            self.pages.issue("ListPrivacyNotices", filters, (rows[-1].purpose, rows[-1].version))
            if len(rows) == size
            else ""
        )
        return pb.ListPrivacyNoticesResponse(notices=[notice_of(r) for r in rows], next_page_token=token)

    # Decisions --------------------------------------------------------------------------

    async def _decide(
        self,
        rpc: str,
        customer_id: str,
        decisions: list[DecisionInput],
        method: int,
        jurisdiction: str,
        request: Message,
        fields: Callable[[int], str],
    ) -> tuple[list[pb.PurposeConsent], pb.ConsentReceipt]:
        violations = Violations()
        request_id = request.request_id  # type: ignore[attr-defined]
        check_common(violations, customer_id, method, jurisdiction, request_id)
        recorder = self._recorder(request_id)

        def carry_out(connection: Connection) -> bytes:
            for index, decision in enumerate(decisions):
                check_decision(connection, violations, fields(index), decision, recorder.now_us)
            violations.raise_if_any()
            after, receipt = record_decisions(
                connection, recorder, customer_id, decisions, method, jurisdiction
            )
            return pb.SetConsentsResponse(consents=after, receipt=receipt).SerializeToString()

        violations.raise_if_any()
        result = pb.SetConsentsResponse.FromString(
            await self._create_once(rpc, request, carry_out, customer_id)
        )
        await self.feed.refresh()
        return list(result.consents), result.receipt

    async def GrantConsent(self, request: pb.GrantConsentRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        expiry = _expiry(request, "expire_time", violations)
        violations.raise_if_any()
        decision = DecisionInput(
            request.purpose, True, tuple(request.data_categories), request.notice_version, expiry
        )
        after, receipt = await self._decide(
            "GrantConsent",
            request.customer_id,
            [decision],
            request.collection_method,
            request.jurisdiction,
            request,
            lambda _: "",
        )
        return pb.GrantConsentResponse(consent=after[0], receipt=receipt)

    async def WithdrawConsent(
        self, request: pb.WithdrawConsentRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        decision = DecisionInput(request.purpose, False, tuple(request.data_categories))
        after, receipt = await self._decide(
            "WithdrawConsent",
            request.customer_id,
            [decision],
            request.collection_method,
            request.jurisdiction,
            request,
            lambda _: "",
        )
        return pb.WithdrawConsentResponse(consent=after[0], receipt=receipt)

    async def SetConsents(self, request: pb.SetConsentsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        if not 1 <= len(request.decisions) <= MAX_DECISIONS:
            violations.add("decisions", f"must hold 1 to {MAX_DECISIONS} decisions")
        seen: set[str] = set()
        for index, given in enumerate(request.decisions):
            if given.decision not in (pb.CONSENT_DECISION_GRANTED, pb.CONSENT_DECISION_WITHDRAWN):
                violations.add(f"decisions[{index}].decision", "must be GRANTED or WITHDRAWN")
            if given.purpose in seen:
                violations.add(f"decisions[{index}].purpose", "is decided twice")
            seen.add(given.purpose)
        expiries = [
            _expiry(d, f"decisions[{index}].expire_time", violations)
            for index, d in enumerate(request.decisions)
        ]
        violations.raise_if_any()
        decisions = [
            DecisionInput(
                d.purpose,
                d.decision == pb.CONSENT_DECISION_GRANTED,
                tuple(d.data_categories),
                d.notice_version,
                expiry,
            )
            for d, expiry in zip(request.decisions, expiries, strict=True)
        ]
        after, receipt = await self._decide(
            "SetConsents",
            request.customer_id,
            decisions,
            request.collection_method,
            request.jurisdiction,
            request,
            lambda index: f"decisions[{index}].",
        )
        return pb.SetConsentsResponse(consents=after, receipt=receipt)

    # Reading consent ----------------------------------------------------------------------

    async def GetConsentState(
        self, request: pb.GetConsentStateRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id)
        for index, name in enumerate(request.purposes):
            self.vocabulary.check_purpose(violations, f"purposes[{index}]", name)
        violations.raise_if_any()
        wanted = sorted(set(request.purposes) or set(self.vocabulary.purposes))
        now = now_micros()

        def read(connection: Connection) -> pb.GetConsentStateResponse:
            revision = current_revision(connection)
            states = [
                purpose_consent(
                    current_row(connection, request.customer_id, name),
                    name,
                    NoticeSchedule.load(connection, name),
                    now,
                )
                for name in wanted
            ]
            return pb.GetConsentStateResponse(
                customer_id=request.customer_id, consents=states, revision=revision
            )

        return await self.db.read(read)

    async def ListConsentHistory(
        self, request: pb.ListConsentHistoryRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id)
        if request.purpose:
            self.vocabulary.check_purpose(violations, "purpose", request.purpose)
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        filters = {"customer_id": request.customer_id, "purpose": request.purpose}
        position = self.pages.read("ListConsentHistory", request.page_token, filters, (int,))

        def page(connection: Connection) -> list[sa.Row]:
            query = sa.select(consent_history).where(consent_history.c.customer_id == request.customer_id)
            if request.purpose:
                query = query.where(consent_history.c.purpose == request.purpose)
            if position:
                query = query.where(consent_history.c.revision < position[0])
            return list(connection.execute(query.order_by(consent_history.c.revision.desc()).limit(size)))

        rows = await self.db.read(page)
        return pb.ListConsentHistoryResponse(
            records=[_history_record(r) for r in rows],
            next_page_token=(
                self.pages.issue("ListConsentHistory", filters, (rows[-1].revision,))
                if len(rows) == size
                else ""
            ),
        )

    def _checked(
        self, violations: Violations, prefix: str, customer_id: str, purpose: str, categories: Any
    ) -> None:
        violations.require_id(f"{prefix}customer_id", customer_id)
        self.vocabulary.check_purpose(violations, f"{prefix}purpose", purpose)
        self.vocabulary.check_categories(violations, f"{prefix}data_categories", categories)

    def _check_is_valid(self, customer_id: str, purpose: str, categories: Any) -> bool:
        """True exactly when _checked would find nothing: the usual case, decided without
        collecting violations (on False, _checked runs and says what is wrong)."""
        vocabulary = self.vocabulary
        if purpose not in vocabulary.purposes or not is_valid_id(customer_id):
            return False
        known = vocabulary.categories
        for name in categories:
            if name not in known:
                return False
        return True

    async def CheckConsent(self, request: pb.CheckConsentRequest, context: grpc.aio.ServicerContext) -> Any:
        customer_id, purpose = request.customer_id, request.purpose
        categories = request.data_categories  # decide() copies it once: no tuple of our own
        if not self._check_is_valid(customer_id, purpose, categories):
            violations = Violations()
            self._checked(violations, "", customer_id, purpose, categories)
            violations.raise_if_any()
        allowed, _, reason, granted, denied, revision, expires_at_us = self.feed.index.decide(
            customer_id, purpose, categories, now_micros()
        )
        response = pb.CheckConsentResponse(
            allowed=allowed,
            allowed_data_categories=granted,
            reason=reason,  # type: ignore[arg-type]
            decided_at_revision=revision,
        )
        if denied:
            response.denied_data_categories.extend(denied)
        if expires_at_us is not None:
            # Set directly: Timestamp.FromMicroseconds is Python and costs about twice as much.
            seconds, micros = divmod(expires_at_us, 1_000_000)
            expire_time = response.expire_time
            expire_time.seconds = seconds
            expire_time.nanos = micros * 1_000
        return response

    async def BatchCheckConsent(
        self, request: pb.BatchCheckConsentRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        if not 1 <= len(request.checks) <= MAX_BATCH_CHECKS:
            violations.add("checks", f"must hold 1 to {MAX_BATCH_CHECKS} checks")
        for position, check in enumerate(request.checks):
            self._checked(
                violations, f"checks[{position}].", check.customer_id, check.purpose, check.data_categories
            )
        violations.raise_if_any()
        now = now_micros()
        index = self.feed.index  # one index, one revision, no await in between: a consistent answer
        results = []
        for check in request.checks:
            decision = index.check(check.customer_id, check.purpose, check.data_categories, now)
            results.append(
                pb.ConsentCheckResult(
                    customer_id=check.customer_id,
                    purpose=check.purpose,
                    allowed=decision.allowed,
                    allowed_data_categories=decision.allowed_categories,
                    denied_data_categories=decision.denied_categories,
                    reason=decision.reason,  # type: ignore[arg-type]
                    decided_at_revision=decision.revision,
                    expire_time=timestamp_of(decision.expires_at_us),
                )
            )
        return pb.BatchCheckConsentResponse(results=results, revision=index.revision)

    async def ExplainDataUse(
        self, request: pb.ExplainDataUseRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id)
        violations.raise_if_any()
        now = now_micros()
        vocabulary = self.vocabulary

        def explain(connection: Connection) -> pb.ExplainDataUseResponse:
            revision = current_revision(connection)
            explanations = []
            for name in sorted(vocabulary.purposes):
                purpose = vocabulary.purposes[name]
                schedule = NoticeSchedule.load(connection, name)
                state = purpose_consent(
                    current_row(connection, request.customer_id, name), name, schedule, now
                )
                allowed = state.status == pb.CONSENT_STATUS_GRANTED
                usable = set(state.granted_data_categories) if allowed else set()
                uses = [
                    pb.ServiceDataUse(
                        service=u.service,
                        data_categories=[c for c in u.data_categories if c in usable],
                        description=u.description,
                    )
                    for u in purpose.data_uses
                    if usable & set(u.data_categories)
                ]
                explanations.append(
                    pb.DataUseExplanation(
                        purpose=name,
                        display_name=purpose.display_name,
                        description=purpose.description,
                        allowed=allowed,
                        status=state.status,
                        data_categories=[
                            data_category_message(vocabulary.categories[c])
                            for c in sorted(usable)
                            if c in vocabulary.categories
                        ],
                        data_uses=uses,
                        notice_version=state.notice_version,
                        notice_url=schedule.url_of(state.notice_version),
                        expire_time=state.expire_time if allowed and state.HasField("expire_time") else None,
                    )
                )
            return pb.ExplainDataUseResponse(
                customer_id=request.customer_id, purposes=explanations, revision=revision
            )

        return await self.db.read(explain)

    # Receipts and audit ---------------------------------------------------------------------

    async def GetConsentReceipt(
        self, request: pb.GetConsentReceiptRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("receipt_id", request.receipt_id)
        violations.raise_if_any()

        def get(connection: Connection) -> sa.Row | None:
            return connection.execute(
                sa.select(receipts).where(receipts.c.receipt_id == request.receipt_id)
            ).first()

        row = await self.db.read(get)
        if row is None:
            raise NotFound(f"receipt {request.receipt_id} not found", reason="RECEIPT_NOT_FOUND")
        return pb.GetConsentReceiptResponse(
            receipt=receipt_from_stored(row.payload, row.signature, row.key_id)
        )

    async def VerifyReceipt(self, request: pb.VerifyReceiptRequest, context: grpc.aio.ServicerContext) -> Any:
        if not request.HasField("receipt"):
            raise InvalidArgument("receipt", "is required")
        return self.signer.verify(request.receipt)

    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        if request.customer_id:
            violations.require_id("customer_id", request.customer_id)
        violations.require_count("start_sequence", request.start_sequence)
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        filters = {"customer_id": request.customer_id, "start_sequence": request.start_sequence}
        position = self.pages.read("ListAuditEntries", request.page_token, filters, (int,))
        start = int(position[0]) if position else request.start_sequence
        ref = audit.customer_ref(self.audit_key, request.customer_id) if request.customer_id else None
        entries = await self.db.read(
            lambda c: audit.list_entries(c, customer_ref=ref, start_sequence=start, limit=size)
        )
        return pb.ListAuditEntriesResponse(
            entries=entries,
            next_page_token=(
                self.pages.issue("ListAuditEntries", filters, (entries[-1].sequence + 1,))
                if len(entries) == size
                else ""
            ),
        )

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_count("start_sequence", request.start_sequence)
        if request.end_sequence < 0 or (
            request.end_sequence and request.end_sequence < request.start_sequence
        ):
            violations.add("end_sequence", "must be 0 (to the end) or at least start_sequence")
        violations.raise_if_any()
        return await self.db.read(
            lambda c: audit.verify_chain(c, request.start_sequence, request.end_sequence)
        )

    # Change feed --------------------------------------------------------------------------

    def _feed_filter(self, request: Any) -> frozenset[str]:
        violations = Violations()
        violations.require_count("since_revision", request.since_revision)
        for index, name in enumerate(request.purposes):
            if name not in self.vocabulary.purposes:
                violations.add(f"purposes[{index}]", "is not a known purpose")
        violations.raise_if_any()
        if request.since_revision > self.feed.revision:
            raise OutOfRange(
                f"since_revision {request.since_revision} is ahead of the current revision {self.feed.revision}",
                reason="REVISION_AHEAD",
            )
        return frozenset(request.purposes)

    async def ListConsentChanges(
        self, request: pb.ListConsentChangesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        purposes = self._feed_filter(request)
        size = page_size_of(request.page_size)
        filters = {"since_revision": request.since_revision, "purposes": sorted(purposes)}
        position = self.pages.read("ListConsentChanges", request.page_token, filters, (int,))
        since = int(position[0]) if position else request.since_revision

        def page(connection: Connection) -> tuple[list[pb.ConsentChange], int]:
            return changes_after(connection, since, size, purposes), current_revision(connection)

        found, head = await self.db.read(page)
        return pb.ListConsentChangesResponse(
            changes=found,
            next_page_token=(
                self.pages.issue("ListConsentChanges", filters, (found[-1].revision,))
                if len(found) == size
                else ""
            ),
            current_revision=head,
        )

    async def WatchConsentChanges(
        self, request: pb.WatchConsentChangesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchConsentChangesResponse]:
        purposes = self._feed_filter(request)
        interval = (
            seconds_from(request.heartbeat_interval, "heartbeat_interval", at_least=1, at_most=60)
            if request.HasField("heartbeat_interval")
            else DEFAULT_HEARTBEAT_SECONDS
        )
        cursor = request.since_revision
        first = True
        restores = self.feed.restores
        while True:
            # A database restored behind what this stream sent: the caller rebuilds from 0.
            restores = self.feed.check_watch(cursor, restores, "REVISION_AHEAD", "rebuild from revision 0")
            # Everything up to the feed's revision is committed; send what matches, then a heartbeat.
            head = self.feed.revision
            sent = False
            while True:
                page = await self.db.read(
                    functools.partial(
                        changes_after, since_revision=cursor, limit=1000, purposes_filter=purposes
                    )
                )
                for change in page:
                    yield pb.WatchConsentChangesResponse(change=change)
                    cursor = max(cursor, change.revision)
                    sent = True
                if len(page) < 1000:
                    break
            cursor = max(cursor, head)
            if first or not sent:
                yield pb.WatchConsentChangesResponse(
                    heartbeat=pb.WatchHeartbeat(current_revision=cursor, send_time=timestamp_of(now_micros()))
                )
            first = False
            await self.feed.wait_beyond(cursor, interval)
            if self.feed.closing:
                return  # the server is stopping: the caller watches again, from its last revision

    # Data-subject requests ------------------------------------------------------------------

    async def CreateDataSubjectRequest(
        self, request: pb.CreateDataSubjectRequestRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("customer_id", request.customer_id)
        if request.type not in (pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, pb.DATA_SUBJECT_REQUEST_TYPE_ERASE):
            violations.add("type", "must be EXPORT or ERASE")
        violations.require_request_id("request_id", request.request_id)
        violations.raise_if_any()
        created = await self.requests.create(current_principal(), request)
        return pb.CreateDataSubjectRequestResponse(data_subject_request=created)

    async def GetDataSubjectRequest(
        self, request: pb.GetDataSubjectRequestRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("data_subject_request_id", request.data_subject_request_id)
        violations.raise_if_any()
        found = await self.requests.get(current_principal(), request.data_subject_request_id)
        return pb.GetDataSubjectRequestResponse(data_subject_request=found)

    async def ListDataSubjectRequests(
        self, request: pb.ListDataSubjectRequestsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        if request.customer_id:
            violations.require_id("customer_id", request.customer_id)
        if request.type not in pb.DataSubjectRequestType.values():
            violations.add("type", "is not a DataSubjectRequestType")
        if request.state not in pb.DataSubjectRequestState.values():
            violations.add("state", "is not a DataSubjectRequestState")
        violations.raise_if_any()
        size = page_size_of(request.page_size)
        filters = {"customer_id": request.customer_id, "type": request.type, "state": request.state}
        position = self.pages.read("ListDataSubjectRequests", request.page_token, filters, (int, str))
        after = (int(position[0]), str(position[1])) if position else None
        found = await self.requests.list(
            current_principal(), request.customer_id, request.type, request.state, after, size
        )
        token = ""
        if len(found) == size:
            last = found[-1]
            token = self.pages.issue(
                "ListDataSubjectRequests",
                filters,
                (micros_from(last.create_time, "create_time"), last.data_subject_request_id),
            )
        return pb.ListDataSubjectRequestsResponse(data_subject_requests=found, next_page_token=token)
