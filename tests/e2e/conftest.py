"""The whole suite as real processes on loopback, started the way `make run` starts it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess
from shared.settings import SERVICE_NAMES
from tests.postgres import free_port


class Suite:
    """Four service processes sharing a data directory (and optionally a PostgreSQL URL)."""

    def __init__(self, data_dir: Path, database_url: str = "", extra_env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.database_url = database_url
        self.extra_env = extra_env or {}
        self.tokens = ensure_dev_tokens(data_dir)
        self.processes: dict[str, ServiceProcess] = {}
        # Each service gets its port up front, so every one can be told where the others are.
        self.ports = {name: free_port() for name in SERVICE_NAMES}

    def env_for(self, name: str) -> dict[str, str]:
        env = {
            "NAJIMI_DATA_DIR": str(self.data_dir),
            "NAJIMI_PORT": str(self.ports[name]),
            "NAJIMI_METRICS_PORT": "0",
            "NAJIMI_SERVICE_TOKEN": self.tokens[f"service:{name}"],
            "NAJIMI_GRACE_SECONDS": "5",
            **self.extra_env,
        }
        if self.database_url:
            env["NAJIMI_DATABASE_URL"] = self.database_url
        for other, port in self.ports.items():
            env[f"NAJIMI_{other.upper()}_ADDRESS"] = f"127.0.0.1:{port}"
        return env

    def start(self, name: str, **env: str) -> ServiceProcess:
        process = ServiceProcess(name, {**self.env_for(name), **env}, self.data_dir / f"{name}.log")
        self.processes[name] = process
        process.wait_serving()
        return process

    def start_all(self) -> Suite:
        for name in ("consent", *(n for n in SERVICE_NAMES if n != "consent")):
            self.start(name)
        return self

    def address(self, name: str) -> str:
        return self.processes[name].address

    def auth(self, principal: str = "admin") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[principal]}"),)

    def restart(self, name: str) -> ServiceProcess:
        assert self.processes[name].terminate() == 0
        return self.start(name)

    def stop_all(self) -> dict[str, int]:
        return {name: process.terminate() for name, process in self.processes.items()}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    running = Suite(tmp_path_factory.mktemp("suite")).start_all()
    yield running
    running.stop_all()
