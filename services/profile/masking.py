"""How PII looks to a caller that may not read it (the masking rules of the proto's Customer)."""

from __future__ import annotations

MASK = "***"


def mask_name(name: str) -> str:
    """Keeps the first letter of each word: "Taro Yamada" -> "T*** Y***"."""
    return " ".join(word[0] + MASK for word in name.split())


def mask_email(email: str) -> str:
    """Keeps the first letter of the local part and the domain: "j***@example.com"."""
    local, at, domain = email.rpartition("@")
    if not at or not local:
        return MASK
    return f"{local[0]}{MASK}@{domain}"


def mask_phone(phone: str) -> str:
    """Keeps the first three and last two characters: "+81312345678" -> "+81*******78"."""
    if len(phone) <= 5:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 5) + phone[-2:]


def looks_masked(value: str) -> bool:
    """Whether a value carries the mask, i.e. was copied from a masked response."""
    return MASK in value
