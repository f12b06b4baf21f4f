"""Rules of devices: what a registration may hold, device ids, and device authentication."""

from __future__ import annotations

import dataclasses
import enum
import hmac
import json
import re
import secrets
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.replenishment.slots import Slot, SlotSettings, settled_slot
from services.replenishment.text import check_opaque_id, check_text
from shared.auth import Principal, TokenResolver
from shared.errors import PermissionDenied
from shared.validation import Violations

KIND = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_SLOTS = 32
MAX_ATTRIBUTES = 32


class DeviceState(enum.Enum):
    ACTIVE = "ACTIVE"
    DEREGISTERED = "DEREGISTERED"


@dataclass(frozen=True)
class Registration:
    """A device as a registrant describes it; `settled_registration` checks it and applies defaults."""

    customer_id: str
    manufacturer: str
    model: str
    kind: str
    serial_number: str
    display_name: str = ""
    firmware_version: str = ""
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)
    slots: tuple[SlotSettings, ...] = ()
    test: bool = False  # a test device: its orders never reach fulfilment


@dataclass(frozen=True)
class Device:
    device_id: str
    customer_id: str
    manufacturer: str
    model: str
    kind: str
    serial_number: str
    display_name: str
    firmware_version: str
    attributes: dict[str, str]
    state: DeviceState
    slots: tuple[Slot, ...]  # ordered by slot_id
    create_time_us: int
    update_time_us: int
    deregister_time_us: int | None
    token_create_time_us: int
    last_seen_time_us: int | None
    test: bool = False
    paused: bool = False


def new_device_id() -> str:
    return "dev_" + secrets.token_hex(16)


def settled_registration(violations: Violations, registration: Registration) -> Registration:
    """Checks every field of a registration and returns it with each slot's defaults applied."""
    check_opaque_id(violations, "customer_id", registration.customer_id)
    check_text(violations, "manufacturer", registration.manufacturer, 1, 64)
    check_text(violations, "model", registration.model, 1, 64)
    violations.require_id("kind", registration.kind, KIND)
    check_text(violations, "serial_number", registration.serial_number, 1, 128)
    check_text(violations, "display_name", registration.display_name, 0, 200)
    check_text(violations, "firmware_version", registration.firmware_version, 0, 64)
    check_attributes(violations, "attributes", registration.attributes)
    if len(registration.slots) > MAX_SLOTS:
        violations.add("slots", f"must have at most {MAX_SLOTS} entries")
    first_index: dict[str, int] = {}
    slots = []
    for index, slot in enumerate(registration.slots[:MAX_SLOTS]):
        prefix = f"slots[{index}]"
        slots.append(settled_slot(violations, prefix, slot))
        if slot.slot_id in first_index:
            violations.add(f"{prefix}.slot_id", f"repeats the slot_id of slots[{first_index[slot.slot_id]}]")
        first_index.setdefault(slot.slot_id, index)
    return dataclasses.replace(registration, slots=tuple(sorted(slots, key=lambda s: s.slot_id)))


def check_attributes(violations: Violations, path: str, attributes: dict[str, str]) -> None:
    if len(attributes) > MAX_ATTRIBUTES:
        violations.add(path, f"must have at most {MAX_ATTRIBUTES} entries")
    for key, value in attributes.items():
        entry = f"{path}[{json.dumps(key)}]"
        if not key.strip():
            violations.add(entry, "a key must not be blank")
        elif len(key) > 64:
            violations.add(entry, "a key must be at most 64 characters")
        elif any(unicodedata.category(c) == "Cc" for c in key):
            violations.add(entry, "a key must not contain control characters")
        check_text(violations, entry, value, 0, 256)


def check_own_device(principal: Principal, device_id: str) -> None:
    """A device principal may name only itself; admin may name any device (DeviceService rule)."""
    if principal.kind == "device" and principal.name != device_id:
        raise PermissionDenied(f"{principal} may not act for device {device_id}", reason="DEVICE_MISMATCH")


def device_token_resolver(
    token_hash_of: Callable[[str], Awaitable[tuple[str, str] | None]],
) -> TokenResolver:
    """Authenticates active devices: `token_hash_of(digest)` finds (device_id, stored hash) by index."""

    async def resolve(digest: str) -> Principal | None:
        found = await token_hash_of(digest)
        if found is None:
            return None
        device_id, stored = found
        # The indexed lookup already matched; comparing again in constant time keeps the
        # decision itself free of timing differences.
        if not hmac.compare_digest(stored.encode(), digest.encode()):
            return None
        return Principal("device", device_id)

    return resolve
