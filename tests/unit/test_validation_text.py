"""Text checks every servicer uses: required, bounded, and free of NUL (PostgreSQL text
cannot hold it, so it is refused at the edge instead of failing in storage)."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.validation import Violations


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "is required"),
        ("   ", "is required"),
        ("x" * 9, "must be at most 8 characters"),
        ("a\x00b", "must not contain NUL characters"),
    ],
)
def test_require_text_names_the_field_and_the_problem(value: str, expected: str) -> None:
    violations = Violations()
    violations.require_text("reason", value, max_length=8)
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    assert [(v.field, v.description) for v in raised.value.violations] == [("reason", expected)]


def test_optional_text_may_be_empty_but_not_hold_nul() -> None:
    violations = Violations()
    violations.limit_text("note", "")
    violations.limit_text("note", "fine")
    violations.raise_if_any()
    violations.limit_text("note", "\x00")
    assert [v.description for v in violations.found] == ["must not contain NUL characters"]
