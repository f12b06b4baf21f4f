"""Rules of the consent vocabulary: what a purpose or data category name may be."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.consent.store import DataCategory, Purpose, load_data_categories, load_purposes, purposes
from shared.errors import AlreadyExists, InvalidArgument
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


class Vocabulary:
    """The purposes and data categories, held in memory for checks on the hot path."""

    def __init__(self, purposes: Iterable[Purpose], categories: Iterable[DataCategory]):
        self.purposes = {p.name: p for p in purposes}
        self.categories = {c.name: c for c in categories}

    @classmethod
    def load(cls, connection: Connection) -> Vocabulary:
        return cls(load_purposes(connection), load_data_categories(connection))

    def check_purpose(self, violations: Violations, field: str, name: str) -> Purpose | None:
        purpose = self.purposes.get(name)
        if purpose is None:
            violations.add(field, "is required" if not name else "is not a known purpose")
        return purpose

    def check_categories(self, violations: Violations, field: str, names: Iterable[str]) -> None:
        for index, name in enumerate(names):
            if name not in self.categories:
                violations.add(f"{field}[{index}]", "is not a known data category")


def insert_purpose(connection: Connection, purpose: Purpose, known_categories: set[str]) -> Purpose:
    """Adds a purpose in the caller's transaction; ALREADY_EXISTS when the name is taken."""
    if connection.execute(sa.select(purposes.c.name).where(purposes.c.name == purpose.name)).first():
        raise AlreadyExists(f"purpose {purpose.name} already exists", reason="PURPOSE_EXISTS")
    unknown = [c for c in purpose.data_categories if c not in known_categories]
    if unknown:
        raise InvalidArgument(
            "purpose.data_categories", f"unknown: {', '.join(unknown)}", reason="UNKNOWN_DATA_CATEGORY"
        )
    connection.execute(
        purposes.insert().values(
            name=purpose.name,
            display_name=purpose.display_name,
            description=purpose.description,
            data_categories=json.dumps(purpose.data_categories),
            data_uses=json.dumps([u.__dict__ for u in purpose.data_uses]),
            consent_validity_seconds=purpose.consent_validity_seconds,
            created_at_us=purpose.created_at_us,
        )
    )
    return purpose
