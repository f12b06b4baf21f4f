"""Rules shared by this service's free-text fields and the opaque ids other services own."""

from __future__ import annotations

import unicodedata

from shared.validation import Violations

OPAQUE_ID_MAX = 128  # customer_id and item_id: owned by profile and catalog, 1 to 128 characters


def check_text(violations: Violations, path: str, value: str, min_length: int, max_length: int) -> None:
    """`min_length` 1 makes the field required (blank counts as missing); control characters never pass."""
    if min_length and not value.strip():
        violations.add(path, "is required")
    elif len(value) > max_length:
        violations.add(path, f"must be at most {max_length} characters")
    elif any(unicodedata.category(c) == "Cc" for c in value):
        # PostgreSQL cannot store NUL, and no name or id of a device needs a control character.
        violations.add(path, "must not contain control characters")


def check_opaque_id(violations: Violations, path: str, value: str) -> None:
    check_text(violations, path, value, 1, OPAQUE_ID_MAX)
