"""Every RPC of every service, found in the services' own registrations.

Each service's app is built (not started) with throwaway settings and asked what it
registers: its own service, the common najimi.privacy.v1.DataSubjectService, and any
other (replenishment's DeviceService). An RPC or a service added later is found here
without editing the tests.
"""

from __future__ import annotations

import base64
import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.descriptor import Descriptor, MethodDescriptor

from shared.settings import SERVICE_NAMES, load_settings


@dataclass(frozen=True)
class Rpc:
    """One RPC as one service serves it (DataSubjectService is served by all four)."""

    app: str
    method: MethodDescriptor = field(compare=False)

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def input_type(self) -> Descriptor:
        return self.method.input_type

    @property
    def output_type(self) -> Descriptor:
        return self.method.output_type

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def is_watch(self) -> bool:
        """A feed that streams for as long as the caller listens (the suite names them Watch*)."""
        return self.server_streaming and not self.client_streaming and self.method.name.startswith("Watch")

    @property
    def kind(self) -> str:
        return {
            (False, False): "unary",
            (False, True): "server-streaming",
            (True, False): "client-streaming",
            (True, True): "bidi-streaming",
        }[self.client_streaming, self.server_streaming]

    def __str__(self) -> str:
        return f"{self.app}:{self.method.containing_service.name}/{self.method.name}"


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def discover_rpcs() -> list[Rpc]:
    """Every RPC every service registers, in registration order."""
    found: list[Rpc] = []
    with tempfile.TemporaryDirectory() as data_dir:
        for name in SERVICE_NAMES:
            settings = load_settings(
                name,
                data_dir=Path(data_dir),
                profile_pii_key=_key(),
                consent_signing_key=_key(),
                consent_audit_key=_key(),
            )
            app = importlib.import_module(f"services.{name}.app").build_app(settings)
            found.extend(
                Rpc(name, method)
                for registration in app.registrations
                for method in registration.descriptor.methods
            )
    return found
