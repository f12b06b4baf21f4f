"""What every najimi RPC passes through, around its handler.

In order: request id, authentication and authorisation (health and reflection are
not wrapped: they stay open), the handler itself, error mapping (domain errors to rich statuses, anything
unexpected to INTERNAL with no stack trace sent), one structured access-log line and
the per-RPC metrics.

It sits on every call, so what can be worked out once per method (the access rule,
the metric children) is, and per call it does only what must be done per call
(measured in bench/consent_bench.py).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import structlog

from shared import auth, errors, metrics
from shared.log import get_logger

log = get_logger("najimi.access")


def _code_of(error: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(error, errors.DomainError):
        return error.code.name
    if isinstance(error, NotImplementedError):
        return "UNIMPLEMENTED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"


class _Method:
    """What the interceptor knows about one RPC, worked out on its first call."""

    def __init__(self, interceptor: RpcInterceptor, method: str):
        self.interceptor = interceptor
        self.method = method
        self.short = method.rsplit("/", 1)[-1]
        self.rule = interceptor.policy.get(method)
        self.latency = metrics.RPC_LATENCY.labels(interceptor.service, self.short)
        self._counts: dict[str, Any] = {}

    async def admit(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """Authenticates and authorises the caller; returns (request id, peer)."""
        metadata = context.invocation_metadata() or ()
        request_id = next((str(v) for k, v in metadata if k == "x-request-id"), "") or os.urandom(8).hex()
        try:
            principal = await self.interceptor.authenticator.authenticate(metadata)
            auth.authorize(principal, self.rule, self.short)
        except errors.DomainError as denied:
            metrics.AUTH_DENIALS.labels(self.interceptor.service, denied.code.name).inc()
            structlog.contextvars.bind_contextvars(request_id=request_id)
            raise
        auth.set_current_principal(principal)
        # Each RPC runs in a task of its own, so these bindings end with it.
        structlog.contextvars.bind_contextvars(request_id=request_id, principal=str(principal))
        # The peer is read now, while the call is surely alive (reading it after the end crashed).
        return request_id, context.peer() if self.interceptor.access_log else ""

    async def fail(self, context: grpc.aio.ServicerContext, error: BaseException, request_id: str) -> None:
        if isinstance(error, errors.DomainError):
            status = errors.status_of(error)
        elif isinstance(error, NotImplementedError):
            status = errors.status_of(
                errors.Unimplemented(f"{self.method.strip('/')} is not implemented yet")
            )
        else:
            log.error("rpc_failed", method=self.method, exc_info=error)
            status = errors.internal_status(request_id)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def finish(self, started: float, code: str, peer: str) -> None:
        elapsed = time.perf_counter() - started
        counter = self._counts.get(code)
        if counter is None:
            counter = self._counts[code] = metrics.RPC_REQUESTS.labels(
                self.interceptor.service, self.short, code
            )
        counter.inc()
        self.latency.observe(elapsed)
        if self.interceptor.access_log:
            log.info("rpc", method=self.method, code=code, duration_ms=round(elapsed * 1000, 3), peer=peer)

    def unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            request_id, peer = "", ""
            outcome: BaseException | None = None
            try:
                request_id, peer = await self.admit(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except asyncio.CancelledError as cancelled:
                outcome = cancelled
                raise
            except Exception as error:
                outcome = error
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await self.fail(context, error, request_id)
            finally:
                self.finish(started, _code_of(outcome, context), peer)

        return run

    def streaming(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            request_id, peer = "", ""
            outcome: BaseException | None = None
            try:
                request_id, peer = await self.admit(context)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for message in result:
                        yield message
                elif inspect.isawaitable(result):
                    await result
                else:
                    for message in result:
                        yield message
            except asyncio.CancelledError as cancelled:
                outcome = cancelled
                raise
            except Exception as error:
                outcome = error
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await self.fail(context, error, request_id)
            finally:
                self.finish(started, _code_of(outcome, context), peer)

        return run


class RpcInterceptor:
    """Wraps every handler of a service once, when the service is registered.

    Wrapping at registration instead of through grpc.aio's ServerInterceptor saves the
    interceptor pipeline that grpc.aio would otherwise run on every call (health and
    reflection calls included): measured at about a third of CheckConsent's server CPU
    beyond the health floor (bench/consent_bench.py).
    """

    def __init__(
        self,
        service: str,
        authenticator: auth.Authenticator,
        policy: Mapping[str, auth.AccessRule],
        access_log: bool = True,
    ):
        self.service = service
        self.authenticator = authenticator
        self.policy = dict(policy)
        self.access_log = access_log

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rpc = _Method(self, method)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(rpc.unary(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(rpc.unary(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(rpc.streaming(handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(rpc.streaming(handler.stream_stream), **kwargs)


class WrappingServer:
    """Stands in for the server when a generated add_XServicer_to_server runs, and
    registers the wrapped handlers on the real server instead of the plain ones."""

    def __init__(self, server: grpc.aio.Server, interceptor: RpcInterceptor):
        self._server = server
        self._interceptor = interceptor

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the generated code passes the same handlers to the call below."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: self._interceptor.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
