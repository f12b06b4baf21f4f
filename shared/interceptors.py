"""What every najimi RPC passes through, around its handler.

In order: readiness (until the service has started, and once it begins to stop, a call
is refused with UNAVAILABLE: reason NOT_READY or SHUTTING_DOWN), request id,
authentication and authorisation (health and reflection are not wrapped: they stay
open), decoding the request, the handler itself, error mapping (domain errors to rich
statuses, anything unexpected to INTERNAL with no stack trace sent), one structured
access-log line and the per-RPC metrics. Every answer of a wrapped RPC, refusals and
denials included, is logged and counted.

The request is decoded here, after authentication, not by grpc: handlers are
registered to receive the raw bytes. A body that does not decode (truncated, garbage,
nested deeper than the protobuf parser allows), in a unary call or any message of a
request stream, is INVALID_ARGUMENT with reason MALFORMED_REQUEST and a message that
names neither the exception nor the message type; a caller without a valid token gets
UNAUTHENTICATED whatever it sends.

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


class MalformedRequest(errors.DomainError):
    """A request body that does not decode as the RPC's request message."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "MALFORMED_REQUEST"


# Generic on purpose: the parser's own text names the message type and its internals.
MALFORMED_MESSAGE = "the request body is not a valid protobuf message of this RPC's request type"


def _malformed() -> MalformedRequest:
    return MalformedRequest(MALFORMED_MESSAGE)


def _not_ready() -> errors.DomainError:
    return errors.Unavailable("the service is starting; retry shortly", reason="NOT_READY")


def _shutting_down() -> errors.DomainError:
    return errors.Unavailable("the service is stopping; retry on another replica", reason="SHUTTING_DOWN")


def _record(
    stats: metrics.RpcStats, access_log: bool, method: str, started: float, code: str, peer: str
) -> None:
    """Counts an answered call and writes its access-log line."""
    elapsed = perf_counter() - started
    stats.observe(code, elapsed)
    if access_log:
        log.info("rpc", method=method, code=code, duration_ms=round(elapsed * 1000, 3), peer=peer)


class _Method:
    """What the interceptor knows about one RPC, worked out when it is registered."""

    def __init__(self, interceptor: RpcInterceptor, method: str, deserialize: Callable[[bytes], Any]):
        self.interceptor = interceptor
        self.method = method
        self.short = method.rsplit("/", 1)[-1]
        self.rule = interceptor.policy.get(method)
        self.authenticator = interceptor.authenticator
        self.access_log = interceptor.access_log
        self.stats = metrics.RPC_METRICS.stats(interceptor.service, self.short)
        self.deserialize = deserialize

    async def admit(
        self,
        authorization: str | bytes | None,
        request_id: str,
        deserialize: Callable[[Any], Any],
        request: Any,
    ) -> Any:
        """Refuses the call while the service is not serving, else authenticates and
        authorises the caller, binds the RPC's log context, and returns the request decoded
        (a stream: its messages decoded as they are read)."""
        _REQUEST_ID_VAR.set(request_id)  # each RPC runs in a task of its own: this ends with it
        refusal = self.interceptor.refusal
        if refusal is not None:
            raise refusal()
        try:
            principal, digest = self.authenticator.static_caller(authorization)
            if principal is None:
                principal = await self.authenticator.resolve(digest)
            _PRINCIPAL_VAR.set(str(principal))  # before authorising: a denial names who was denied
            auth.authorize(principal, self.rule, self.short)
        except errors.DomainError as denied:
            metrics.AUTH_DENIALS.labels(self.interceptor.service, denied.code.name).inc()
            raise
        auth.set_current_principal(principal)
        try:
            return deserialize(request)
        except Exception:
            raise _malformed() from None

    async def decoded(self, requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        """A request stream's messages, decoded one by one; MALFORMED_REQUEST ends it."""
        deserialize = self.deserialize
        async for data in requests:
            try:
                message = deserialize(data)
            except Exception:
                raise _malformed() from None
            yield message

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
        _record(self.stats, self.access_log, self.method, started, code, peer)

    def unary(self, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        is_coroutine = inspect.iscoroutinefunction(behavior)
        deserialize = self.decoded if request_streaming else self.deserialize
        access_log = self.access_log

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = perf_counter()
            request_id, peer = "", ""
            outcome: BaseException | None = None
            try:
                request_id, authorization = _scan(context.invocation_metadata() or ())
                # Read now, while the call is surely alive (reading it after the end crashed).
                peer = context.peer() if access_log else ""
                message = await self.admit(authorization, request_id, deserialize, request)
                if is_coroutine:
                    return await behavior(message, context)
                result = behavior(message, context)
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

    def streaming(self, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        deserialize = self.decoded if request_streaming else self.deserialize
        access_log = self.access_log

        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = perf_counter()
            request_id, peer = "", ""
            outcome: BaseException | None = None
            try:
                request_id, authorization = _scan(context.invocation_metadata() or ())
                peer = context.peer() if access_log else ""
                message = await self.admit(authorization, request_id, deserialize, request)
                result = behavior(message, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        yield reply
                elif inspect.isawaitable(result):
                    await result
                else:
                    for reply in result:
                        yield reply
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

    It refuses every call (UNAVAILABLE, NOT_READY) until `open()`, which the server calls
    once the app has started, and again (SHUTTING_DOWN) after `close()`.
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
        # The error every call gets while the service is not serving; None while it is.
        self.refusal: Callable[[], errors.DomainError] | None = _not_ready

    def open(self) -> None:
        """The app has started: calls run from now on."""
        self.refusal = None

    def close(self) -> None:
        """The service is stopping: calls that arrive from now on are refused."""
        self.refusal = _shutting_down

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler that runs `handler` inside the interceptor, taking the raw request."""
        rpc = _Method(self, method, handler.request_deserializer or _unchanged)
        # No request_deserializer: grpc hands over the bytes, decoded after authentication.
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                rpc.unary(handler.unary_unary, False), None, serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                rpc.unary(handler.stream_unary, True), None, serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                rpc.streaming(handler.unary_stream, False), None, serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            rpc.streaming(handler.stream_stream, True), None, serializer
        )


def _unchanged(data: bytes) -> bytes:
    return data


# The metrics' method label of calls to a method that no service of the server has.
UNKNOWN_METHOD = "_unknown_"


class UnknownMethods(grpc.GenericRpcHandler):
    """Answers a call to a method that no service of the server has, as grpc would
    (UNIMPLEMENTED), but logged and counted. Registered after every service, so grpc
    reaches it only when nothing else has the method."""

    def __init__(self, interceptor: RpcInterceptor):
        self.stats = metrics.RPC_METRICS.stats(interceptor.service, UNKNOWN_METHOD)
        self.access_log = interceptor.access_log

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)[:200]  # the caller's text: kept short in the log

        async def answer(requests: Any, context: grpc.aio.ServicerContext) -> None:
            started = perf_counter()
            _REQUEST_ID_VAR.set(_scan(context.invocation_metadata() or ())[0])
            peer = context.peer() if self.access_log else ""
            _record(self.stats, self.access_log, method, started, "UNIMPLEMENTED", peer)
            status = errors.status_of(
                errors.Unimplemented("no such method on this server", reason="UNKNOWN_METHOD")
            )
            await context.abort(status.code, status.details, status.trailing_metadata)

        return grpc.stream_stream_rpc_method_handler(answer)


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
