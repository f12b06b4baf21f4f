"""Personal data at rest: AES-256-GCM encryption and keyed hashes for look-ups.

One 32-byte master key (app.py says where it comes from) is expanded with HKDF-SHA256
into independent subkeys, so that the encryption key is never a hashing key.
Every ciphertext is bound to where it is stored (a context such as
"customers/<id>/email") as associated data: a value copied into another row or column
fails to decrypt instead of being read as someone else's.

Nonces are random (96 bits): well within AES-GCM's safe bound of 2^32 encryptions per
key at this service's write rates; the leading format byte leaves room for key
rotation (a key id) later.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.keys import keyed_hash

KEY_BYTES = 32
_FORMAT = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16


class PiiDecryptionError(Exception):
    """A stored value could not be decrypted: wrong key, wrong context, or damaged data."""


def _subkey(master_key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(master_key)


class PiiProtector:
    """Encrypts and decrypts PII, and hashes identifiers for look-up, with keys from one master key."""

    def __init__(self, master_key: bytes):
        if len(master_key) != KEY_BYTES:
            raise ValueError(f"the PII master key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(_subkey(master_key, b"najimi.profile.pii-encryption.v1"))
        self._hash_key = _subkey(master_key, b"najimi.profile.identifier-hash.v1")
        self._erasure_key = _subkey(master_key, b"najimi.profile.erasure-ref.v1")

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _FORMAT + nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def decrypt(self, ciphertext: bytes, context: str) -> bytes:
        data = bytes(ciphertext)
        if len(data) < 1 + _NONCE_BYTES + _TAG_BYTES or data[:1] != _FORMAT:
            raise PiiDecryptionError(f"not a PII ciphertext of this service ({context})")
        nonce, sealed = data[1 : 1 + _NONCE_BYTES], data[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, sealed, context.encode())
        except InvalidTag:
            raise PiiDecryptionError(f"cannot decrypt {context}: wrong key or damaged value") from None

    def encrypt_text(self, value: str, context: str) -> bytes | None:
        """The ciphertext of a text value; None for an empty one (absence is not secret)."""
        return self.encrypt(value.encode(), context) if value else None

    def decrypt_text(self, ciphertext: bytes | None, context: str) -> str:
        return self.decrypt(ciphertext, context).decode() if ciphertext is not None else ""

    def lookup_hash(self, normalised_value: str) -> bytes:
        """HMAC-SHA256 of a normalised identifier: equal values match, but the table alone reveals none."""
        return hmac.new(self._hash_key, normalised_value.encode(), hashlib.sha256).digest()

    def erasure_ref(self, customer_id: str) -> str:
        """The keyed hash (hex) an erasure tombstone keeps instead of the erased customer id."""
        return keyed_hash(self._erasure_key, customer_id)
