"""What every najimi RPC passes through, around its handler.

In order: request id, authentication and authorisation (health and reflection are
not wrapped: they stay open), the handler itself, error mapping (domain errors to rich statuses, anything
unexpected to INTERNAL with no stack trace sent), one structured access-log line and
the per-RPC metrics.

It sits on every call, so what can be worked out once per method (the access rule,
the metric figures, whether the handler is a coroutine) is, and per call it does only
what must be done per call (measured in bench/consent_bench.py): a service or admin
token is found without an await, the request id comes from random bytes fetched in
blocks, and the two log-context variables are set directly.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from time import perf_counter
from typing import Any

import grpc
import structlog

from shared import auth, errors, metrics
from shared.log import get_logger

log = get_logger("najimi.access")

_REQUEST_IDS_PER_FETCH = 256
_request_ids: deque[str] = deque()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_request_ids.clear)  # a forked child never reuses its parent's ids


def new_request_id() -> str:
    """16 hex digits from os.urandom; the bytes are fetched for 256 ids at a time."""
    try:
        return _request_ids.popleft()
    except IndexError:
        block = os.urandom(8 * _REQUEST_IDS_PER_FETCH).hex()
        _request_ids.extend(block[start : start + 16] for start in range(16, len(block), 16))
        return block[:16]


def _scan(metadata: Any) -> tuple[str, str | bytes | None]:
    """In one pass: the request id (the caller's first x-request-id, else a new one) and
    the first authorization value (None if there is none)."""
    request_id: str | None = None
    authorization = None
    for key, value in metadata:
        if key == "authorization":
            if authorization is None:
                authorization = value
        elif key == "x-request-id" and request_id is None:
            request_id = str(value)
    return request_id or new_request_id(), authorization


def _log_context_vars() -> tuple[contextvars.ContextVar[Any], contextvars.ContextVar[Any]]:
    """The variables behind structlog's context-local `request_id` and `principal`.

    Setting them is what bind_contextvars does, minus its per-call bookkeeping; its
    merge_contextvars processor reads them into every log line of the RPC as before.
    """
    tokens = structlog.contextvars.bind_contextvars(request_id=None, principal=None)
    structlog.contextvars.reset_contextvars(**tokens)
    return tokens["request_id"].var, tokens["principal"].var


_REQUEST_ID_VAR, _PRINCIPAL_VAR = _log_context_vars()


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
        self.authenticator = interceptor.authenticator
        self.access_log = interceptor.access_log
        self.stats = metrics.RPC_METRICS.stats(interceptor.service, self.short)

    async def admit(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """Authenticates and authorises the caller; returns (request id, peer)."""
        request_id, authorization = _scan(context.invocation_metadata() or ())
        try:
            principal, digest = self.authenticator.static_caller(authorization)
            if principal is None:
                principal = await self.authenticator.resolve(digest)
            auth.authorize(principal, self.rule, self.short)
        except errors.DomainError as denied:
            metrics.AUTH_DENIALS.labels(self.interceptor.service, denied.code.name).inc()
            _REQUEST_ID_VAR.set(request_id)
            raise
        auth.set_current_principal(principal)
        # Each RPC runs in a task of its own, so these bindings end with it.
        _REQUEST_ID_VAR.set(request_id)
        _PRINCIPAL_VAR.set(str(principal))
        # The peer is read now, while the call is surely alive (reading it after the end crashed).
        return request_id, context.peer() if self.access_log else ""

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
        elapsed = perf_counter() - started
        self.stats.observe(code, elapsed)
        if self.access_log:
            log.info("rpc", method=self.method, code=code, duration_ms=round(elapsed * 1000, 3), peer=peer)

    def unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        is_coroutine = inspect.iscoroutinefunction(behavior)

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = perf_counter()
            request_id, peer = "", ""
            outcome: BaseException | None = None
            try:
                request_id, peer = await self.admit(context)
                if is_coroutine:
                    return await behavior(request, context)
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
            started = perf_counter()
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
