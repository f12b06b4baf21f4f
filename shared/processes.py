"""Starting service processes and waiting until they serve (dev launcher and tests).

A child logs a "listening" line with its port as soon as it has bound, so a caller can
start a service on port 0 and learn the port; readiness then comes from the standard
health service (Watch until SERVING), never from waiting a fixed time.

A child starts with SIGTERM and SIGINT blocked (the mask is inherited through exec)
and unblocks them once its handler is installed (shared/stop_signals.py), so a stop
sent at any moment of its start-up is handled, never fatal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.stop_signals import STOP_SIGNALS


class ServiceProcess:
    """One `python -m services.<name> [args]` child whose log lines are kept and written to a
    file (and handed to `echo(service, line)`, if given). A worker that serves no port (the
    training worker) is started the same way; only `wait_serving` is not for it."""

    def __init__(
        self,
        service: str,
        env: Mapping[str, str],
        log_path: Path,
        echo: Callable[[str, str], None] | None = None,
        args: Sequence[str] = (),
    ):
        self.service = service
        self.log_path = log_path
        self.lines: list[str] = []
        self._line_read = threading.Condition()  # notified for every line, and at the end
        self._log_ended = False
        self._listening = threading.Event()
        self._echo = echo
        self.port = 0
        # Blocked in this thread only while it forks: the child inherits the mask.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}", *args],
                env={**os.environ, **env, "NAJIMI_LOG_FORMAT": "json"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("a") as log_file:
            for line in self.process.stderr:
                with self._line_read:
                    self.lines.append(line)
                    self._line_read.notify_all()
                log_file.write(line)
                log_file.flush()
                if self._echo is not None:
                    self._echo(self.service, line)
                if not self._listening.is_set() and '"listening"' in line:
                    self.port = int(json.loads(line)["port"])
                    self._listening.set()
        self._listening.set()  # the process ended: wake anyone waiting
        with self._line_read:
            self._log_ended = True
            self._line_read.notify_all()

    def wait_for_line(self, wanted: Callable[[str], bool], timeout: float = 10.0) -> str | None:
        """The first log line (from the start) for which `wanted` is true, waiting up to
        `timeout` seconds for it to be read: a line the child has written may not have been
        read yet when a call to it returns. None if the time ran out or the log ended."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._line_read:
            while True:
                for line in self.lines[checked:]:
                    if wanted(line):
                        return line
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._log_ended or remaining <= 0:
                    return None
                self._line_read.wait(remaining)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 60.0) -> bool:
        """Blocks until the service has bound its port (its start-up work then runs); False
        if it ended first or the time ran out."""
        return self._listening.wait(timeout) and self.port != 0

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Blocks until the service's health says SERVING; raises if it dies or times out."""
        if not self.wait_listening(timeout):
            raise RuntimeError(f"{self.service} did not start:\n{''.join(self.lines[-30:])}")
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True
            )
            try:
                for reply in watch:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as error:
                raise RuntimeError(
                    f"{self.service} never became SERVING: {error}\n{''.join(self.lines[-30:])}"
                ) from error
            finally:
                watch.cancel()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then waits for the exit code (SIGKILL only if the grace period is overrun)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(5)
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._reader.join(5)
