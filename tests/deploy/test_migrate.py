"""`najimi-migrate` (shared/migrate.py), the command the Kubernetes migration Job runs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from shared.db import Database
from shared.settings import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[2]


def newest_revision(service: str) -> str | None:
    config = Config()
    config.set_main_option(
        "script_location", str(importlib.import_module(f"services.{service}.app").MIGRATIONS)
    )
    return ScriptDirectory.from_config(config).get_current_head()


def run_migrate(*args: str, database_url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'shared' / 'gen'}",
        "NAJIMI_DATABASE_URL": database_url,
        "NAJIMI_DATA_DIR": str(data_dir),
        "NAJIMI_LOG_FORMAT": "json",
    }
    return subprocess.run(
        [sys.executable, "-m", "shared.migrate", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_migrate_brings_the_schema_to_the_newest_revision_and_is_idempotent(
    service: str, database_url: str, tmp_path: Path
) -> None:
    for _run in range(2):  # the Job runs again on every apply: the second run changes nothing
        result = run_migrate(service, database_url=database_url, data_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        assert '"event": "migrated"' in result.stderr + result.stdout
    database = Database(database_url, service)
    try:
        assert database.current_revision() == newest_revision(service)
    finally:
        database.close()


@pytest.mark.parametrize("args", [(), ("billing",), ("consent", "billing")])
def test_migrate_refuses_unknown_or_missing_services_and_names_the_known_ones(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    result = run_migrate(*args, database_url=f"sqlite:///{tmp_path / 'x.db'}", data_dir=tmp_path)
    assert result.returncode != 0
    assert "usage: najimi-migrate SERVICE" in result.stderr
    assert all(name in result.stderr for name in SERVICE_NAMES)
    assert not (tmp_path / "x.db").exists()  # nothing was migrated before the refusal


@pytest.mark.postgres
def test_replicas_starting_at_once_migrate_once_and_all_start(postgres_cluster, tmp_path: Path) -> None:
    """The migration Job and several replicas run the same migrations at the same moment:
    every one succeeds (the advisory lock makes the others wait, then find the schema current)."""
    database_url = postgres_cluster.create_database("t_migrate_race")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "shared.migrate", "profile", "consent"],
            env={
                **os.environ,
                "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'shared' / 'gen'}",
                "NAJIMI_DATABASE_URL": database_url,
                "NAJIMI_DATA_DIR": str(tmp_path),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    for service in ("profile", "consent"):
        database = Database(database_url, service)
        try:
            assert database.current_revision() == newest_revision(service)
        finally:
            database.close()
