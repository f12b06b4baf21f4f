"""Customers: the profile's fields, their rules, and what is derived from them.

Knows nothing of gRPC or SQL: the servicer translates protobuf into these values and
the store persists them (encrypting the PII fields).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from services.profile.masking import looks_masked
from shared.errors import InvalidArgument
from shared.validation import Violations

MAX_DISPLAY_NAME = 200
MAX_EMAIL = 254
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_TEXT = 1024
MIN_BIRTH_YEAR = 1900
# Signup may predate the profile (a card issued in a store years ago), not the future.
MIN_SIGNUP_US = int(dt.datetime(1900, 1, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
CLOCK_SKEW_US = 5 * 60 * 1_000_000

GENDERS = ("", "female", "male", "non_binary", "undisclosed")  # "" = not recorded
ATTRIBUTE_KINDS = ("string", "int", "double", "bool", "timestamp")

# Chosen by the caller or assigned by the server (new_customer_id), as the proto says.
CUSTOMER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
# ISO 3166-1 alpha-2 ("JP") or ISO 3166-2 subdivision ("JP-13", "GB-LND").
REGION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
# BCP 47 language tag: a 2-3 letter language, then subtags ("en-GB", "zh-Hant-TW").
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
MAX_LANGUAGE_TAG = 35
ATTRIBUTE_KEY = re.compile(r"^[a-z0-9_]{1,64}$")
# A consent vocabulary name: dotted lower-case words ("user.demographic.gender").
VOCABULARY_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
MAX_VOCABULARY_NAME = 128
CONTACT_CATEGORY = "user.contact"
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

AGE_BANDS = ((18, "under-18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (65, "55-64"))


@dataclass(frozen=True)
class Attribute:
    """A custom attribute: its kind, value (a timestamp as microseconds) and consent data category."""

    kind: str
    value: str | int | float | bool
    data_category: str


@dataclass(frozen=True)
class Profile:
    """The fields of a customer a caller writes. Empty or None means unknown."""

    display_name: str = ""
    email: str = ""
    phone: str = ""
    birth_year: int | None = None
    gender: str = ""
    region: str = ""
    language_code: str = ""
    signup_time_us: int | None = None
    attributes: dict[str, Attribute] = field(default_factory=dict)


@dataclass(frozen=True)
class Customer:
    customer_id: str
    profile: Profile
    create_time_us: int
    update_time_us: int
    revision: int
    # Set when merged into another customer (the profile is then empty: a tombstone).
    merged_into: str = ""
    # The customers merged into this one, oldest merge first.
    merged_from: tuple[str, ...] = ()

    @property
    def etag(self) -> str:
        return f"r{self.revision}"


def new_customer_id() -> str:
    """An opaque, unguessable id (128 random bits)."""
    return "cus_" + secrets.token_hex(16)


def current_year() -> int:
    return dt.datetime.now(dt.UTC).year


def age_range(birth_year: int | None, this_year: int) -> str:
    """The age band of someone born in `birth_year`, by the age they reach this year."""
    if birth_year is None:
        return ""
    age = this_year - birth_year
    for limit, band in AGE_BANDS:
        if age < limit:
            return band
    return "65+"


def check_text(violations: Violations, path: str, value: str, max_length: int) -> None:
    if len(value) > max_length:
        violations.add(path, f"must be at most {max_length} characters")
    elif CONTROL_CHARACTERS.search(value):
        violations.add(path, "must not contain control characters")


def check_email(violations: Violations, path: str, email: str) -> None:
    if len(email) > MAX_EMAIL:
        violations.add(path, f"must be at most {MAX_EMAIL} characters")
    elif looks_masked(email):
        violations.add(path, "is a masked value; send the real address")
    elif not EMAIL.match(email):
        violations.add(path, "must be an e-mail address such as name@example.com")


def check_phone(violations: Violations, path: str, phone: str) -> None:
    if not E164.match(phone):
        violations.add(path, "must be a phone number in E.164 form such as +81312345678")


def check_vocabulary_name(violations: Violations, path: str, name: str) -> None:
    if not name:
        violations.add(path, "is required")
    elif len(name) > MAX_VOCABULARY_NAME or not VOCABULARY_NAME.match(name):
        violations.add(path, "must be a consent vocabulary name such as user.demographic.gender")


def check_attribute(violations: Violations, path: str, attribute: Attribute) -> None:
    if attribute.kind not in ATTRIBUTE_KINDS:
        violations.add(path, f"must set exactly one of {', '.join(k + '_value' for k in ATTRIBUTE_KINDS)}")
    elif attribute.kind == "string":
        assert isinstance(attribute.value, str)
        if len(attribute.value) > MAX_ATTRIBUTE_TEXT:
            violations.add(f"{path}.string_value", f"must be at most {MAX_ATTRIBUTE_TEXT} characters")
    elif attribute.kind == "double":
        assert isinstance(attribute.value, float)
        if not math.isfinite(attribute.value):
            violations.add(f"{path}.double_value", "must be a finite number")
    category_path = f"{path}.data_category"
    check_vocabulary_name(violations, category_path, attribute.data_category)
    category = attribute.data_category
    if category == CONTACT_CATEGORY or category.startswith(CONTACT_CATEGORY + "."):
        violations.add(
            category_path,
            "contact data belongs in display_name, email and phone, which are encrypted and masked",
        )


def check_profile(violations: Violations, prefix: str, profile: Profile, now_us: int) -> None:
    """Adds a violation, named `<prefix>.<field>`, for every field of `profile` that breaks a rule."""
    if profile.display_name:
        check_text(violations, f"{prefix}.display_name", profile.display_name, MAX_DISPLAY_NAME)
        if looks_masked(profile.display_name):
            violations.add(f"{prefix}.display_name", "is a masked value; send the real name")
    if profile.email:
        check_email(violations, f"{prefix}.email", profile.email)
    if profile.phone:
        check_phone(violations, f"{prefix}.phone", profile.phone)
    this_year = dt.datetime.fromtimestamp(now_us / 1_000_000, dt.UTC).year
    if profile.birth_year is not None and not MIN_BIRTH_YEAR <= profile.birth_year <= this_year:
        violations.add(f"{prefix}.birth_year", f"must be between {MIN_BIRTH_YEAR} and {this_year}")
    if profile.gender not in GENDERS:
        violations.add(f"{prefix}.gender", "must be one of the Gender values")
    if profile.region and not REGION.match(profile.region):
        violations.add(
            f"{prefix}.region", "must be an ISO 3166-1 alpha-2 or ISO 3166-2 code such as JP or JP-13"
        )
    if profile.language_code and (
        len(profile.language_code) > MAX_LANGUAGE_TAG or not LANGUAGE_TAG.match(profile.language_code)
    ):
        violations.add(f"{prefix}.language_code", "must be a BCP 47 language tag such as ja or en-GB")
    if profile.signup_time_us is not None and not (
        MIN_SIGNUP_US <= profile.signup_time_us <= now_us + CLOCK_SKEW_US
    ):
        violations.add(f"{prefix}.signup_time", "must be after 1900-01-01 and not in the future")
    if len(profile.attributes) > MAX_ATTRIBUTES:
        violations.add(f"{prefix}.attributes", f"must hold at most {MAX_ATTRIBUTES} attributes")
    for key, attribute in sorted(profile.attributes.items()):
        path = f"{prefix}.attributes.{key[:64]}"
        if not ATTRIBUTE_KEY.match(key):
            violations.add(path, "keys must be 1 to 64 characters of [a-z0-9_]")
        check_attribute(violations, path, attribute)


# update_mask paths of UpdateCustomer: each writable field, the whole attribute map, and
# "attributes.<key>" for one attribute.
UPDATABLE_FIELDS = (
    "display_name",
    "email",
    "phone",
    "birth_year",
    "gender",
    "region",
    "language_code",
    "signup_time",
    "attributes",
)


def check_update_mask(violations: Violations, path: str, mask: list[str]) -> None:
    if not mask:
        violations.add(path, "must name at least one field")
    for field_path in mask:
        name, dot, key = field_path.partition(".")
        if dot and name == "attributes":
            if not ATTRIBUTE_KEY.match(key):
                violations.add(
                    path, f"attributes.<key> needs a key of 1 to 64 characters of [a-z0-9_]: {key[:64]}"
                )
        elif dot or name not in UPDATABLE_FIELDS:
            violations.add(
                path,
                f"cannot update {field_path[:100]}; allowed: {', '.join(UPDATABLE_FIELDS)}, attributes.<key>",
            )


def updated_profile(current: Profile, given: Profile, mask: list[str], create_time_us: int) -> Profile:
    """`current` with the fields named in `mask` taken from `given`; a named field left empty is
    cleared (signup_time falls back to the creation time), and a named attribute absent from
    `given` is removed. InvalidArgument when the attributes would exceed their limit."""
    named = {path for path in mask if "." not in path}

    def pick(name: str, current_value: Any, given_value: Any) -> Any:
        return given_value if name in named else current_value

    attributes = dict(given.attributes if "attributes" in named else current.attributes)
    for path in mask:
        _, dot, key = path.partition(".")
        if dot and key in given.attributes:
            attributes[key] = given.attributes[key]
        elif dot:
            attributes.pop(key, None)
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument("customer.attributes", f"would hold more than {MAX_ATTRIBUTES} attributes")
    given_signup = given.signup_time_us if given.signup_time_us is not None else create_time_us
    return Profile(
        display_name=pick("display_name", current.display_name, given.display_name),
        email=pick("email", current.email, given.email),
        phone=pick("phone", current.phone, given.phone),
        birth_year=pick("birth_year", current.birth_year, given.birth_year),
        gender=pick("gender", current.gender, given.gender),
        region=pick("region", current.region, given.region),
        language_code=pick("language_code", current.language_code, given.language_code),
        signup_time_us=pick("signup_time", current.signup_time_us, given_signup),
        attributes=attributes,
    )
