"""google.protobuf Timestamp and Duration to and from stored microseconds, checked.

Every service converts through here. Reading what a caller sent checks protobuf's own
range first (a Timestamp from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z,
nanos 0 to 999,999,999; a Duration within +-10,000 years, nanos within +-999,999,999
and of the seconds' sign), then the field's documented bounds; anything outside is
INVALID_ARGUMENT naming the field. Pass a Violations to collect the problem with the
request's others instead of raising at once (the value is then None).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from google.protobuf import duration_pb2, timestamp_pb2

from shared.errors import InvalidArgument
from shared.validation import Violations

# The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31 (whole seconds).
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799
MIN_MICROS, MAX_MICROS = MIN_SECONDS * 1_000_000, MAX_SECONDS * 1_000_000 + 999_999
# The range google.protobuf.Duration allows: about +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000
NANOS = 1_000_000_000

INVALID_TIMESTAMP = "is not a valid timestamp (0001-01-01 to 9999-12-31, nanos 0 to 999999999)"
INVALID_DURATION = (
    "is not a valid duration (within 10000 years, nanos within 999999999 and of the seconds' sign)"
)


def _text(micros: int) -> str:
    return (
        datetime.fromtimestamp(micros / 1_000_000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _bounds_text(low: str | None, high: str | None, floor: str, ceiling: str) -> str:
    """What a value out of [low, high] is told (either bound may be absent)."""
    if low and high:
        return f"must be from {low} to {high}"
    return f"{floor} {low}" if low else f"{ceiling} {high}"


def _reject(field: str, description: str, violations: Violations | None) -> None:
    if violations is None:
        raise InvalidArgument(field, description)
    violations.add(field, description)


# -- reading what a caller sent ------------------------------------------------------------


def timestamp_micros(stamp: timestamp_pb2.Timestamp) -> int | None:
    """Microseconds since the epoch (finer digits dropped); None when not a valid Timestamp.

    Cheap enough for a per-event hot path: no method call into protobuf."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if MIN_SECONDS <= seconds <= MAX_SECONDS and 0 <= nanos < NANOS:
        return seconds * 1_000_000 + nanos // 1_000
    return None


@overload
def micros_from(
    stamp: timestamp_pb2.Timestamp,
    field: str,
    *,
    not_before: int | None = None,
    not_after: int | None = None,
    bounds: str | None = None,
    violations: None = None,
) -> int: ...


@overload
def micros_from(
    stamp: timestamp_pb2.Timestamp,
    field: str,
    *,
    not_before: int | None = None,
    not_after: int | None = None,
    bounds: str | None = None,
    violations: Violations,
) -> int | None: ...


def micros_from(
    stamp: timestamp_pb2.Timestamp,
    field: str,
    *,
    not_before: int | None = None,
    not_after: int | None = None,
    bounds: str | None = None,
    violations: Violations | None = None,
) -> int | None:
    """The timestamp in microseconds, if valid and within [not_before, not_after] (micros).

    `bounds` replaces the generic description of a value out of bounds (e.g. "must be
    in the future")."""
    micros = timestamp_micros(stamp)
    if micros is None:
        _reject(field, INVALID_TIMESTAMP, violations)
        return None
    if (not_before is not None and micros < not_before) or (not_after is not None and micros > not_after):
        if bounds is None:
            low = _text(not_before) if not_before is not None else None
            high = _text(not_after) if not_after is not None else None
            bounds = _bounds_text(low, high, "must not be before", "must not be after")
        _reject(field, bounds, violations)
        return None
    return micros


def duration_micros(duration: duration_pb2.Duration) -> int | None:
    """The duration in microseconds (truncated toward zero); None when not a valid Duration."""
    seconds, nanos = duration.seconds, duration.nanos
    if (
        -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS
        and -NANOS < nanos < NANOS
        and not (seconds > 0 and nanos < 0)
        and not (seconds < 0 and nanos > 0)
    ):
        return seconds * 1_000_000 + (nanos // 1_000 if nanos >= 0 else -(-nanos // 1_000))
    return None


@overload
def duration_micros_from(
    duration: duration_pb2.Duration,
    field: str,
    *,
    at_least: int | None = None,
    at_most: int | None = None,
    bounds: str | None = None,
    violations: None = None,
) -> int: ...


@overload
def duration_micros_from(
    duration: duration_pb2.Duration,
    field: str,
    *,
    at_least: int | None = None,
    at_most: int | None = None,
    bounds: str | None = None,
    violations: Violations,
) -> int | None: ...


def duration_micros_from(
    duration: duration_pb2.Duration,
    field: str,
    *,
    at_least: int | None = None,
    at_most: int | None = None,
    bounds: str | None = None,
    violations: Violations | None = None,
) -> int | None:
    """The duration in microseconds, if valid and within [at_least, at_most] (micros)."""
    micros = duration_micros(duration)
    if micros is None:
        _reject(field, INVALID_DURATION, violations)
        return None
    if (at_least is not None and micros < at_least) or (at_most is not None and micros > at_most):
        if bounds is None:
            low = f"{at_least / 1_000_000:g} s" if at_least is not None else None
            high = f"{at_most / 1_000_000:g} s" if at_most is not None else None
            bounds = _bounds_text(low, high, "must be at least", "must be at most")
        _reject(field, bounds, violations)
        return None
    return micros


@overload
def seconds_from(
    duration: duration_pb2.Duration,
    field: str,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    bounds: str | None = None,
    violations: None = None,
) -> float: ...


@overload
def seconds_from(
    duration: duration_pb2.Duration,
    field: str,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    bounds: str | None = None,
    violations: Violations,
) -> float | None: ...


def seconds_from(
    duration: duration_pb2.Duration,
    field: str,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    bounds: str | None = None,
    violations: Violations | None = None,
) -> float | None:
    """The duration in seconds, if valid and within [at_least, at_most] (seconds)."""
    micros = duration_micros_from(
        duration,
        field,
        at_least=None if at_least is None else round(at_least * 1_000_000),
        at_most=None if at_most is None else round(at_most * 1_000_000),
        bounds=bounds,
        violations=violations,
    )
    return None if micros is None else micros / 1_000_000


# -- writing what a reply carries ------------------------------------------------------------


def timestamp_of(micros: int | None) -> timestamp_pb2.Timestamp | None:
    if micros is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def set_timestamp(stamp: timestamp_pb2.Timestamp, micros: int) -> None:
    """Sets a Timestamp field in place (Timestamp.FromMicroseconds is Python: twice the cost)."""
    seconds, rest = divmod(micros, 1_000_000)
    stamp.seconds = seconds
    stamp.nanos = rest * 1000


def duration_of(seconds: int | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    return duration_pb2.Duration(seconds=seconds)


def duration_of_micros(micros: int | None) -> duration_pb2.Duration | None:
    if micros is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromMicroseconds(micros)
    return duration
