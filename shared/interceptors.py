"""The server interceptor every najimi RPC passes through.

In order: request id, authentication and authorisation (health and reflection stay
open), the handler itself, error mapping (domain errors to rich statuses, anything
unexpected to INTERNAL with no stack trace sent), one structured access-log line and
the per-RPC metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import structlog

from shared import auth, errors, metrics
from shared.log import get_logger

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

log = get_logger("najimi.access")


class RpcInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, service: str, authenticator: auth.Authenticator, policy: Mapping[str, auth.AccessRule]
    ):
        self._service = service
        self._authenticator = authenticator
        self._policy = dict(policy)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # Health and reflection stay open to every caller and untouched (grpcurl, probes).
        wrapped = handler if method.startswith(OPEN_PREFIXES) else self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rule = self._policy.get(method)
        short = method.rsplit("/", 1)[-1]
        service = self._service

        async def admit(context: grpc.aio.ServicerContext) -> str:
            """Sets the request id and principal for this RPC; raises when the caller may not."""
            metadata = context.invocation_metadata() or ()
            request_id = next((str(v) for k, v in metadata if k == "x-request-id"), "") or uuid.uuid4().hex
            structlog.contextvars.bind_contextvars(request_id=request_id)
            try:
                principal = await self._authenticator.authenticate(metadata)
                auth.authorize(principal, rule, short)
            except errors.DomainError as denied:
                metrics.AUTH_DENIALS.labels(service, denied.code.name).inc()
                raise
            auth.set_current_principal(principal)
            structlog.contextvars.bind_contextvars(principal=str(principal))
            return request_id

        async def fail(context: grpc.aio.ServicerContext, error: BaseException, request_id: str) -> None:
            if isinstance(error, errors.DomainError):
                status = errors.status_of(error)
            elif isinstance(error, NotImplementedError):
                status = errors.status_of(errors.Unimplemented(f"{method.strip('/')} is not implemented yet"))
            else:
                log.error("rpc_failed", method=method, exc_info=error)
                status = errors.internal_status(request_id)
            await context.abort(status.code, status.details, status.trailing_metadata)

        def finish(context: grpc.aio.ServicerContext, started: float, code: str) -> None:
            elapsed = time.perf_counter() - started
            metrics.observe_rpc(service, short, code, elapsed)
            log.info(
                "rpc", method=method, code=code, duration_ms=round(elapsed * 1000, 3), peer=context.peer()
            )
            structlog.contextvars.clear_contextvars()

        def code_of(error: BaseException | None, context: grpc.aio.ServicerContext) -> str:
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

        async def unary_response(
            behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext
        ) -> Any:
            started = time.perf_counter()
            request_id = ""
            outcome: BaseException | None = None
            try:
                request_id = await admit(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except asyncio.CancelledError as cancelled:
                outcome = cancelled
                raise
            except Exception as error:
                outcome = error
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await fail(context, error, request_id)
            finally:
                finish(context, started, code_of(outcome, context))

        async def stream_response(
            behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            request_id = ""
            outcome: BaseException | None = None
            try:
                request_id = await admit(context)
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
                await fail(context, error, request_id)
            finally:
                finish(context, started, code_of(outcome, context))

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await unary_response(behavior, request, context)

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for message in stream_response(behavior, request, context):
                    yield message

            return run

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
