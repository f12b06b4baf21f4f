"""The four services, served in this process and wired to each other, for the fuzz tests.

Each server runs on an event loop of its own in a background thread (as if in a process
of its own: one that blocks its loop stalls only itself), so the tests can call them
with plain (blocking) gRPC channels and send any bytes they like: the
channel's serializers are the identity. They get the demo data (services/demo_data.py,
a few customers) and a device registered through RegisterDevice, whose token is the
`device` principal's.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as repl_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from services.demo_data import load_demo
from shared.dev_tokens import ensure_dev_tokens
from shared.settings import SERVICE_NAMES
from tests.conftest import InProcessService, start_in_process
from tests.fuzz.rpcs import Rpc
from tests.postgres import free_port

T = TypeVar("T")

DEMO_CUSTOMERS = 6  # enough for every List RPC to have a second page at page_size=1
UNARY_DEADLINE = 10.0  # generous: a unary call that takes longer is taken for a hang
WATCH_DEADLINE = 0.5  # a watch follows its feed forever: it is cut off after this
WATCH_MESSAGES = 3  # ... or after this many messages
PROBE_DEADLINE = 0.5  # probing access: a watch that is still open by then has admitted the caller
BAD_TOKEN = "not-a-token-anyone-was-issued"  # a token no one holds
NOBODY = "nobody"
BAD_TOKEN_PRINCIPAL = "bad-token"
DEVICE = "device"
# Fields of a reply that hand back a position to continue from.
TOKEN_FIELD_SUFFIXES = ("page_token", "cursor")


def identity(value: bytes) -> bytes:
    return value


@dataclass(frozen=True)
class Outcome:
    """How one call ended: its code, status message and how many messages came back."""

    code: grpc.StatusCode
    details: str
    replies: list[bytes]


class ServerLoop:
    """An asyncio event loop in a daemon thread, for servers that must not share the tests' thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"fuzz-{name}", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ServerFailures:
    """The exceptions behind INTERNAL answers, read from the servers' `rpc_failed` log lines
    by request id (the tests set x-request-id), so a failure report can name its cause."""

    def __init__(self) -> None:
        self.by_request_id: dict[str, str] = {}

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") == "rpc_failed" and event.get("exc_info"):
            error = event["exc_info"]
            if isinstance(error, BaseException):
                self.by_request_id[str(event.get("request_id"))] = f"{type(error).__name__}: {error}"
        return event

    def install(self) -> None:
        # In place: loggers already in use hold this very list (structlog caches them).
        processors = structlog.get_config()["processors"]
        processors.insert(1, self)

    def remove(self) -> None:
        processors = structlog.get_config()["processors"]
        if self in processors:
            processors.remove(self)


class FuzzSuite:
    """consent, profile, recommendation and replenishment, started like the real suite."""

    def __init__(self, data_dir: Path, memory: list[tuple[str, int]]):
        self.data_dir = data_dir
        self.tokens = ensure_dev_tokens(data_dir)
        self.ports = {name: free_port() for name in SERVICE_NAMES}
        self.addresses = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        self.loops: dict[str, ServerLoop] = {}
        self.services: dict[str, InProcessService] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.failures = ServerFailures()
        self.device_id = ""
        self.device_token = ""
        self._devices = itertools.count(1)
        self._request_ids = itertools.count(1)
        # Real tokens and cursors returned by List and Watch RPCs, by RPC path.
        self.page_tokens: dict[str, list[str]] = {}
        self.demo_ids: list[str] = []
        # Who gets past authentication and authorisation, by RPC path (see `probe_access`).
        self.admitted: dict[str, list[str]] = {}
        # (what had just run, VmRSS in KiB) after each test; the first is the baseline.
        self.memory = memory

    # Start and stop ----------------------------------------------------------------------

    def start(self) -> FuzzSuite:
        self.failures.install()
        wiring = {f"{name}_address": address for name, address in self.addresses.items()}
        for name in ("consent", *(n for n in SERVICE_NAMES if n != "consent")):
            self.loops[name] = ServerLoop(name)
            self.services[name] = self.loops[name].run(
                start_in_process(
                    name,
                    self.data_dir,
                    self.tokens,
                    port=self.ports[name],
                    service_token=self.tokens[f"service:{name}"],
                    grace_seconds=1,
                    **wiring,
                )
            )
            self.channels[name] = grpc.insecure_channel(self.addresses[name])
        return self

    def load_demo_data(self) -> None:
        addresses = {f"NAJIMI_{name.upper()}_ADDRESS": address for name, address in self.addresses.items()}
        report = load_demo(addresses, self.tokens["admin"], self.data_dir, customers=DEMO_CUSTOMERS)
        self.demo_ids = [
            report.device_id,
            *(customer.customer_id for customer in report.data.customers),
            *(item.item_id for item in report.data.items[:20]),
        ]
        self.register_device()

    def register_device(self) -> None:
        """A device of a demo customer, registered through RegisterDevice: its token is `device`'s."""
        number = next(self._devices)
        reply = repl_grpc.ReplenishmentServiceStub(self.channels["replenishment"]).RegisterDevice(
            repl_pb.RegisterDeviceRequest(
                request_id=f"fuzz-device-{number}",
                customer_id="demo-aiko",
                manufacturer="Fuzzco",
                model="F-1",
                kind="printer",
                serial_number=f"FZ-{number:04d}",
                slots=[repl_pb.Slot(slot_id="black", item_id="ink-black-xl", capacity=100.0, unit="percent")],
            ),
            metadata=self.metadata("service:storefront"),
            timeout=UNARY_DEADLINE,
        )
        self.device_id, self.device_token = reply.device.device_id, reply.device_token

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()

        async def stop(service: InProcessService) -> None:
            await service.channel.close()
            await service.running.stop(0)

        try:
            for name, service in self.services.items():
                self.loops[name].run(stop(service))
        finally:
            for loop in self.loops.values():
                loop.close()
            self.failures.remove()

    # Calling -----------------------------------------------------------------------------

    def principals(self) -> list[str]:
        """Everyone a call may come from: admin, every service, the device, nobody, a bad token."""
        return [*self.tokens, DEVICE, NOBODY, BAD_TOKEN_PRINCIPAL]

    def metadata(self, principal: str, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        token = {NOBODY: None, BAD_TOKEN_PRINCIPAL: BAD_TOKEN, DEVICE: self.device_token}.get(
            principal, self.tokens.get(principal)
        )
        found = (("authorization", f"Bearer {token}"),) if token is not None else ()
        return found + ((("x-request-id", request_id),) if request_id else ())

    def new_request_id(self) -> str:
        return f"fuzz-{next(self._request_ids)}"

    def call(
        self, rpc: Rpc, principal: str, bodies: list[bytes], request_id: str, timeout: float | None = None
    ) -> Outcome:
        """Sends `bodies` (one for a unary request) as they are; never raises for a status."""
        channel = self.channels[rpc.app]
        metadata = self.metadata(principal, request_id)
        kinds: dict[tuple[bool, bool], Callable[..., Any]] = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }
        method = kinds[rpc.client_streaming, rpc.server_streaming](
            rpc.path, request_serializer=identity, response_deserializer=identity
        )
        request: Any = iter(bodies) if rpc.client_streaming else bodies[0]
        if timeout is None:
            timeout = WATCH_DEADLINE if rpc.is_watch else UNARY_DEADLINE
        replies: list[bytes] = []
        try:
            if not rpc.server_streaming:
                replies.append(method(request, timeout=timeout, metadata=metadata))
                return Outcome(grpc.StatusCode.OK, "", replies)
            stream = method(request, timeout=timeout, metadata=metadata)
            try:
                for reply in stream:
                    replies.append(reply)
                    if rpc.is_watch and len(replies) >= WATCH_MESSAGES:
                        stream.cancel()
                        return Outcome(grpc.StatusCode.OK, "read enough of the watch", replies)
            finally:
                stream.cancel()
            return Outcome(grpc.StatusCode.OK, "", replies)
        except grpc.RpcError as error:
            return Outcome(error.code(), error.details() or "", replies)

    def probe_access(self, rpcs: Iterable[Rpc]) -> None:
        """Finds, by calling each RPC with an empty request as everyone who holds a token,
        whom it admits: the fuzz tests send most requests as one of them, to get past the door."""
        for rpc in rpcs:
            # A device is admitted only to its own device, so its probe names it (the others'
            # stay empty: an admin's DeregisterDevice naming it would end the device).
            own = {"device_id": self.device_id} if "device_id" in rpc.input_type.fields_by_name else {}
            device_probe = message_factory.GetMessageClass(rpc.input_type)(**own).SerializeToString()
            self.admitted[rpc.path] = [
                principal
                for principal in [*self.tokens, DEVICE]
                if self.call(
                    rpc,
                    principal,
                    [device_probe if principal == DEVICE else b""],
                    self.new_request_id(),
                    timeout=PROBE_DEADLINE,
                ).code
                not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            ]

    # Real page tokens ----------------------------------------------------------------------

    def collect_page_tokens(self, rpcs: Iterable[Rpc]) -> None:
        """Calls every RPC that pages (or hands back a cursor) as each principal until one may,
        with page_size 1 and the demo customer, and keeps every position it returns."""
        for rpc in rpcs:
            output_fields = [f for f in rpc.output_type.fields if f.name.endswith(TOKEN_FIELD_SUFFIXES)]
            if not output_fields:
                continue
            request = message_factory.GetMessageClass(rpc.input_type)(**self.listing_fields(rpc))
            for principal in self.admitted.get(rpc.path, self.tokens):
                outcome = self.call(rpc, principal, [request.SerializeToString()], self.new_request_id())
                if outcome.code == grpc.StatusCode.OK and outcome.replies:
                    found = self.page_tokens.setdefault(rpc.path, [])
                    for body in outcome.replies:
                        reply = message_factory.GetMessageClass(rpc.output_type).FromString(body)
                        found.extend(v for f in output_fields if (v := getattr(reply, f.name)))
                    break

    def listing_fields(self, rpc: Rpc) -> dict[str, Any]:
        """Fields that make a List request valid and non-empty: one row a page, a demo customer."""
        wanted = {"page_size": 1, "customer_id": "demo-aiko", "device_id": self.device_id}
        return {name: value for name, value in wanted.items() if name in rpc.input_type.fields_by_name}

    # Liveness and memory -------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        """Each server's overall health status, or the error that came back instead."""
        found = {}
        for name, channel in self.channels.items():
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=UNARY_DEADLINE
                )
                found[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                found[name] = f"{error.code().name}: {error.details()}"
        return found

    def record_memory(self, label: str) -> float:
        """Samples VmRSS after `label`; returns the growth since the first sample, in MiB."""
        self.memory.append((label, resident_set_kib()))
        return (self.memory[-1][1] - self.memory[0][1]) / 1024


def _release_free_memory() -> None:
    """Hands memory that is free but still held back to the system, so that VmRSS counts
    what is alive: glibc keeps freed blocks in each thread's arena (gRPC's threads, the
    servers' loop, the tests'), and after the first large message it keeps large ones too."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: VmRSS counts what it keeps, too
        pass


def resident_set_kib() -> int:
    """This process's resident set size (VmRSS) in KiB; the servers run in this process too."""
    _release_free_memory()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")
