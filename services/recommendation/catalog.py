"""The item catalog's rules: what a valid item is, how categories match, what an upsert did.

Limits are those documented on `Item` and `UpsertItemsRequest` in
recommendation_service.proto; every violation names its field, e.g.
"items[3].category_path[1]".
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.validation import MAX_MONEY_MICROS, MONEY_RANGE, NUL, Violations

MAX_BATCH_ITEMS = 1000
MAX_TITLE = 256
MAX_CATEGORY_SEGMENTS = 8
MAX_CATEGORY_SEGMENT = 128
MAX_BRAND = 128
MAX_TAGS = 32
MAX_TAG = 64
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_VALUE = 1024
CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")
CATEGORY_SEPARATOR = "/"
# Each violation travels twice in the error's trailers (message and BadRequest), and gRPC
# clients refuse trailers over 8 KiB by default: past this many bytes of violations, a


@dataclass(frozen=True)
class Item:
    """One catalog item; the two times are set by the store (microseconds since the epoch)."""

    item_id: str
    title: str
    category_path: tuple[str, ...] = ()
    brand: str = ""
    price_micros: int = 0
    currency_code: str = ""
    tags: tuple[str, ...] = ()
    available: bool = False
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    create_time_us: int = 0
    update_time_us: int = 0

    def same_content(self, other: Item) -> bool:
        """True when the two differ at most in their times: what GetItem returns is the same."""
        return dataclasses.replace(self, create_time_us=0, update_time_us=0) == dataclasses.replace(
            other, create_time_us=0, update_time_us=0
        )


class Outcome(enum.Enum):
    CREATED = "CREATED"
    UPDATED = "UPDATED"
    UNCHANGED = "UNCHANGED"


@dataclass(frozen=True)
class UpsertResult:
    item_id: str
    outcome: Outcome
    update_time_us: int


def outcome_of(existing: Item | None, sent: Item) -> Outcome:
    if existing is None:
        return Outcome.CREATED
    return Outcome.UNCHANGED if existing.same_content(sent) else Outcome.UPDATED


def category_key(path: Sequence[str]) -> str:
    """The stored form of a category path, "grocery/coffee/beans/", which a prefix matches
    whole segments of by plain string comparison ("grocery/coffee/" is not a prefix of
    "grocery/coffee-machines/")."""
    return "".join(segment + CATEGORY_SEPARATOR for segment in path)


def check_upsert(items: Sequence[Item], violations: Violations) -> None:
    """Every reason the batch may not be written, in request order."""
    if not items:
        violations.add("items", f"must hold 1 to {MAX_BATCH_ITEMS} items")
        return
    if len(items) > MAX_BATCH_ITEMS:
        # Listing the faults of thousands of items would only bury this one.
        violations.add("items", f"must hold at most {MAX_BATCH_ITEMS} items, not {len(items)}")
        return
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        check_item(f"items[{index}]", item, violations)
        if item.item_id in first_index:
            violations.add(
                f"items[{index}].item_id", f"duplicates items[{first_index[item.item_id]}].item_id"
            )
        else:
            first_index[item.item_id] = index


def _check_free_text(
    violations: Violations, field: str, value: str, min_length: int, max_length: int
) -> None:
    if len(value) < min_length:
        violations.add(
            field, "is required" if min_length == 1 else f"must be at least {min_length} characters"
        )
    elif len(value) > max_length:
        violations.add(field, f"must be at most {max_length} characters")
    elif NUL in value:
        violations.add(field, "must not contain NUL characters")


def check_item(prefix: str, item: Item, violations: Violations) -> None:
    violations.require_id(f"{prefix}.item_id", item.item_id)

    if not item.title.strip():
        violations.add(f"{prefix}.title", "is required")
    else:
        _check_free_text(violations, f"{prefix}.title", item.title, 1, MAX_TITLE)

    if len(item.category_path) > MAX_CATEGORY_SEGMENTS:
        violations.add(f"{prefix}.category_path", f"must hold at most {MAX_CATEGORY_SEGMENTS} segments")
    for index, segment in enumerate(item.category_path):
        field = f"{prefix}.category_path[{index}]"
        _check_free_text(violations, field, segment, 1, MAX_CATEGORY_SEGMENT)
        if CATEGORY_SEPARATOR in segment:
            violations.add(field, f'must not contain "{CATEGORY_SEPARATOR}"')

    _check_free_text(violations, f"{prefix}.brand", item.brand, 0, MAX_BRAND)

    violations.require_range(f"{prefix}.price_micros", item.price_micros, 0, MAX_MONEY_MICROS, MONEY_RANGE)
    if item.currency_code and not CURRENCY_CODE.match(item.currency_code):
        violations.add(
            f"{prefix}.currency_code", "must be an ISO 4217 code of three capital letters, e.g. EUR"
        )
    elif item.price_micros > 0 and not item.currency_code:
        violations.add(f"{prefix}.currency_code", "is required when price_micros is greater than 0")

    if len(item.tags) > MAX_TAGS:
        violations.add(f"{prefix}.tags", f"must hold at most {MAX_TAGS} tags")
    seen_tags: dict[str, int] = {}
    for index, tag in enumerate(item.tags):
        field = f"{prefix}.tags[{index}]"
        _check_free_text(violations, field, tag, 1, MAX_TAG)
        folded = tag.casefold()
        if folded in seen_tags:
            violations.add(
                field, f"duplicates tags[{seen_tags[folded]}] (tags are compared case-insensitively)"
            )
        else:
            seen_tags[folded] = index

    if len(item.attributes) > MAX_ATTRIBUTES:
        violations.add(f"{prefix}.attributes", f"must hold at most {MAX_ATTRIBUTES} entries")
    for key in sorted(item.attributes):
        if not key:
            violations.add(f"{prefix}.attributes", "keys must not be empty")
        elif len(key) > MAX_ATTRIBUTE_KEY:
            violations.add(
                f"{prefix}.attributes", f"key {key[:20]!r}... must be at most {MAX_ATTRIBUTE_KEY} characters"
            )
        elif NUL in key:
            violations.add(f"{prefix}.attributes", "keys must not contain NUL characters")
        else:
            _check_free_text(
                violations, f'{prefix}.attributes["{key}"]', item.attributes[key], 0, MAX_ATTRIBUTE_VALUE
            )


def parse_category_prefix(field: str, text: str, violations: Violations) -> tuple[str, ...]:
    """The segments of a prefix such as "grocery/coffee"; empty text is no prefix at all."""
    if not text:
        return ()
    segments = tuple(text.split(CATEGORY_SEPARATOR))
    if len(segments) > MAX_CATEGORY_SEGMENTS:
        violations.add(field, f"must have at most {MAX_CATEGORY_SEGMENTS} segments")
    elif any(not s or len(s) > MAX_CATEGORY_SEGMENT or NUL in s for s in segments):
        violations.add(
            field,
            f'must be segments of 1 to {MAX_CATEGORY_SEGMENT} characters joined with "{CATEGORY_SEPARATOR}", '
            'e.g. "grocery/coffee"',
        )
    return segments
