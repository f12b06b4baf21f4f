"""Wires the profile service together: settings -> PII key -> store -> servicers -> App.

The PII master key (32 bytes; services/profile/pii.py derives the encryption and the
identifier-hashing keys from it) comes from, in this order:
- NAJIMI_PROFILE_PII_KEY: the key, base64-encoded (e.g. `openssl rand -base64 32`).
  Use this in production, from a secret: every replica must hold the same key.
- otherwise <data_dir>/profile-pii.key, generated on first start (mode 0600) and
  reused after, so development data survives restarts.
Losing the key loses the PII (it cannot be decrypted); keep it with the database backups.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from najimi.profile.v1 import profile_service_pb2, profile_service_pb2_grpc

from services.profile.pii import KEY_BYTES, PiiProtector
from services.profile.servicer import ACCESS, ProfileServicer
from services.profile.store import ProfileStore
from shared.data_subject import unimplemented_data_subject_registration
from shared.db import Database
from shared.log import get_logger
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
PII_KEY_VARIABLE = "NAJIMI_PROFILE_PII_KEY"
PII_KEY_FILE = "profile-pii.key"

log = get_logger("najimi.profile")


def _decoded_key(text: str) -> bytes | None:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_BYTES else None


def _invalid(where: str, problem: str) -> SystemExit:
    return SystemExit(f"najimi: invalid configuration:\n  {where}: {problem}")


def pii_master_key(settings: Settings) -> bytes:
    """The PII master key from the environment or the key file (see the module docstring)."""
    encoded = settings.profile_pii_key.get_secret_value()
    if encoded:
        key = _decoded_key(encoded)
        if key is None:
            raise _invalid(PII_KEY_VARIABLE, f"must be {KEY_BYTES} bytes, base64-encoded")
        return key
    path = settings.data_dir / PII_KEY_FILE
    if not path.exists():
        _create_key_file(path)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _invalid(str(path), "must be readable by its owner only (chmod 600)")
    key = _decoded_key(path.read_text())
    if key is None:
        raise _invalid(str(path), f"must hold {KEY_BYTES} bytes, base64-encoded")
    return key


def _create_key_file(path: Path) -> None:
    """Writes a new random key, atomically: two processes starting at once end up with one key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
    try:
        os.link(draft, path)  # fails if another process linked its key first; theirs wins
        log.warning("pii_key_generated", path=str(path), hint=f"set {PII_KEY_VARIABLE} in production")
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def build_app(settings: Settings) -> App:
    protector = PiiProtector(pii_master_key(settings))
    database = Database(settings.effective_database_url, "profile", MIGRATIONS)
    store = ProfileStore(database, protector)

    async def start() -> None:
        await asyncio.to_thread(database.migrate)

    async def stop() -> None:
        database.close()

    return App(
        name="profile",
        registrations=[
            Registration(
                profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"],
                profile_service_pb2_grpc.add_ProfileServiceServicer_to_server,
                # RPCs not implemented yet are not overridden: the generated base answers
                # UNIMPLEMENTED, although its type stubs declare every RPC abstract.
                ProfileServicer(store),  # type: ignore[abstract]
                ACCESS,
            ),
            unimplemented_data_subject_registration(),
        ],
        start=start,
        stop=stop,
    )
