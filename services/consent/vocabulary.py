"""Rules of the consent vocabulary: what a purpose or data category name may be."""

from __future__ import annotations

import re

from shared.validation import Violations

# Dotted lowercase names after the fideslang taxonomy, e.g. "user.behavior.purchase_history".
VOCABULARY_NAME = re.compile(r"^(?=.{3,128}$)[a-z0-9_]+(\.[a-z0-9_]+)*$")


def check_vocabulary_name(violations: Violations, field: str, name: str) -> None:
    if not name:
        violations.add(field, "is required")
    elif not VOCABULARY_NAME.match(name):
        violations.add(field, "must be 3 to 128 characters: segments of [a-z0-9_] separated by single dots")


def check_labels(violations: Violations, prefix: str, display_name: str, description: str) -> None:
    violations.require_text(f"{prefix}.display_name", display_name, 200)
    violations.require_text(f"{prefix}.description", description, 2000)
