"""The development launcher (`make run`): its switches. The console with the demo data,
and a second start, are checked by test_readme_examples.py on the same launch."""

from __future__ import annotations

import json
import os
import subprocess
import time

import grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc

from tests.e2e.launcher import ROOT, Launcher


def test_no_demo_starts_empty_and_log_info_shows_the_services_info_lines(tmp_path):
    launcher = Launcher(tmp_path / "data", "--no-demo", NAJIMI_CONSOLE_LEVEL="info")
    try:
        launcher.wait_running()
        assert not any("demo data" in line for line in launcher.stdout), launcher.console()
        assert not (tmp_path / "data" / "demo-data.json").exists()
        tokens = json.loads((tmp_path / "data" / "dev-tokens.json").read_text())
        with grpc.insecure_channel(f"127.0.0.1:{launcher.ports['profile']}") as channel:
            listed = pb_grpc.ProfileServiceStub(channel).ListCustomers(
                pb.ListCustomersRequest(),
                metadata=(("authorization", f"Bearer {tokens['admin']}"),),
                timeout=10,
            )
        assert list(listed.customers) == []
        for name in ("consent", "profile", "recommendation", "replenishment"):
            assert any(line.startswith(f"  [{name}] INFO listening") for line in launcher.stderr), name
        # The training worker it started takes a queued run (with no data, the run then fails).
        with grpc.insecure_channel(f"127.0.0.1:{launcher.ports['recommendation']}") as channel:
            models = rec_grpc.RecommendationServiceStub(channel)
            admin = (("authorization", f"Bearer {tokens['admin']}"),)
            queued = models.TrainModel(rec_pb.TrainModelRequest(request_id="t-1"), metadata=admin, timeout=10)
            deadline = time.monotonic() + 60
            state = rec_pb.TRAINING_RUN_STATE_QUEUED
            while state == rec_pb.TRAINING_RUN_STATE_QUEUED and time.monotonic() < deadline:
                time.sleep(0.1)
                request = rec_pb.GetTrainingRunRequest(training_run_id=queued.training_run.training_run_id)
                state = models.GetTrainingRun(request, metadata=admin, timeout=10).training_run.state
        assert state != rec_pb.TRAINING_RUN_STATE_QUEUED, launcher.console()
        assert any(line.startswith("  [training] INFO training_started") for line in launcher.stderr)
    finally:
        code = launcher.stop()
    assert code == 0, launcher.console()


def test_a_bad_console_level_stops_the_launcher_naming_the_variable(tmp_path):
    launcher = Launcher(tmp_path / "data", NAJIMI_CONSOLE_LEVEL="loud")
    assert launcher.process.wait(60) != 0
    launcher.stop()
    assert any("NAJIMI_CONSOLE_LEVEL" in line for line in launcher.stderr), launcher.console()
    assert not list((tmp_path / "data").glob("*.log"))  # no service was started


def test_the_make_switches_reach_the_launcher():
    def planned(*args: str) -> str:
        # -n: print the commands only; -o: take .venv as installed (it is not rebuilt).
        # Under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        return subprocess.run(
            ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert planned("run").strip().endswith("-m services")
    assert (
        planned("run", "DEMO=0", "LOG=info").strip()
        == "NAJIMI_CONSOLE_LEVEL=info .venv/bin/python -m services --no-demo"
    )
    reset = planned("reset").strip()
    assert reset == "rm -rf data" and ".venv" not in reset


def test_the_demo_shortens_the_cancellation_window_unless_the_environment_sets_it():
    from services.__main__ import demo_settings, demo_window_seconds

    window = "NAJIMI_REPLENISHMENT_CANCELLATION_WINDOW_SECONDS"
    promotion = "NAJIMI_REPLENISHMENT_PROMOTION_INTERVAL_SECONDS"
    assert demo_settings("replenishment", {}) == {window: "120", promotion: "5"}
    assert demo_settings("replenishment", {window: "600"}) == {promotion: "5"}
    assert demo_settings("consent", {}) == {}
    assert demo_window_seconds({}) == "120" and demo_window_seconds({window: "600"}) == "600"
