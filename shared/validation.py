"""Checks on request fields shared by every service; each failure names its field."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from shared.errors import FieldViolation, InvalidArgument

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
RESOURCE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DEFAULT_PAGE_SIZE = 100
NUL = "\x00"
MAX_PAGE_SIZE = 1000
# What SQLite INTEGER and PostgreSQL BIGINT hold: any integer that reaches SQL stays inside.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# An amount of money in micros at most: a billion units of any currency. Sums of many
# such amounts (a customer's spend, an order's total) then stay far inside 64 bits.
MAX_MONEY_MICROS = 10**15
MONEY_RANGE = f"must be from 0 to {MAX_MONEY_MICROS} (a billion units)"


def is_valid_id(value: str, pattern: re.Pattern[str] = RESOURCE_ID) -> bool:
    """What Violations.require_id accepts (for a hot path that only collects on failure)."""
    return bool(value) and pattern.match(value) is not None


class Violations:
    """Collects every problem of one request, so the caller hears of all of them at once."""

    def __init__(self) -> None:
        self.found: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.found.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.found:
            raise InvalidArgument.of(self.found)

    def require_id(self, field: str, value: str, pattern: re.Pattern[str] = RESOURCE_ID) -> None:
        if not value:
            self.add(field, "is required")
        elif not is_valid_id(value, pattern):
            self.add(field, f"must match {pattern.pattern}")

    def require_request_id(self, field: str, value: str) -> None:
        self.require_id(field, value, REQUEST_ID)

    def require_text(self, field: str, value: str, max_length: int = 256) -> None:
        if not value.strip():
            self.add(field, "is required")
        else:
            self.limit_text(field, value, max_length)

    def limit_text(self, field: str, value: str, max_length: int = 256) -> None:
        if len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters")
        elif NUL in value:  # PostgreSQL text cannot hold it: refused here, not as a storage error
            self.add(field, "must not contain NUL characters")

    def require_range(
        self, field: str, value: float, lo: float, hi: float, description: str | None = None
    ) -> bool:
        """`value` is a number from `lo` to `hi` (a float: finite too); True when it is.
        `description` replaces the generic one (e.g. "must be 1 to 100, or 0 for 1")."""
        if isinstance(value, float) and not math.isfinite(value):
            self.add(field, description or f"must be a finite number from {lo} to {hi}")
            return False
        if not lo <= value <= hi:
            self.add(field, description or f"must be from {lo} to {hi}")
            return False
        return True

    def require_count(self, field: str, value: int, hi: int = INT64_MAX) -> bool:
        """A count, revision or position: 0 to `hi` (by default what a BIGINT holds)."""
        return self.require_range(field, value, 0, hi)

    def require_one_of(self, field: str, value: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        if value not in allowed:
            self.add(field, f"must be one of {', '.join(sorted(allowed))}")


def page_size_of(value: int, field: str = "page_size") -> int:
    """AIP-158: 0 means the default; 1..MAX_PAGE_SIZE as asked; anything else is invalid."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(field, f"must be between 0 and {MAX_PAGE_SIZE}")
    return value
