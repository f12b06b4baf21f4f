"""`python -m services` (what `make run` runs) as a child process on free ports, its
console read line by line, for the launcher and README tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc

from shared.settings import DEFAULT_PORTS
from tests.postgres import free_port

ROOT = Path(__file__).resolve().parents[2]
BANNER_END = "Press Ctrl-C to stop."


class Launcher:
    """One run of the development launcher with its data in `data_dir`, each service on
    a free port (NAJIMI_<SERVICE>_ADDRESS)."""

    def __init__(self, data_dir: Path, *args: str, **env: str):
        self.data_dir = data_dir
        self.ports = {name: free_port() for name in DEFAULT_PORTS}
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._banner = threading.Event()
        child_env = {
            **os.environ,
            # This checkout's code, whichever directory the test runs from.
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), str(ROOT / "shared" / "gen"), os.environ.get("PYTHONPATH", "")]
            ),
            "NAJIMI_DATA_DIR": str(data_dir),
            "NAJIMI_METRICS_PORT": "0",
            "NAJIMI_GRACE_SECONDS": "5",
            **{f"NAJIMI_{name.upper()}_ADDRESS": f"127.0.0.1:{port}" for name, port in self.ports.items()},
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services", *args],
            cwd=ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.strip() == BANNER_END:
                self._banner.set()
        self._banner.set()  # the launcher ended: wake the waiter

    def wait_running(self, timeout: float = 240.0) -> None:
        """Blocks until the banner is printed; fails with the console if the launcher ends first."""
        started = time.monotonic()
        while not self._banner.wait(0.5):
            assert time.monotonic() - started < timeout, f"no banner after {timeout} s:\n{self.console()}"
        assert self.process.poll() is None, (
            f"the launcher ended ({self.process.returncode}):\n{self.console()}"
        )

    def wait_active_model(self, timeout: float = 300.0) -> rec_pb.Model:
        """Polls ListModels until a model is ACTIVE (the first model `make run` trains on the
        demo data); fails with the console if none is by the deadline."""
        tokens = json.loads((self.data_dir / "dev-tokens.json").read_text())
        admin = (("authorization", f"Bearer {tokens['admin']}"),)
        request = rec_pb.ListModelsRequest(statuses=[rec_pb.MODEL_STATUS_ACTIVE])
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.ports['recommendation']}") as channel:
            models = rec_grpc.RecommendationServiceStub(channel)
            while True:
                listed = models.ListModels(request, metadata=admin, timeout=10).models
                if listed:
                    return listed[0]
                assert time.monotonic() < deadline, f"no ACTIVE model after {timeout} s:\n{self.console()}"
                assert self.process.poll() is None, f"the launcher ended:\n{self.console()}"
                time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT to the launcher alone (`kill -INT`), which stops each service with one
        SIGTERM; returns its exit code. (A terminal's Ctrl-C also reaches the services:
        surviving that second signal is the services' own stop handling.)"""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        for reader in self._readers:
            reader.join(5)
        return code

    def console(self) -> str:
        return "\n".join([*self.stdout, "-- stderr --", *self.stderr])
