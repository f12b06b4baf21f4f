"""Server bootstrap shared by every service.

`create_server(settings, app)` builds a grpc.aio server with the standard health
service, server reflection (method names resolve too: shared/reflection.py), the RPC
interceptor and limits, and returns it with its bound port, so a test can start a
service in-process on port 0. `serve(app_factory, service)` is a service's `main`.

Start-up: the port opens at once, so probes can reach health from the first moment,
but until `start_app` has finished the app's start-up work (migrations, caches) health
says NOT_SERVING and every RPC other than health and reflection is refused with
UNAVAILABLE (reason NOT_READY, "the service is starting"), logged and counted like any
other answer. A caller that retries UNAVAILABLE, or waits for SERVING, never sees it.

Stop: SIGTERM or SIGINT, at any moment from the service's first line (shared/
stop_signals.py), is a request to stop, and so is a second one: health turns
NOT_SERVING, calls keep being served for NAJIMI_SHUTDOWN_DELAY_SECONDS (so load
balancers see it first), then calls that arrive are refused with UNAVAILABLE (reason
SHUTTING_DOWN), long-lived streams are ended, calls under way get up to
NAJIMI_GRACE_SECONDS to finish, and the process exits 0. A signal during start-up lets
the start-up work finish (at most the grace period) and stops without ever serving.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared import access_policy, auth, errors, reflection, stop_signals
from shared.interceptors import RpcInterceptor, UnknownMethods, WrappingServer
from shared.log import configure_logging, get_logger
from shared.metrics import serve_metrics
from shared.settings import Settings, load_settings

log = get_logger("najimi.server")


@dataclass
class Registration:
    """One gRPC service of an app: its descriptor and servicer (who may call what: access_policy)."""

    descriptor: ServiceDescriptor
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any

    def policy(self) -> dict[str, auth.AccessRule]:
        """Full method path -> who may call it; RuntimeError when an RPC has no rule."""
        rules = access_policy.rules_for(self.descriptor)
        return {f"/{self.descriptor.full_name}/{name}": rule for name, rule in rules.items()}


@dataclass
class App:
    """What a service contributes: its gRPC services and its start/stop work."""

    name: str
    registrations: list[Registration]
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    # Called when the server begins to stop: end long-lived streams (watches) so that
    # callers reconnect elsewhere instead of holding the graceful stop to its limit.
    drain: Callable[[], Awaitable[None]] | None = None
    token_resolvers: list[auth.TokenResolver] = field(default_factory=list)

    @property
    def service_names(self) -> list[str]:
        return [r.descriptor.full_name for r in self.registrations]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    app: App
    interceptor: RpcInterceptor
    # Set once the service begins to stop: start-up work that ends after it does not open it.
    stopping: bool = False

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.app.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        self.stopping = True
        self.interceptor.close()
        await self.health.enter_graceful_shutdown()
        if self.app.drain is not None:
            await self.app.drain()
        await self.server.stop(grace)
        if self.app.stop is not None:
            await self.app.stop()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    if not settings.tls_key_file:
        raise SystemExit("najimi: NAJIMI_TLS_KEY_FILE is required with NAJIMI_TLS_CERT_FILE")
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def create_server(settings: Settings, app: App, port: int | None = None) -> RunningServer:
    """Builds and starts the server (health NOT_SERVING); call `start_app` to become ready."""
    errors.ERROR_DOMAIN = f"{app.name}.najimi"
    static_tokens = auth.StaticTokens.from_file(settings.effective_token_hashes_file)
    authenticator = auth.Authenticator(app.token_resolvers, static=static_tokens)
    policy: dict[str, auth.AccessRule] = {}
    for registration in app.registrations:
        policy.update(registration.policy())
    interceptor = RpcInterceptor(app.name, authenticator, policy, settings.access_log)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for registration in app.registrations:
        registration.add_to_server(registration.servicer, WrappingServer(server, interceptor))
    reflection.enable_server_reflection(
        [*app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    server.add_generic_rpc_handlers((UnknownMethods(interceptor),))  # last: only what nothing else has
    address = f"{settings.host}:{settings.grpc_port if port is None else port}"
    credentials = _credentials(settings)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    running = RunningServer(server, bound, health_servicer, app, interceptor)
    await running.set_serving(False)
    await server.start()
    return running


async def start_app(running: RunningServer) -> None:
    """Runs the app's start-up work (migrations, caches), then serves and reports SERVING
    (unless the service began to stop meanwhile)."""
    if running.app.start is not None:
        await running.app.start()
    if not running.stopping:
        running.interceptor.open()
        await running.set_serving(True)


async def _serve(settings: Settings, app: App) -> int:
    """Serves until a stop signal; returns the exit status."""
    stopping = asyncio.Event()
    with stop_signals.setting(asyncio.get_running_loop(), stopping):
        if stopping.is_set():
            log.info("stopped_before_start", service=app.name)
            return 0
        running = await create_server(settings, app)
        serve_metrics(settings.host, settings.effective_metrics_port)
        log.info(
            "listening", service=app.name, port=running.port, metrics_port=settings.effective_metrics_port
        )
        starting = asyncio.create_task(start_app(running))
        waiting = asyncio.create_task(stopping.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is not None:
            waiting.cancel()
            log.error("start_failed", service=app.name, exc_info=starting.exception())
            await running.stop(0)
            return 1
        await waiting
        log.info("stopping", service=app.name, grace_seconds=settings.grace_seconds)
        serving = starting.done()
        if not serving:
            await _finish_start_up(running, starting, settings.grace_seconds)
        await running.health.enter_graceful_shutdown()
        if serving and settings.shutdown_delay_seconds:
            await asyncio.sleep(settings.shutdown_delay_seconds)  # let load balancers see NOT_SERVING
        await running.stop(settings.grace_seconds)
        log.info("stopped", service=app.name)
        return 0


async def _finish_start_up(running: RunningServer, starting: asyncio.Task[None], grace: float) -> None:
    """A stop during start-up: lets the start-up work (a migration, say) end cleanly within
    the grace period rather than cut it off, and keeps the service from opening."""
    running.stopping = True
    done, _ = await asyncio.wait({starting}, timeout=grace)
    if not done:
        starting.cancel()
        await asyncio.wait({starting})
    if not starting.cancelled() and starting.exception() is not None:
        log.warning("start_failed_while_stopping", service=running.app.name, exc_info=starting.exception())


# Young-generation collections after this many net allocations (CPython's default: 700).
GC_YOUNG_THRESHOLD = 100_000


def tune_garbage_collector() -> None:
    """Sets the cyclic garbage collector for a long-running server, once it is built.

    What start-up made (modules, protobuf descriptors, the app) lives as long as the
    process: gc.freeze() takes it out of every later collection. The RPC paths allocate
    many short-lived objects (one 1000-event message makes thousands) that reference
    counting frees, so collections that look for cycles among them after every 700 are
    mostly wasted: GC_YOUNG_THRESHOLD makes them rarer. bench/profile_bench.py, SQLite,
    two A/B runs each: StreamEvents +6 % (23,667 and 22,667 against 21,500 and 21,333
    events/s), IngestEvents +4 %.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def serve(build_app: Callable[[Settings], App], service: str) -> None:
    """A service's entry point: settings from the environment, then serve until SIGTERM.

    Exits 0 after a stop signal (one or several, at any point), 1 if start-up failed, 2
    on invalid settings.
    """
    stop_signals.install()  # the services' __main__ installs it earlier still: this is for other callers
    try:
        settings = load_settings(service)
        configure_logging(settings.log_format, settings.log_level)
        app = build_app(settings)
        tune_garbage_collector()
        status = asyncio.run(_serve(settings, app))
    finally:
        stop_signals.ignore()
    if status:
        raise SystemExit(status)
