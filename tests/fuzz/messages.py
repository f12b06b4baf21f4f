"""Hypothesis strategies for hostile request bodies, built from the message descriptors.

`request_bodies` makes messages that decode, with values at the edges of each field's
type, unknown enum values, unknown fields, nested messages, large repeated fields,
Timestamps and Durations outside protobuf's range, and page tokens that are real,
edited or borrowed from another RPC. `garbage_bodies` makes bodies that do not decode
(or only just do): random bytes, broken wire encodings, invalid UTF-8 and nesting
beyond the parser's depth.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
# protobuf's valid Timestamp range is 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z,
# a Duration's +-10,000 years; nanos are 0..999,999,999 (a Duration's take the seconds' sign).
TIMESTAMP_MIN_SECONDS, TIMESTAMP_MAX_SECONDS = -62_135_596_800, 253_402_300_799
DURATION_MAX_SECONDS = 315_576_000_000
NANOS_EDGES = (0, 1, -1, 999_999_999, 1_000_000_000, -999_999_999, -1_000_000_000, INT32_MAX, INT32_MIN)

MAX_DEPTH = 4  # nested messages the generator fills; deeper ones stay empty
DEEP_NESTING = (60, 99, 101, 200, 1_000, 5_000)  # about protobuf's default recursion limit (100)
LARGE_REPEATED = (1_001, 5_000, 20_000)  # past the documented batch limits (1000) ...
LARGE_FIELD_BYTES = 3 * 1024 * 1024  # ... but a repeated field stays under the 4 MiB message limit

INTEGER_EDGES: dict[int, tuple[int, ...]] = {
    F.TYPE_INT32: (0, -1, 1, INT32_MIN, INT32_MAX),
    F.TYPE_SINT32: (0, -1, 1, INT32_MIN, INT32_MAX),
    F.TYPE_SFIXED32: (0, -1, 1, INT32_MIN, INT32_MAX),
    F.TYPE_UINT32: (0, 1, 2**31, UINT32_MAX),
    F.TYPE_FIXED32: (0, 1, 2**31, UINT32_MAX),
    F.TYPE_INT64: (0, -1, 1, INT64_MIN, INT64_MAX, 2**53, -(2**53), 2**31, 2**32, 10**18),
    F.TYPE_SINT64: (0, -1, 1, INT64_MIN, INT64_MAX, 2**53, -(2**53), 2**31, 2**32, 10**18),
    F.TYPE_SFIXED64: (0, -1, 1, INT64_MIN, INT64_MAX, 2**53, -(2**53)),
    F.TYPE_UINT64: (0, 1, 2**53, INT64_MAX, 2**63, UINT64_MAX),
    F.TYPE_FIXED64: (0, 1, 2**53, INT64_MAX, 2**63, UINT64_MAX),
}
INTEGER_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (INT32_MIN, INT32_MAX),
    F.TYPE_SINT32: (INT32_MIN, INT32_MAX),
    F.TYPE_SFIXED32: (INT32_MIN, INT32_MAX),
    F.TYPE_UINT32: (0, UINT32_MAX),
    F.TYPE_FIXED32: (0, UINT32_MAX),
    F.TYPE_INT64: (INT64_MIN, INT64_MAX),
    F.TYPE_SINT64: (INT64_MIN, INT64_MAX),
    F.TYPE_SFIXED64: (INT64_MIN, INT64_MAX),
    F.TYPE_UINT64: (0, UINT64_MAX),
    F.TYPE_FIXED64: (0, UINT64_MAX),
}
FLOAT_EDGES = (0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1.0, 3.4e38, -3.4e38)
DOUBLE_EDGES = (0.0, -0.0, float("nan"), float("inf"), float("-inf"), 5e-324, -1.0, 1.7e308, 1e18, 2.0**63)
EDGE_STRINGS = (
    "",
    " ",
    "\t\n",
    "\x00",
    "a\x00b",
    "x" * 64,
    "x" * 65,
    "x" * 128,
    "x" * 129,
    "x" * 257,
    "名前",
    "Ünïcödé ñ",
    "\u202eevil",
    "🙂" * 10,
    "../../etc/passwd",
    "'; DROP TABLE customers; --",
    "%s%n%x",
    "${jndi:ldap://x}",
    "null",
    "-1",
    "9" * 400,
    "1e999",
    "NaN",
    "true",
    "[]",
    "{}",
    "a.b.c",
    "*",
    "%",
    "_",
)
LONG_STRING_LENGTHS = (1_000, 65_536, 1_000_000)


@dataclass
class Seeds:
    """Values from the running suite that lead generated requests past the first checks."""

    known_strings: list[str] = field(default_factory=list)
    # Tokens and cursors real List and Watch calls returned, by RPC path.
    page_tokens: dict[str, list[str]] = field(default_factory=dict)

    def all_tokens(self) -> list[str]:
        return [token for tokens in self.page_tokens.values() for token in tokens]


# -- scalars ----------------------------------------------------------------------------------


def integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = INTEGER_RANGES[field_type]
    return st.one_of(st.sampled_from(INTEGER_EDGES[field_type]), st.integers(low, high))


def floats(field_type: int) -> st.SearchStrategy[float]:
    if field_type == F.TYPE_FLOAT:
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
    return st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats())


def strings(seeds: Seeds) -> st.SearchStrategy[str]:
    edges = st.sampled_from(EDGE_STRINGS)
    ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,70}\Z")
    known = st.sampled_from(seeds.known_strings) if seeds.known_strings else ids
    long = st.builds(lambda n, c: c * n, st.sampled_from(LONG_STRING_LENGTHS), st.sampled_from("xé名"))
    # Long strings are the rarest: a message with many of them is mostly a RESOURCE_EXHAUSTED.
    return st.one_of(edges, edges, st.text(max_size=40), ids, known, known, long)


def byte_strings() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.builds(lambda n: b"\xff" * n, st.sampled_from(LONG_STRING_LENGTHS)),
    )


# -- page tokens --------------------------------------------------------------------------------


def _json_of_token(token: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
    except (ValueError, TypeError):
        return None


def _token_of_json(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


JSON_EDITS: Sequence[Any] = (
    None,
    True,
    -1,
    0,
    2**63,
    -(2**63) - 1,
    10**400,
    1e308,
    "",
    "x" * 200,
    "'",
    [],
    {},
    [1, "a"],
    [2**70, "x"],
    ["a", 1],
    {"after": None},
)


def _nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def _edited_token(draw: st.DrawFn, tokens: Sequence[str]) -> str:
    """A real token edited: its JSON changed if it is JSON, else its bytes."""
    token = draw(st.sampled_from(tokens))
    decoded = _json_of_token(token)
    if isinstance(decoded, dict) and decoded and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(decoded)))
        edited = dict(decoded)
        if draw(st.booleans()):
            edited[key] = draw(st.sampled_from(JSON_EDITS))
        else:
            del edited[key]
        return _token_of_json(edited)
    raw = bytearray(token.encode())
    edit = draw(st.sampled_from(("flip", "cut", "append", "swap")))
    if edit == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] ^= draw(st.integers(1, 255))
    elif edit == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif edit == "append":
        raw += draw(st.binary(min_size=1, max_size=8))
    elif raw:
        raw = raw[::-1]
    return raw.decode("utf-8", "replace")


def page_tokens(seeds: Seeds, own: Sequence[str]) -> st.SearchStrategy[str]:
    """Tokens real calls returned (this RPC's and others'), edited ones, forged and random ones."""
    everyone = seeds.all_tokens()
    choices: list[st.SearchStrategy[str]] = [
        st.text(max_size=40),
        st.binary(max_size=48).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        st.sampled_from(JSON_EDITS).map(_token_of_json),
        st.dictionaries(
            st.sampled_from(("after", "before", "since", "next", "filters")), st.sampled_from(JSON_EDITS)
        ).map(_token_of_json),
        st.sampled_from((50, 1_000, 100_000)).map(
            lambda depth: base64.urlsafe_b64encode(_nested_json(depth).encode()).decode()
        ),
    ]
    if own:
        choices += [st.sampled_from(own), _edited_token(own)]
    if everyone:
        choices += [st.sampled_from(everyone), _edited_token(everyone)]
    return st.one_of(choices)


# -- messages -----------------------------------------------------------------------------------


def _is_token_field(descriptor: FieldDescriptor) -> bool:
    return descriptor.type == F.TYPE_STRING and descriptor.name.endswith(("page_token", "cursor"))


def _size(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize()
    if isinstance(value, str | bytes):
        return len(value)
    return 8


def _repeated(values: list[Any], count: int) -> list[Any]:
    """`count` copies of `values` in turn, as many as fit in LARGE_FIELD_BYTES."""
    fitting = max(1, min(count, LARGE_FIELD_BYTES // max(1, max(_size(v) for v in values))))
    return [values[i % len(values)] for i in range(fitting)]


class RequestGenerator:
    """Strategies for the messages of one RPC's request type (and the types inside it)."""

    def __init__(self, seeds: Seeds, own_tokens: Sequence[str], field_names: Sequence[str]):
        self.seeds = seeds
        self.own_tokens = own_tokens
        self.field_names = list(field_names)
        self._messages: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, min(depth, MAX_DEPTH + 1))
        if key not in self._messages:
            self._messages[key] = self._build(descriptor, depth)
        return self._messages[key]

    def _build(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        special = SPECIAL_TYPES.get(descriptor.full_name)
        if special is not None:
            return special(cls)
        if depth > MAX_DEPTH or not descriptor.fields:
            return st.builds(cls)
        return self._filled(descriptor, cls, depth)

    def _filled(self, descriptor: Descriptor, cls: type[Message], depth: int) -> st.SearchStrategy[Message]:
        fields = list(descriptor.fields)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = cls()
            chosen = draw(
                st.lists(st.sampled_from(fields), unique_by=lambda f: f.number, max_size=len(fields))
            )
            for descriptor_ in chosen:
                self._set(draw, message, descriptor_, depth)
            return message

        return build()

    def _set(self, draw: st.DrawFn, message: Message, descriptor: FieldDescriptor, depth: int) -> None:
        name = descriptor.name
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            key_field = descriptor.message_type.fields_by_name["key"]
            value_field = descriptor.message_type.fields_by_name["value"]
            entries = draw(
                st.dictionaries(
                    self.value(key_field, depth + 1), self.value(value_field, depth + 1), max_size=4
                )
            )
            target = getattr(message, name)
            for key, value in entries.items():
                if value_field.message_type is not None:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            return
        if descriptor.is_repeated:
            values = draw(self.repeated(descriptor, depth))
            getattr(message, name).extend(values)
        elif descriptor.message_type is not None:
            getattr(message, name).CopyFrom(draw(self.value(descriptor, depth + 1)))
        else:
            setattr(message, name, draw(self.value(descriptor, depth + 1)))

    def repeated(self, descriptor: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
        element = self.value(descriptor, depth + 1)
        few = st.lists(element, max_size=4)
        # A large list repeats a few drawn values: generating thousands of distinct ones
        # would cost more than the call.
        many = st.tuples(st.lists(element, min_size=1, max_size=3), st.sampled_from(LARGE_REPEATED)).map(
            lambda drawn: _repeated(drawn[0], drawn[1])
        )
        return st.one_of(few, few, few, many)

    def value(self, descriptor: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        field_type = descriptor.type
        if descriptor.message_type is not None:
            return self.message(descriptor.message_type, depth)
        if field_type in INTEGER_RANGES:
            return integers(field_type)
        if field_type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            return floats(field_type)
        if field_type == F.TYPE_BOOL:
            return st.booleans()
        if field_type == F.TYPE_BYTES:
            return byte_strings()
        if field_type == F.TYPE_ENUM:
            assert descriptor.enum_type is not None
            known = [v.number for v in descriptor.enum_type.values]
            unknown = (max(known) + 1, 999, -1, INT32_MAX, INT32_MIN)
            return st.one_of(st.sampled_from(known), st.sampled_from(unknown))
        if _is_token_field(descriptor):
            return st.one_of(page_tokens(self.seeds, self.own_tokens), strings(self.seeds))
        if descriptor.containing_type is not None and descriptor.containing_type.full_name == (
            "google.protobuf.FieldMask"
        ):
            return st.one_of(st.sampled_from(self.field_names or ["x"]), strings(self.seeds))
        return strings(self.seeds)


def _timestamps(cls: type[Message]) -> st.SearchStrategy[Message]:
    seconds = st.one_of(
        st.sampled_from(
            (
                0,
                -1,
                1_800_000_000,
                TIMESTAMP_MAX_SECONDS,
                TIMESTAMP_MAX_SECONDS + 1,
                TIMESTAMP_MIN_SECONDS,
                TIMESTAMP_MIN_SECONDS - 1,
                INT64_MAX,
                INT64_MIN,
            )
        ),
        st.integers(INT64_MIN, INT64_MAX),
    )
    nanos = st.one_of(st.sampled_from(NANOS_EDGES), st.integers(INT32_MIN, INT32_MAX))
    return st.builds(cls, seconds=seconds, nanos=nanos)


def _durations(cls: type[Message]) -> st.SearchStrategy[Message]:
    seconds = st.one_of(
        st.sampled_from(
            (
                0,
                -1,
                1,
                86_400,
                DURATION_MAX_SECONDS,
                DURATION_MAX_SECONDS + 1,
                -DURATION_MAX_SECONDS - 1,
                INT64_MAX,
                INT64_MIN,
            )
        ),
        st.integers(INT64_MIN, INT64_MAX),
    )
    nanos = st.one_of(st.sampled_from(NANOS_EDGES), st.integers(INT32_MIN, INT32_MAX))
    return st.builds(cls, seconds=seconds, nanos=nanos)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from(DOUBLE_EDGES), st.floats(), st.text(max_size=20)
)


def _structs(cls: type[Message]) -> st.SearchStrategy[Message]:
    documents = st.recursive(
        JSON_SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=20,
    )

    def struct_of(document: dict[str, Any]) -> Message:
        message = cls()
        message.update(document)  # type: ignore[attr-defined]
        return message

    return st.dictionaries(st.text(max_size=10), documents, max_size=5).map(struct_of)


# Well-known types whose valid range the generic generator would rarely hit.
SPECIAL_TYPES: dict[str, Callable[[type[Message]], st.SearchStrategy[Message]]] = {
    "google.protobuf.Timestamp": _timestamps,
    "google.protobuf.Duration": _durations,
    "google.protobuf.Struct": _structs,
}


# -- wire encoding --------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= UINT64_MAX
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


@st.composite
def unknown_fields(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """Well-formed fields whose numbers the message does not declare, of every wire type."""
    taken = {f.number for f in descriptor.fields}
    numbers = st.integers(1, 2**29 - 1).filter(lambda n: n not in taken and not 19_000 <= n <= 19_999)
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        number = draw(numbers)
        wire_type = draw(st.sampled_from((0, 1, 2, 3, 5)))
        if wire_type == 0:
            out += tag(number, 0) + varint(draw(st.integers(0, UINT64_MAX)))
        elif wire_type == 1:
            out += tag(number, 1) + draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 2:
            out += length_delimited(number, draw(st.binary(max_size=32)))
        elif wire_type == 3:
            out += tag(number, 3) + tag(number + 1 if number + 1 not in taken else number, 0) + b"\x01"
            out += tag(number, 4)
        else:
            out += tag(number, 5) + draw(st.binary(min_size=4, max_size=4))
    return out


def request_bodies(generator: RequestGenerator, descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Serialized requests that decode; about a third carry unknown fields after the known ones."""
    messages = generator.message(descriptor).map(lambda m: m.SerializeToString())
    with_unknown = st.tuples(messages, unknown_fields(descriptor)).map(lambda pair: pair[0] + pair[1])
    return st.one_of(messages, messages, with_unknown)


# -- garbage --------------------------------------------------------------------------------------


def _recursive_path(descriptor: Descriptor) -> tuple[list[FieldDescriptor], list[FieldDescriptor]] | None:
    """A path of message fields from `descriptor` to a type that contains itself, and that
    type's cycle (e.g. Struct -> Value -> Struct), if the message has one."""
    path: list[FieldDescriptor] = []
    seen: list[str] = []

    def walk(current: Descriptor) -> tuple[list[FieldDescriptor], list[FieldDescriptor]] | None:
        if current.full_name in seen:
            start = seen.index(current.full_name)
            return path[:start], path[start:]
        seen.append(current.full_name)
        # A map is a repeated entry message on the wire, so it is walked like any other.
        for child in current.fields:
            if child.message_type is not None:
                path.append(child)
                found = walk(child.message_type)
                if found:
                    return found
                path.pop()
        seen.pop()
        return None

    return walk(descriptor)


def _wrap(payload: bytes, fields: Sequence[FieldDescriptor]) -> bytes:
    for descriptor in reversed(fields):
        payload = length_delimited(descriptor.number, payload)
    return payload


def deeply_nested(descriptor: Descriptor, depth: int) -> bytes:
    """A body nesting `depth` levels: through the message's own recursive types (a Struct in
    a Struct ...) when it has one, else through unknown groups, which parsers also descend."""
    found = _recursive_path(descriptor)
    if found is None:
        number = 536_870_000
        return tag(number, 3) * depth + tag(number, 4) * depth
    to_cycle, cycle = found
    payload = b""
    for _ in range(max(1, depth // len(cycle))):
        payload = _wrap(payload, cycle)
    return _wrap(payload, to_cycle)


@st.composite
def _mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    raw = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(("flip", "cut", "insert", "overlong")))
        if edit == "flip" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        elif edit == "cut" and raw:
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
        elif edit == "insert":
            at = draw(st.integers(0, len(raw)))
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:  # a length-delimited field claiming more bytes than follow
            raw += tag(draw(st.integers(1, 20)), 2) + varint(draw(st.sampled_from((5, 2**31, 2**63))))
    return bytes(raw)


def _invalid_utf8(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    string_fields = [f.number for f in descriptor.fields if f.type == F.TYPE_STRING]
    if not string_fields:
        return st.just(length_delimited(1, b"\xff\xfe\xc3"))
    return st.builds(
        lambda number, junk: length_delimited(number, b"ok" + junk),
        st.sampled_from(string_fields),
        st.sampled_from((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf")),
    )


def _wrong_wire_types(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    numbers = [f.number for f in descriptor.fields] or [1]
    return st.builds(
        lambda number, wire_type, payload: tag(number, wire_type) + payload,
        st.sampled_from(numbers),
        st.sampled_from((1, 2, 5, 6, 7)),
        st.binary(max_size=9),
    )


def garbage_bodies(generator: RequestGenerator, descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Bodies that do not decode as `descriptor` (or barely do)."""
    valid = generator.message(descriptor).map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=256),
        st.builds(lambda n: bytes(range(256)) * n, st.sampled_from((4, 400))),
        valid.flatmap(_mutated),
        st.sampled_from(DEEP_NESTING).map(lambda depth: deeply_nested(descriptor, depth)),
        _invalid_utf8(descriptor),
        _wrong_wire_types(descriptor),
    )


def field_names(descriptor: Descriptor, prefix: str = "", depth: int = 0) -> list[str]:
    """Every field path of a message (a.b.c), for update masks that name real fields."""
    names = []
    for child in descriptor.fields:
        names.append(prefix + child.name)
        if child.message_type is not None and depth < 3 and not child.message_type.GetOptions().map_entry:
            names.extend(field_names(child.message_type, f"{prefix}{child.name}.", depth + 1))
    return names
