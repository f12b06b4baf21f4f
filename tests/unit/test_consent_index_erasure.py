"""An ERASURE change names a pseudonym: a ConsentIndex finds the customer by revision."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as pb

from shared.consent_index import ConsentIndex

NOW = timestamp_pb2.Timestamp(seconds=1_800_000_000)


def _grant(revision: int, customer_id: str, purpose: str) -> pb.ConsentChange:
    return pb.ConsentChange(
        revision=revision,
        kind=pb.CONSENT_CHANGE_KIND_CONSENT,
        customer_id=customer_id,
        purpose=purpose,
        status=pb.CONSENT_STATUS_GRANTED,
        granted_data_categories=["user.behavior.purchase_history"],
        notice_version=1,
        change_time=NOW,
    )


def _erasure(revision: int, erased_revisions: list[int]) -> pb.ConsentChange:
    return pb.ConsentChange(
        revision=revision,
        kind=pb.CONSENT_CHANGE_KIND_ERASURE,
        customer_id="erased:" + "ab" * 32,
        status=pb.CONSENT_STATUS_NOT_GIVEN,
        change_time=NOW,
        erased_revisions=erased_revisions,
    )


def test_an_erasure_drops_the_customer_whose_records_its_revisions_set():
    index = ConsentIndex()
    index.apply_all(
        [_grant(1, "c-1", "analytics"), _grant(2, "c-2", "analytics"), _grant(3, "c-1", "marketing")]
    )
    index.apply(_grant(4, "c-1", "analytics"))  # replaces revision 1
    index.apply(_erasure(5, [1, 3, 4]))
    assert index.purposes_of("c-1") == {} and set(index.purposes_of("c-2")) == {"analytics"}
    assert index.revision == 5


def test_a_cache_that_missed_later_changes_still_drops_the_customer():
    # It applied revision 1 only; revisions 2 and 3 were removed from the feed by the erasure.
    index = ConsentIndex()
    index.apply(_grant(1, "c-1", "analytics"))
    index.apply(_erasure(4, [1, 2, 3]))
    assert index.purposes_of("c-1") == {}


def test_a_loaded_record_is_found_by_its_revision_too():
    index = ConsentIndex()
    index.apply(_grant(7, "c-1", "analytics"))
    index.put("c-1", "marketing", index.record("c-1", "analytics"))  # type: ignore[arg-type]
    index.apply(_erasure(8, [7]))
    assert index.purposes_of("c-1") == {}
