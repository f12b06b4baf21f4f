"""Secret keys from configuration, or a generated development key file.

A service's key (the profile PII master key, the consent receipt signing key, the
consent audit key …) comes from, in this order:
- its NAJIMI_* variable: the key, base64-encoded (e.g. `openssl rand -base64 32`).
  Use this in production, from a secret: every replica must hold the same key.
- otherwise <data_dir>/<file_name>, generated on first start (mode 0600) and reused
  after, so development data survives restarts.

A malformed key, or a key file that its group or others may read, stops the process
with a message naming the variable or the file (SystemExit), as a bad setting does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from shared.log import get_logger
from shared.settings import Settings

log = get_logger("najimi.keys")


def configured_key(
    secret_value: str, variable: str, data_dir: Path, file_name: str, length: int = 32
) -> bytes:
    """The `length`-byte key from `secret_value` (base64) or from `data_dir / file_name`.

    `secret_value` is the setting's value (empty when unset) and `variable` the name
    of its environment variable, used in error messages only. When `secret_value` is
    empty the key file is read, and created atomically with a random key first when
    it does not exist: processes starting at once all end up with the same key.
    """
    if secret_value:
        key = _decoded_key(secret_value, length)
        if key is None:
            raise _invalid(variable, f"must be {length} bytes, base64-encoded")
        return key
    path = data_dir / file_name
    if not path.exists():
        _create_key_file(path, variable, length)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _invalid(str(path), "must be readable by its owner only (chmod 600)")
    key = _decoded_key(path.read_text(), length)
    if key is None:
        raise _invalid(str(path), f"must hold {length} bytes, base64-encoded")
    return key


PSEUDONYM_KEY_VARIABLE = "NAJIMI_PSEUDONYM_KEY"


def pseudonym_key(settings: Settings) -> bytes:
    """The service's HMAC key for digests and pseudonyms that must outlive an erasure
    (NAJIMI_PSEUDONYM_KEY, else <data_dir>/<service>-pseudonym.key). Keep it with the
    backups: without it, a tombstone no longer recognises the id it was made for."""
    return configured_key(
        settings.pseudonym_key.get_secret_value(),
        PSEUDONYM_KEY_VARIABLE,
        settings.data_dir,
        f"{settings.service}-pseudonym.key",
    )


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of `value` under `key`, in hex: equal values match, the hash reveals none."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def _decoded_key(text: str, length: int) -> bytes | None:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == length else None


def _invalid(where: str, problem: str) -> SystemExit:
    return SystemExit(f"najimi: invalid configuration:\n  {where}: {problem}")


def _create_key_file(path: Path, variable: str, length: int) -> None:
    """Writes a new random key, atomically: two processes starting at once end up with one key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(base64.b64encode(secrets.token_bytes(length)).decode() + "\n")
    try:
        os.link(draft, path)  # fails if another process linked its key first; theirs wins
        log.warning("key_generated", path=str(path), hint=f"set {variable} in production")
    except FileExistsError:
        pass
    finally:
        draft.unlink()
