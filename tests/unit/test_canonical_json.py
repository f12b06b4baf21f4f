"""RFC 8785 canonical JSON: the RFC's own examples, and properties of any JSON value."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from najimi.consent.v1 import consent_service_pb2 as pb

from shared.canonical_json import canonical_json, message_json


def test_the_rfc_example_object():
    # RFC 8785 section 3.2.2.
    value = json.loads(
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(value) == expected.encode("utf-8")


def test_members_sort_by_utf16_code_units():
    # RFC 8785 section 3.2.3: the emoji (surrogates D83D DE00) sorts before U+FB33.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(canonical_json(value)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        # RFC 8785 appendix B.
        (0x0000000000000000, "0"),
        (0x8000000000000000, "0"),
        (0x0000000000000001, "5e-324"),
        (0x8000000000000001, "-5e-324"),
        (0x7FEFFFFFFFFFFFFF, "1.7976931348623157e+308"),
        (0xFFEFFFFFFFFFFFFF, "-1.7976931348623157e+308"),
        (0x4340000000000000, "9007199254740992"),
        (0xC340000000000000, "-9007199254740992"),
        (0x4430000000000000, "295147905179352830000"),
        (0x44B52D02C7E14AF5, "9.999999999999997e+22"),
        (0x44B52D02C7E14AF6, "1e+23"),
        (0x44B52D02C7E14AF7, "1.0000000000000001e+23"),
        (0x444B1AE4D6E2EF4E, "999999999999999700000"),
        (0x444B1AE4D6E2EF4F, "999999999999999900000"),
        (0x444B1AE4D6E2EF50, "1e+21"),
        (0x3EB0C6F7A0B5ED8C, "9.999999999999997e-7"),
        (0x3EB0C6F7A0B5ED8D, "0.000001"),
        (0x41B3DE4355555553, "333333333.3333332"),
        (0x41B3DE4355555554, "333333333.33333325"),
        (0x41B3DE4355555555, "333333333.3333333"),
        (0x41B3DE4355555556, "333333333.3333334"),
        (0x41B3DE4355555557, "333333333.33333343"),
        (0xBECBF647612F3696, "-0.0000033333333333333333"),
        (0x43143FF3C1CB0959, "1424953923781206.2"),
    ],
)
def test_numbers_serialise_as_ecmascript_does(bits, expected):
    (value,) = struct.unpack(">d", bits.to_bytes(8, "big"))
    assert canonical_json(value) == expected.encode()


def test_integral_floats_and_ints_look_alike():
    assert (
        canonical_json([42.0, 42, -7.0, 1e16, 2**53 - 1]) == b"[42,42,-7,10000000000000000,9007199254740991]"
    )


def test_control_characters_and_non_ascii():
    assert canonical_json("a\u0000\u001f\u007f\u2028é\t") == '"a\\u0000\\u001f\u007f\u2028é\\t"'.encode()


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        2**53,
        -(2**53),
        {1: "x"},
        {"a": {b"x"}},
        b"bytes",
        "\ud800",
        {"\udc00": 1},
    ],
)
def test_values_without_a_canonical_form_are_refused(value):
    with pytest.raises(ValueError):
        canonical_json(value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_any_value_round_trips_and_is_a_fixed_point(value):
    text = canonical_json(value)
    # A JSON number is a double, as JavaScript reads it.
    parsed = json.loads(text, parse_int=float)
    assert parsed == value
    assert canonical_json(parsed) == text


@given(
    st.recursive(st.text() | st.booleans() | st.none(), lambda c: st.lists(c) | st.dictionaries(st.text(), c))
)
def test_without_numbers_it_is_compact_json_sorted_by_utf16(value):
    def sort(item):
        if isinstance(item, dict):
            keys = sorted(item, key=lambda key: key.encode("utf-16-be", "surrogatepass"))
            return {key: sort(item[key]) for key in keys}
        return [sort(v) for v in item] if isinstance(item, list) else item

    compact = json.dumps(sort(value), ensure_ascii=False, separators=(",", ":"))
    assert canonical_json(value) == compact.encode("utf-8")


@given(st.dictionaries(st.text(), st.integers(min_value=0, max_value=9), max_size=8))
def test_member_order_does_not_depend_on_insertion_order(value):
    reversed_value = dict(reversed(list(value.items())))
    assert canonical_json(value) == canonical_json(reversed_value)
    keys = list(json.loads(canonical_json(value)))
    assert keys == sorted(value, key=lambda key: key.encode("utf-16-be", "surrogatepass"))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_round_trip_exactly(value):
    assert float(canonical_json(value)) == value


def test_message_json_uses_proto3_json_names_omits_defaults_and_excludes_fields():
    receipt = pb.ConsentReceipt(
        receipt_id="r1",
        customer_id="c1",
        sensitive=False,
        purposes=[pb.ReceiptPurpose(purpose="analytics", granted=True, revision=7)],
        payload=b"x",
        key_id="k",
    )
    assert message_json(receipt, {"payload", "keyId"}) == {
        "receiptId": "r1",
        "customerId": "c1",
        "purposes": [{"purpose": "analytics", "granted": True, "revision": "7"}],
    }
    assert message_json(receipt)["keyId"] == "k"
    assert canonical_json(message_json(receipt, {"payload", "key_id", "customer_id"})) == (
        b'{"purposes":[{"granted":true,"purpose":"analytics","revision":"7"}],"receiptId":"r1"}'
    )
