"""Rules of a slot's settings: what is valid, and the defaults a new slot gets."""

from __future__ import annotations

import enum
import math
import re
import statistics
from dataclasses import dataclass, field, replace

from services.replenishment.text import check_opaque_id, check_text
from shared.validation import MAX_MONEY_MICROS, MONEY_RANGE, Violations

SLOT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")  # ISO 4217 alphabetic code

HOUR_US = 3_600 * 1_000_000
DAY_US = 24 * HOUR_US

MAX_REORDER_QUANTITY = 100
MAX_ORDERS_PER_PERIOD = 1000
LEAD_TIME_RANGE_US = (HOUR_US, 60 * DAY_US)
DEFAULT_LEAD_TIME_US = 3 * DAY_US
LIMIT_PERIOD_RANGE_US = (HOUR_US, 366 * DAY_US)
DEFAULT_LIMIT_PERIOD_US = 30 * DAY_US
SERVICE_LEVEL_RANGE = (0.5, 0.999)
DEFAULT_SERVICE_LEVEL = 0.95
REORDER_POINT_STEP = 0.01  # of capacity: smaller moves of the stored reorder point are not written
DEFAULT_FALLBACK_SHARE = 0.2  # of capacity, while the forecast has too few readings


class SlotPolicy(enum.Enum):
    AUTO = "AUTO"
    NOTIFY_ONLY = "NOTIFY_ONLY"
    OFF = "OFF"


@dataclass(frozen=True)
class SlotLimits:
    """Caps on automatic ordering; 0 means no limit, period_us None the default period."""

    max_orders_per_period: int = 0
    period_us: int | None = None
    max_spend_micros: int = 0
    currency_code: str = ""


@dataclass(frozen=True)
class SlotSettings:
    """What a registrant sets on a slot. None and 0 mean "the default" until `settled_slot`."""

    slot_id: str
    display_name: str = ""
    item_id: str = ""
    capacity: float = 0.0
    unit: str = ""
    reorder_quantity: int = 0
    unit_price_micros: int = 0
    currency_code: str = ""
    policy: SlotPolicy | None = None
    lead_time_us: int | None = None
    service_level: float = 0.0
    fallback_reorder_level: float = 0.0
    limits: SlotLimits = field(default_factory=SlotLimits)
    expected_stock_after_delivery: float = 0.0  # 0 means capacity


class SlotStatus(enum.Enum):
    NO_DATA = "NO_DATA"
    OK = "OK"
    LOW = "LOW"
    EMPTY = "EMPTY"


@dataclass(frozen=True)
class SlotState:
    """What the service knows of a slot from its telemetry (telemetry.py keeps it)."""

    level: float | None = None  # the latest by measure_time; None before any reading
    level_time_us: int | None = None
    epoch: int = 0  # the consumption epoch: a refill starts the next
    epoch_start_time_us: int | None = None
    last_refill_time_us: int | None = None
    last_outcome: str | None = None  # a ReplenishOutcome name without its prefix
    # The reorder point of the latest forecast with a rate (ordering.py keeps it); None
    # before the forecast has enough readings, or for a slot whose policy is OFF.
    reorder_point: float | None = None


@dataclass(frozen=True)
class SlotOrders:
    """The slot's orders as its state shows them (orders.py writes them)."""

    open_order_id: str = ""
    orders_in_period: int = 0  # non-cancelled orders in the current limit period
    spend_in_period_micros: int = 0


@dataclass(frozen=True)
class Slot:
    """A stored slot: its settings with defaults applied, when they were set, and its state."""

    device_id: str
    settings: SlotSettings
    create_time_us: int
    update_time_us: int
    paused: bool = False
    state: SlotState = field(default_factory=SlotState)
    orders: SlotOrders = field(default_factory=SlotOrders)

    @property
    def reorder_level(self) -> float:
        """The level at or below which the slot is LOW: its forecast's reorder point, or the
        fallback reorder level while there is no forecast."""
        point = self.state.reorder_point
        return self.settings.fallback_reorder_level if point is None else point

    @property
    def status(self) -> SlotStatus:
        """The level against the slot's reorder level; a slot with an open order is LOW."""
        status = slot_status(self.state.level, self.reorder_level)
        if status is SlotStatus.OK and self.orders.open_order_id:
            return SlotStatus.LOW
        return status

    @property
    def safety_z(self) -> float:
        return safety_z(self.settings.service_level)


def reorder_point_moved(stored: float | None, current: float | None, capacity: float) -> bool:
    """Whether a forecast's reorder point differs enough from the stored one to be written
    (a move under REORDER_POINT_STEP of capacity is not: one UPDATE less per reading)."""
    if stored is None or current is None:
        return stored != current
    return abs(current - stored) > REORDER_POINT_STEP * capacity


def slot_status(level: float | None, reorder_level: float) -> SlotStatus:
    """A level against the reorder level: NO_DATA without one, EMPTY at 0, LOW at or below it."""
    if level is None:
        return SlotStatus.NO_DATA
    if level <= 0:
        return SlotStatus.EMPTY
    return SlotStatus.LOW if level <= reorder_level else SlotStatus.OK


def safety_z(service_level: float) -> float:
    """The standard normal quantile of the service level (1.645 for 0.95)."""
    return statistics.NormalDist().inv_cdf(service_level)


def _check_range_us(
    violations: Violations, path: str, value: int | None, bounds: tuple[int, int], text: str
) -> None:
    if value is not None and not bounds[0] <= value <= bounds[1]:
        violations.add(path, f"must be {text}")


def _check_currency(violations: Violations, path: str, code: str) -> None:
    if code and not CURRENCY_CODE.match(code):
        violations.add(path, "must be an ISO 4217 code of three capital letters, e.g. EUR")


def settled_slot(violations: Violations, prefix: str, slot: SlotSettings) -> SlotSettings:
    """Checks a slot (fields named `<prefix>.<field>`) and returns it with defaults applied."""
    violations.require_id(f"{prefix}.slot_id", slot.slot_id, SLOT_ID)
    check_text(violations, f"{prefix}.display_name", slot.display_name, 0, 200)
    check_opaque_id(violations, f"{prefix}.item_id", slot.item_id)
    capacity_ok = math.isfinite(slot.capacity) and slot.capacity > 0
    if not capacity_ok:
        violations.add(f"{prefix}.capacity", "must be a finite number greater than 0")
    check_text(violations, f"{prefix}.unit", slot.unit, 1, 16)
    violations.require_range(
        f"{prefix}.reorder_quantity",
        slot.reorder_quantity,
        0,
        MAX_REORDER_QUANTITY,
        f"must be 1 to {MAX_REORDER_QUANTITY}, or 0 for 1",
    )
    violations.require_range(
        f"{prefix}.unit_price_micros", slot.unit_price_micros, 0, MAX_MONEY_MICROS, MONEY_RANGE
    )
    _check_currency(violations, f"{prefix}.currency_code", slot.currency_code)
    policy = slot.policy or SlotPolicy.NOTIFY_ONLY
    limits = slot.limits
    priced = slot.unit_price_micros > 0 and bool(slot.currency_code)
    if not priced and (policy is SlotPolicy.AUTO or limits.max_spend_micros > 0):
        needs = "policy AUTO" if policy is SlotPolicy.AUTO else "a spend limit"
        if slot.unit_price_micros <= 0:
            violations.add(f"{prefix}.unit_price_micros", f"must be greater than 0 with {needs}")
        if not slot.currency_code:
            violations.add(f"{prefix}.currency_code", f"is required with {needs}")
    elif slot.unit_price_micros > 0 and not slot.currency_code:
        violations.add(f"{prefix}.currency_code", "is required with a unit price")
    _check_range_us(
        violations, f"{prefix}.lead_time", slot.lead_time_us, LEAD_TIME_RANGE_US, "1 hour to 60 days"
    )
    service_level = slot.service_level or DEFAULT_SERVICE_LEVEL
    if not (
        math.isfinite(service_level) and SERVICE_LEVEL_RANGE[0] <= service_level <= SERVICE_LEVEL_RANGE[1]
    ):
        violations.add(f"{prefix}.service_level", "must be 0.5 to 0.999, or 0 for 0.95")
    fallback = slot.fallback_reorder_level
    if not math.isfinite(fallback) or fallback < 0 or (capacity_ok and fallback > slot.capacity):
        violations.add(f"{prefix}.fallback_reorder_level", "must be 0 to capacity (0 means 20% of capacity)")
    elif fallback == 0 and capacity_ok:
        fallback = DEFAULT_FALLBACK_SHARE * slot.capacity
    stock = slot.expected_stock_after_delivery
    if not math.isfinite(stock) or stock < 0 or (capacity_ok and stock > slot.capacity):
        violations.add(f"{prefix}.expected_stock_after_delivery", "must be 0 to capacity (0 means capacity)")
    violations.require_range(
        f"{prefix}.limits.max_orders_per_period",
        limits.max_orders_per_period,
        0,
        MAX_ORDERS_PER_PERIOD,
        f"must be 0 (no limit) to {MAX_ORDERS_PER_PERIOD}",
    )
    _check_range_us(
        violations, f"{prefix}.limits.period", limits.period_us, LIMIT_PERIOD_RANGE_US, "1 hour to 366 days"
    )
    violations.require_range(
        f"{prefix}.limits.max_spend_micros", limits.max_spend_micros, 0, MAX_MONEY_MICROS, MONEY_RANGE
    )
    if limits.max_spend_micros > 0 and not limits.currency_code:
        violations.add(f"{prefix}.limits.currency_code", "is required with max_spend_micros")
    elif limits.currency_code and limits.currency_code != slot.currency_code:
        violations.add(f"{prefix}.limits.currency_code", "must equal the slot's currency_code")
    return replace(
        slot,
        reorder_quantity=slot.reorder_quantity or 1,
        policy=policy,
        lead_time_us=DEFAULT_LEAD_TIME_US if slot.lead_time_us is None else slot.lead_time_us,
        service_level=service_level,
        fallback_reorder_level=fallback,
        limits=replace(
            limits, period_us=DEFAULT_LIMIT_PERIOD_US if limits.period_us is None else limits.period_us
        ),
    )


# UpdateSlot: the paths a mask may name, each the SlotSettings field it replaces.
UPDATABLE_SLOT_PATHS = frozenset(
    {
        "display_name",
        "item_id",
        "capacity",
        "unit",
        "reorder_quantity",
        "unit_price_micros",
        "currency_code",
        "policy",
        "lead_time",
        "service_level",
        "fallback_reorder_level",
        "expected_stock_after_delivery",
        "limits",
        "limits.max_orders_per_period",
        "limits.period",
        "limits.max_spend_micros",
        "limits.currency_code",
    }
)
_RENAMED = {"lead_time": "lead_time_us", "period": "period_us"}


def masked_slot(
    violations: Violations, current: SlotSettings, given: SlotSettings, paths: list[str]
) -> SlotSettings:
    """`current` with the fields `paths` names taken from `given`, checked and settled (fields
    named `slot.<field>`); an empty mask or a path not updatable is an `update_mask` violation."""
    if not paths:
        violations.add("update_mask", "is required: name the fields to change")
    updated = current
    for path in paths:
        if path not in UPDATABLE_SLOT_PATHS:
            violations.add("update_mask", f"{path!r} is not an updatable path of Slot")
            continue
        if path == "limits":
            updated = replace(updated, limits=given.limits)
        elif path.startswith("limits."):
            name = _RENAMED.get(path[7:], path[7:])
            updated = replace(updated, limits=replace(updated.limits, **{name: getattr(given.limits, name)}))
        else:
            name = _RENAMED.get(path, path)
            updated = replace(updated, **{name: getattr(given, name)})
    return settled_slot(violations, "slot", updated)
