"""Typed client factories for calling najimi services, with deadlines and retries.

Retries cover UNAVAILABLE only (the call never reached a handler, so repeating it is
safe); every call gets the configured deadline unless the caller gives its own, and
carries this service's bearer token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from shared.settings import Settings

StubT = TypeVar("StubT")

RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class _CallDefaults:
    """Adds the bearer token to every call and a deadline to calls that have none."""

    def __init__(self, token: str, timeout: float | None):
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def _details(
        self, details: grpc.aio.ClientCallDetails, streaming_response: bool
    ) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        # A watch stream lives as long as the caller wants; only bounded calls get the default.
        timeout = details.timeout if details.timeout is not None or streaming_response else self._timeout
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first call type it implements, so each call
# type gets an interceptor class of its own.
class _UnaryUnaryDefaults(_CallDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, False), request)


class _UnaryStreamDefaults(_CallDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, True), request)


class _StreamUnaryDefaults(_CallDefaults, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details, False), request_iterator)


class _StreamStreamDefaults(_CallDefaults, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details, True), request_iterator)


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials for this service's outgoing calls, or None for plaintext.

    NAJIMI_TLS_CA_FILE turns TLS on and verifies the servers; the service's own certificate
    (NAJIMI_TLS_CERT_FILE/KEY_FILE) is presented as the client certificate, which servers that
    require mTLS (NAJIMI_TLS_CLIENT_CA_FILE) check.
    """
    if settings.tls_ca_file is None:
        return None
    key = settings.tls_key_file.read_bytes() if settings.tls_key_file else None
    cert = settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None
    return grpc.ssl_channel_credentials(settings.tls_ca_file.read_bytes(), key, cert)


def open_channel(
    address: str,
    token: str = "",
    timeout: float | None = 5.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    options = [("grpc.service_config", json.dumps(RETRY_POLICY)), ("grpc.enable_retries", 1)]
    interceptors: list[grpc.aio.ClientInterceptor] = [
        kind(token, timeout)
        for kind in (_UnaryUnaryDefaults, _UnaryStreamDefaults, _StreamUnaryDefaults, _StreamStreamDefaults)
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def client_for(
    stub_type: Callable[[grpc.aio.Channel], StubT], address: str, settings: Settings
) -> tuple[StubT, grpc.aio.Channel]:
    """A stub of `stub_type` for `address`, with this service's token and default deadline."""
    channel = open_channel(
        address, settings.service_token, settings.client_timeout_seconds, channel_credentials(settings)
    )
    return stub_type(channel), channel
