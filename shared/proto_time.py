"""Conversions between protobuf Timestamp/Duration and stored microseconds."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2


def timestamp_of(micros: int | None) -> timestamp_pb2.Timestamp | None:
    if micros is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def micros_of(stamp: timestamp_pb2.Timestamp) -> int:
    return int(stamp.ToMicroseconds())


def duration_of(seconds: int | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    return duration_pb2.Duration(seconds=seconds)
