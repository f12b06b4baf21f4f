"""RFC 8785 JSON Canonicalization Scheme (JCS), for what najimi signs and hashes.

`canonical_json` serialises the JSON values najimi produces — dicts with string keys,
lists, strings, ints, floats, bools and None — as JCS prescribes: no whitespace,
object members sorted by the UTF-16 code units of their names, strings escaped as
ECMAScript's JSON.stringify does (only `"`, `\\` and control characters; everything
else as UTF-8), numbers in ECMAScript's shortest round-trip form (1.0 -> `1`,
1e21 -> `1e+21`). The same value always gives the same bytes, on every platform.

Numbers are IEEE 754 doubles in JCS, so an int beyond ±2^53 (which a double cannot
hold exactly) is refused rather than silently rounded; proto3 JSON writes int64 and
uint64 fields as strings for that reason. NaN and the infinities are refused too,
as are strings with unpaired surrogates (not representable in UTF-8).

`message_json` gives the proto3 JSON mapping of a message (lowerCamelCase names,
fields with default values omitted) as such a value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

# The largest integer every smaller integer of which a double holds exactly.
MAX_SAFE_INTEGER = 2**53 - 1


def canonical_json(value: Any) -> bytes:
    """The UTF-8 bytes of the RFC 8785 canonical JSON of `value`; ValueError if it has none."""
    parts: list[str] = []
    _serialise(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("a string holds an unpaired surrogate, which JSON text cannot carry") from error


def message_json(message: Message, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The proto3 JSON mapping of `message`, without the top-level fields in `exclude`.

    Names in `exclude` may be proto field names (`key_id`) or JSON names (`keyId`).
    """
    document: dict[str, Any] = json_format.MessageToDict(message)
    fields = message.DESCRIPTOR.fields_by_name
    for name in exclude:
        field = fields.get(name)
        document.pop(field.json_name if field is not None else name, None)
    return document


def renamed_members(document: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the JSON object `document` with the top-level members in `names` renamed (old -> new).

    For what was signed or hashed under a field's earlier JSON name: rebuild that
    document to verify it, or read it under the current name.
    """
    return {names.get(key, key): value for key, value in document.items()}


def _serialise(value: Any, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(_string(value))
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"the integer {value} is beyond what a JSON number holds exactly (2^53)")
        parts.append(str(int(value)))
    elif isinstance(value, float):
        parts.append(_number(value))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"object member names must be strings, not {type(key).__name__}")
        parts.append("{")
        for index, key in enumerate(sorted(value, key=_utf16_order)):
            if index:
                parts.append(",")
            parts.append(_string(key))
            parts.append(":")
            _serialise(value[key], parts)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _serialise(item, parts)
        parts.append("]")
    else:
        raise ValueError(f"{type(value).__name__} is not a JSON value")


def _utf16_order(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare like the code-unit sequences JCS sorts by;
    # surrogatepass keeps an unpaired surrogate from failing here (it fails later).
    return key.encode("utf-16-be", "surrogatepass")


def _string(text: str) -> str:
    # Python's encoder escapes exactly what JSON.stringify escapes: `"`, `\`, the
    # short forms \b \f \n \r \t, and other control characters as lowercase \u00xx.
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """ECMAScript Number::toString of a double, as RFC 8785 section 3.2.2.3 requires."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{value} is not a JSON number")
    if value == 0:
        return "0"  # also -0
    if value < 0:
        return "-" + _number(-value)
    # repr gives the shortest digits that round-trip, as ECMAScript requires.
    mantissa, _, exponent_text = repr(value).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # value = 0.<digits> x 10^point, i.e. digits x 10^(point - len(digits)).
    point = len(whole) + (int(exponent_text) if exponent_text else 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0") or "0"
    count = len(digits)
    if count <= point <= 21:
        return digits + "0" * (point - count)
    if 0 < point <= 21:
        return digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return "0." + "0" * -point + digits
    exponent = point - 1
    sign = "+" if exponent >= 0 else "-"
    head = digits[0] + ("." + digits[1:] if count > 1 else "")
    return f"{head}e{sign}{abs(exponent)}"
