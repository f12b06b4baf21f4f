"""Timestamp and Duration conversions at the edges of protobuf's ranges and of a field's bounds."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from shared.errors import InvalidArgument
from shared.proto_time import (
    MAX_DURATION_SECONDS,
    MAX_SECONDS,
    MIN_SECONDS,
    duration_micros,
    duration_micros_from,
    duration_of_micros,
    micros_from,
    seconds_from,
    timestamp_micros,
    timestamp_of,
)
from shared.validation import Violations


def stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def duration(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("seconds", "nanos", "micros"),
    [
        (0, 0, 0),
        (1, 999_999_999, 1_999_999),
        (-1, 1_000, -999_999),
        (MIN_SECONDS, 0, MIN_SECONDS * 1_000_000),
        (MAX_SECONDS, 999_999_999, MAX_SECONDS * 1_000_000 + 999_999),
    ],
)
def test_valid_timestamps_convert_both_ways(seconds, nanos, micros):
    assert timestamp_micros(stamp(seconds, nanos)) == micros
    assert micros_from(stamp(seconds, nanos), "t") == micros
    back = timestamp_of(micros)
    assert back is not None and timestamp_micros(back) == micros
    assert stamp(seconds, nanos).ToMicroseconds() == micros  # agrees with protobuf where protobuf accepts it


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (MIN_SECONDS - 1, 0),
        (MAX_SECONDS + 1, 0),
        (2**63 - 1, 0),
        (-(2**63), 0),
        (0, -1),
        (0, 1_000_000_000),
        (0, -(2**31)),
    ],
)
def test_invalid_timestamps_name_the_field(seconds, nanos):
    assert timestamp_micros(stamp(seconds, nanos)) is None
    with pytest.raises(InvalidArgument) as caught:
        micros_from(stamp(seconds, nanos), "grant.expire_time")
    assert [v.field for v in caught.value.violations] == ["grant.expire_time"]
    violations = Violations()
    assert micros_from(stamp(seconds, nanos), "expire_time", violations=violations) is None
    assert [v.field for v in violations.found] == ["expire_time"]


def test_bounds_are_inclusive_and_described():
    at = stamp(1_000)
    assert micros_from(at, "t", not_before=1_000_000_000, not_after=1_000_000_000) == 1_000_000_000
    with pytest.raises(InvalidArgument, match="must not be before 1970-01-01T00:16:41Z"):
        micros_from(at, "t", not_before=1_001_000_000)
    with pytest.raises(InvalidArgument, match="must not be after"):
        micros_from(at, "t", not_after=999_999_999)
    with pytest.raises(InvalidArgument, match="must be in the future"):
        micros_from(at, "t", not_before=2_000_000_000, bounds="must be in the future")
    with pytest.raises(InvalidArgument, match="must be from 1970-01-01T00:16:41Z to 1970-01-01T00:16:42Z"):
        micros_from(at, "t", not_before=1_001_000_000, not_after=1_002_000_000)


@pytest.mark.parametrize(
    ("seconds", "nanos", "micros"),
    [
        (0, 0, 0),
        (1, 500_000_000, 1_500_000),
        (-1, -500_000_000, -1_500_000),
        (0, -999_999_999, -999_999),
        (MAX_DURATION_SECONDS, 999_999_999, MAX_DURATION_SECONDS * 1_000_000 + 999_999),
        (-MAX_DURATION_SECONDS, -999_999_999, -MAX_DURATION_SECONDS * 1_000_000 - 999_999),
    ],
)
def test_valid_durations_convert_both_ways(seconds, nanos, micros):
    assert duration_micros(duration(seconds, nanos)) == micros
    assert duration_micros_from(duration(seconds, nanos), "d") == micros
    back = duration_of_micros(micros)
    assert back is not None and duration_micros(back) == micros


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (MAX_DURATION_SECONDS + 1, 0),
        (-MAX_DURATION_SECONDS - 1, 0),
        (2**63 - 1, 0),
        (1, -1),
        (-1, 1),
        (0, 1_000_000_000),
        (0, -1_000_000_000),
    ],
)
def test_invalid_durations_name_the_field(seconds, nanos):
    assert duration_micros(duration(seconds, nanos)) is None
    with pytest.raises(InvalidArgument) as caught:
        seconds_from(duration(seconds, nanos), "heartbeat_interval", at_least=1, at_most=60)
    assert [v.field for v in caught.value.violations] == ["heartbeat_interval"]


def test_duration_bounds():
    assert seconds_from(duration(60), "d", at_least=1, at_most=60) == 60.0
    assert seconds_from(duration(1), "d", at_least=1, at_most=60) == 1.0
    for outside in (duration(0, 999_999_999), duration(60, 1_000)):
        violations = Violations()
        assert seconds_from(outside, "d", at_least=1, at_most=60, violations=violations) is None
        assert violations.found[0].description == "must be from 1 s to 60 s"
    with pytest.raises(InvalidArgument, match="must be at least 1 s"):
        seconds_from(duration(0), "d", at_least=1)
    with pytest.raises(InvalidArgument, match="must be at most 60 s"):
        seconds_from(duration(61), "d", at_most=60)
