"""The consent decision, made locally from the change feed.

A ConsentIndex holds, per customer and purpose, the last decision of the consent
change feed (README, "Consent is enforced everywhere"), plus each purpose's material notice versions. It answers
"may this customer's data be used for this purpose and these categories?" with a
dictionary lookup. The consent service answers CheckConsent from one, and every other
service keeps one fed by list-then-watch (shared/consent_cache.py).

Validity needs no job to run: expiry and material notices are compared with the
clock at decision time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from najimi.consent.v1 import consent_service_pb2 as pb

GRANTED = pb.CONSENT_STATUS_GRANTED
WITHDRAWN = pb.CONSENT_STATUS_WITHDRAWN
EXPIRED = pb.CONSENT_STATUS_EXPIRED
NEEDS_RENEWAL = pb.CONSENT_STATUS_NEEDS_RENEWAL
NOT_GIVEN = pb.CONSENT_STATUS_NOT_GIVEN

REASON_OF_STATUS: dict[int, int] = {
    WITHDRAWN: pb.CONSENT_CHECK_REASON_WITHDRAWN,
    EXPIRED: pb.CONSENT_CHECK_REASON_EXPIRED,
    NEEDS_RENEWAL: pb.CONSENT_CHECK_REASON_NEEDS_RENEWAL,
    NOT_GIVEN: pb.CONSENT_CHECK_REASON_NOT_GIVEN,
}


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """The last decision of one customer on one purpose."""

    granted: bool
    categories: frozenset[str]
    notice_version: int
    expires_at_us: int | None
    revision: int
    changed_at_us: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int
    reason: int
    allowed_categories: tuple[str, ...]
    denied_categories: tuple[str, ...]
    revision: int
    expires_at_us: int | None


def _newest_in_effect(material: Iterable[tuple[int, int]], now_us: int) -> int:
    """The newest version among (effective_at_us, version) notices in effect at `now_us` (0: none)."""
    return max((version for effective, version in material if effective <= now_us), default=0)


class ConsentIndex:
    def __init__(self) -> None:
        self._records: dict[str, dict[str, ConsentRecord]] = {}
        # purpose -> [(effective_at_us, material version)], in revision order
        self._material: dict[str, list[tuple[int, int]]] = {}
        # revision -> customer of each record, so an ERASURE change (which names the
        # customer by a pseudonym only) finds the records its erased_revisions set.
        self._customer_of_revision: dict[int, str] = {}
        self.revision = 0

    def apply(self, change: pb.ConsentChange) -> None:
        """Applies one feed entry; entries at or below the current revision are ignored."""
        if change.revision and change.revision <= self.revision:
            return
        kind = change.kind
        if kind in (pb.CONSENT_CHANGE_KIND_CONSENT, pb.CONSENT_CHANGE_KIND_EXPIRED):
            expires = change.expire_time.ToMicroseconds() if change.HasField("expire_time") else None
            self.put(
                change.customer_id,
                change.purpose,
                ConsentRecord(
                    granted=change.status in (GRANTED, EXPIRED, NEEDS_RENEWAL),
                    categories=frozenset(change.granted_data_categories),
                    notice_version=change.notice_version,
                    expires_at_us=expires,
                    revision=change.revision,
                    changed_at_us=change.change_time.ToMicroseconds(),
                ),
            )
        elif kind == pb.CONSENT_CHANGE_KIND_NOTICE:
            effective = (
                change.effective_time.ToMicroseconds()
                if change.HasField("effective_time")
                else change.change_time.ToMicroseconds()
            )
            self._material.setdefault(change.purpose, []).append((effective, change.notice_version))
        elif kind == pb.CONSENT_CHANGE_KIND_ERASURE:
            self._drop(change.customer_id)  # a change from before erasures were pseudonymous
            for erased in change.erased_revisions:
                customer_id = self._customer_of_revision.get(erased)
                if customer_id is not None:
                    self._drop(customer_id)
        self.revision = max(self.revision, change.revision)

    def put(self, customer_id: str, purpose: str, record: ConsentRecord) -> None:
        """Sets a record (from the feed, or loading an index from stored state)."""
        purposes = self._records.setdefault(customer_id, {})
        replaced = purposes.get(purpose)
        if replaced is not None:
            self._customer_of_revision.pop(replaced.revision, None)
        purposes[purpose] = record
        self._customer_of_revision[record.revision] = customer_id

    def _drop(self, customer_id: str) -> None:
        for record in self._records.pop(customer_id, {}).values():
            self._customer_of_revision.pop(record.revision, None)

    def add_material_notice(self, purpose: str, effective_at_us: int, version: int) -> None:
        self._material.setdefault(purpose, []).append((effective_at_us, version))

    def apply_all(self, changes: Iterable[pb.ConsentChange]) -> None:
        for change in changes:
            self.apply(change)

    def record(self, customer_id: str, purpose: str) -> ConsentRecord | None:
        return self._records.get(customer_id, {}).get(purpose)

    def purposes_of(self, customer_id: str) -> dict[str, ConsentRecord]:
        return dict(self._records.get(customer_id, {}))

    def material_version(self, purpose: str, now_us: int) -> int:
        """The newest material notice version of `purpose` in effect at `now_us` (0: none)."""
        return _newest_in_effect(self._material.get(purpose, ()), now_us)

    def pending_material(self, purpose: str, now_us: int) -> tuple[int, int] | None:
        """The earliest (effective_at_us, version) of a material notice not yet in effect."""
        pending = [(effective, v) for effective, v in self._material.get(purpose, ()) if effective > now_us]
        return min(pending, default=None)

    def status(self, record: ConsentRecord | None, purpose: str, now_us: int) -> int:
        """WITHDRAWN, EXPIRED, NEEDS_RENEWAL (first that applies), else GRANTED; NOT_GIVEN if none."""
        if record is None:
            return NOT_GIVEN
        if not record.granted:
            return WITHDRAWN
        if record.expires_at_us is not None and record.expires_at_us <= now_us:
            return EXPIRED
        material = self._material.get(purpose)  # most purposes have none: no generator to run
        if record.notice_version < (_newest_in_effect(material, now_us) if material else 0):
            return NEEDS_RENEWAL
        return GRANTED

    def collection_allowed(self, customer_id: str, category: str, now_us: int) -> bool:
        """May data of `category` be collected at all: does any valid consent grant it?"""
        for purpose, record in self._records.get(customer_id, {}).items():
            if category in record.categories and self.status(record, purpose, now_us) == GRANTED:
                return True
        return False

    def check(self, customer_id: str, purpose: str, categories: Iterable[str], now_us: int) -> Decision:
        """May the customer's data of `categories` be used for `purpose` at `now_us`?"""
        return Decision(*self.decide(customer_id, purpose, categories, now_us))

    def decide(
        self, customer_id: str, purpose: str, categories: Iterable[str], now_us: int
    ) -> tuple[bool, int, int, tuple[str, ...], tuple[str, ...], int, int | None]:
        """check() as a plain tuple in Decision's field order, for a hot path that only reads it."""
        purposes = self._records.get(customer_id)
        record = purposes.get(purpose) if purposes is not None else None
        asked = tuple(categories)
        if len(asked) > 1:
            asked = tuple(dict.fromkeys(asked))  # each category once, in the order asked
        status = self.status(record, purpose, now_us)
        if status != GRANTED or record is None:
            return False, status, REASON_OF_STATUS[status], (), asked, self.revision, None
        granted = record.categories
        if not asked:
            allowed = tuple(sorted(granted))
            return (
                True,
                status,
                pb.CONSENT_CHECK_REASON_ALLOWED,
                allowed,
                (),
                self.revision,
                record.expires_at_us,
            )
        if granted.issuperset(asked):  # the usual answer: everything asked is granted
            return (
                True,
                status,
                pb.CONSENT_CHECK_REASON_ALLOWED,
                asked,
                (),
                self.revision,
                record.expires_at_us,
            )
        return (
            False,
            status,
            pb.CONSENT_CHECK_REASON_CATEGORY_NOT_GRANTED,
            tuple(c for c in asked if c in granted),
            tuple(c for c in asked if c not in granted),
            self.revision,
            record.expires_at_us,
        )
