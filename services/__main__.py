"""`python -m services` (what `make run` calls): the whole suite for development.

Generates development tokens (kept in <data_dir>/dev-tokens.json), starts the four
services on SQLite under the data directory, says when each is SERVING, starts the
recommendation training worker (which runs the runs TrainModel queues), loads the demo
data (unless --no-demo), registers the demo devices and starts the device simulator that
plays them (services/replenishment/simulator.py), prints where everything is, trains and
activates a first recommendation model on the demo data in the background
(services/demo_model.py; a line says when it is ACTIVE), and on Ctrl-C (or SIGTERM) stops
them all gracefully.

The console stays short: each service's log goes to <data_dir>/<service>.log, and only
its lines at NAJIMI_CONSOLE_LEVEL (default `warning`) or above reach the console.
Each service listens where NAJIMI_<SERVICE>_ADDRESS says (default 127.0.0.1 and its
usual port), so a test can run the suite on free ports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import FrameType

import grpc

from services.demo_data import LoadReport, load_demo, register_demo_devices
from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess
from shared.settings import DEFAULT_PORTS, SERVICE_NAMES, load_settings

LEVELS = ("debug", "info", "warning", "error", "critical")
CONSOLE_LEVEL_VARIABLE = "NAJIMI_CONSOLE_LEVEL"


def say(line: str = "") -> None:
    print(line, flush=True)


def console_level(environ: Mapping[str, str]) -> str:
    level = environ.get(CONSOLE_LEVEL_VARIABLE, "warning").strip().lower() or "warning"
    if level not in LEVELS:
        sys.exit(f"{CONSOLE_LEVEL_VARIABLE}={level!r}: must be one of {', '.join(LEVELS[:4])}")
    return level


def service_addresses(environ: Mapping[str, str]) -> dict[str, str]:
    """service -> host:port, from NAJIMI_<SERVICE>_ADDRESS or the service's default port."""
    return {
        name: environ.get(f"NAJIMI_{name.upper()}_ADDRESS") or f"127.0.0.1:{port}"
        for name, port in DEFAULT_PORTS.items()
    }


class ConsoleEcho:
    """Hands a service's log lines at the console level or above to the console, readably."""

    def __init__(self, level: str, log_dir: str):
        self.threshold = LEVELS.index(level)
        self.log_dir = log_dir
        self.lock = threading.Lock()

    def __call__(self, service: str, line: str) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):  # not a log line: a crash's traceback, say; always shown
            text = line.rstrip()
        else:
            level = str(entry.pop("level", "info")).lower()
            if level in LEVELS and LEVELS.index(level) < self.threshold:
                return
            for noise in ("timestamp", "logger_name"):
                entry.pop(noise, None)
            event = entry.pop("event", "")
            # A traceback stays in the log file; the console gets its last line.
            details = " ".join(f"{key}={_last_line(value)}" for key, value in entry.items())
            text = f"{level.upper()} {event} {details}".rstrip()
            if "exception" in entry:
                text += f" (traceback in {self.log_dir}/{service}.log)"
        with self.lock:
            print(f"  [{service}] {text}", file=sys.stderr, flush=True)


def _last_line(value: object) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def relative(path: Path) -> str:
    """`path` relative to the working directory when it is inside it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# With the demo, orders are cancellable for two minutes (not a day) and placed within
# seconds after that, so the simulated fulfilment ships them while you watch. A variable
# set in the environment wins.
DEMO_SETTINGS = {
    "replenishment": {
        "NAJIMI_REPLENISHMENT_CANCELLATION_WINDOW_SECONDS": "120",
        "NAJIMI_REPLENISHMENT_PROMOTION_INTERVAL_SECONDS": "5",
    }
}


def demo_settings(name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The demo's settings of service `name` that the environment does not set itself."""
    return {key: value for key, value in DEMO_SETTINGS.get(name, {}).items() if key not in environ}


def demo_window_seconds(environ: Mapping[str, str]) -> str:
    """The demo orders' cancellation window, as the replenishment service gets it."""
    key = "NAJIMI_REPLENISHMENT_CANCELLATION_WINDOW_SECONDS"
    return environ.get(key, DEMO_SETTINGS["replenishment"][key])


def start_services(
    data_dir: Path,
    addresses: Mapping[str, str],
    tokens: Mapping[str, str],
    echo: ConsoleEcho,
    demo: bool = False,
) -> dict[str, ServiceProcess]:
    """Starts every service and returns once all are SERVING, one console line each (with
    the demo's settings when `demo`)."""
    child_env = {f"NAJIMI_{name.upper()}_ADDRESS": address for name, address in addresses.items()}
    if echo.threshold == 0 and "NAJIMI_LOG_LEVEL" not in os.environ:
        child_env["NAJIMI_LOG_LEVEL"] = "debug"  # asked for debug on the console: log it too
    started = time.monotonic()
    children = {
        name: ServiceProcess(
            name,
            {
                **child_env,
                "NAJIMI_PORT": addresses[name].rpartition(":")[2],
                "NAJIMI_DATA_DIR": str(data_dir),
                "NAJIMI_SERVICE_TOKEN": tokens[f"service:{name}"],
                **(demo_settings(name, os.environ) if demo else {}),
            },
            data_dir / f"{name}.log",
            echo=echo,
        )
        for name in SERVICE_NAMES
    }
    with ThreadPoolExecutor(len(children)) as pool:
        waits = {pool.submit(child.wait_serving): name for name, child in children.items()}
        try:
            for done in as_completed(waits):
                done.result()
                name = waits[done]
                seconds = time.monotonic() - started
                say(f"  {name:<15} {children[name].address:<16} serving after {seconds:.1f} s")
        except BaseException:
            for child in children.values():
                child.terminate()
            raise
    return children


TRAINING_WORKER = "training"  # its console label and log name (data/training.log)


def start_training_worker(
    data_dir: Path, addresses: Mapping[str, str], tokens: Mapping[str, str], echo: ConsoleEcho
) -> ServiceProcess:
    """The training worker (`python -m services.recommendation.train --worker`), with the
    recommendation service's settings: the same database, model directory and token."""
    env = {f"NAJIMI_{name.upper()}_ADDRESS": address for name, address in addresses.items()}
    if echo.threshold == 0 and "NAJIMI_LOG_LEVEL" not in os.environ:
        env["NAJIMI_LOG_LEVEL"] = "debug"
    env |= {"NAJIMI_DATA_DIR": str(data_dir), "NAJIMI_SERVICE_TOKEN": tokens["service:recommendation"]}
    return ServiceProcess(
        "recommendation.train",
        env,
        data_dir / f"{TRAINING_WORKER}.log",
        echo=lambda _service, line: echo(TRAINING_WORKER, line),
        args=["--worker"],
    )


SIMULATOR = "simulator"  # its console label and log name (data/simulator.log)
# The demo replays the last 20 days at a simulated day per second, then runs live: the
# demo devices run low in the replay (orders within a minute); each is offline for a day
# and a half early in it.
SIMULATOR_ARGS = (
    *("--demo", "--fulfil", "--skip", "aiko-printer"),
    *("--day-seconds", "1", "--history-days", "20", "--offline-days", "1.5"),
)


def start_demo_devices(
    data_dir: Path,
    children: Mapping[str, ServiceProcess],
    tokens: Mapping[str, str],
    echo: ConsoleEcho,
    report: LoadReport,
) -> ServiceProcess | None:
    """Registers the demo devices (tokens in demo-devices.json), then starts the simulator
    that plays them (`python -m services.replenishment.simulator`), as service:storefront
    for its device reads and service:fulfilment for shipping and delivering their orders."""
    address = children["replenishment"].address
    try:
        devices = register_demo_devices(
            address,
            tokens["service:storefront"],
            data_dir,
            report.data,
            report.customers.erased,
            report.device_id,
        )
    except grpc.RpcError as error:
        say(f"  the demo devices were not registered ({error.code().name}: {error.details()})")
        return None
    kinds = ", ".join(device.kind.replace("_", " ") for device in devices)
    say(f"  {len(devices)} simulated devices ({kinds}; tokens in {relative(data_dir / 'demo-devices.json')})")
    env = {"NAJIMI_REPLENISHMENT_ADDRESS": address, "NAJIMI_DATA_DIR": str(data_dir)}
    if echo.threshold == 0 and "NAJIMI_LOG_LEVEL" not in os.environ:
        env["NAJIMI_LOG_LEVEL"] = "debug"
    return ServiceProcess(
        "replenishment.simulator",
        env,
        data_dir / f"{SIMULATOR}.log",
        echo=lambda _service, line: echo(SIMULATOR, line),
        args=SIMULATOR_ARGS,
    )


def banner(
    data_dir: Path,
    children: Mapping[str, ServiceProcess],
    first_model: bool = False,
    simulating: bool = False,
) -> str:
    tokens_file = relative(data_dir / "dev-tokens.json")
    consent = children["consent"].address
    training = "runs the training runs TrainModel queues"
    if first_model:
        training += "; the first model on the demo data trains now (a line says when it is ACTIVE)"
    return (
        "\nnajimi is running:\n"
        + "".join(f"  {name:<15} {child.address}\n" for name, child in children.items())
        + f"  {TRAINING_WORKER:<15} {training}\n"
        + (
            f"  {SIMULATOR:<15} plays the demo devices and fulfils their orders (each PENDING,"
            f" cancellable, for {demo_window_seconds(os.environ)} s, then PLACED)\n"
            if simulating
            else ""
        )
        + f"Logs: {relative(data_dir)}/<service>.log (the console shows warnings and errors;"
        f" {CONSOLE_LEVEL_VARIABLE}=info or `make run LOG=info` shows more).\n"
        f"Development tokens (principal -> token): {tokens_file}. For example:\n"
        f'  ADMIN=$(python3 -c \'import json; print(json.load(open("{tokens_file}"))["admin"])\')\n'
        f'  grpcurl -plaintext -H "authorization: Bearer $ADMIN" -d \'{{"page_size": 5}}\' \\\n'
        f"    {consent} najimi.consent.v1.ConsentService/ListPurposes\n"
        'grpcurl is in .venv/bin; more examples in README.md, "Calling the services with grpcurl".\n'
        "Press Ctrl-C to stop."
    )


def load_demo_data(
    data_dir: Path, children: Mapping[str, ServiceProcess], admin_token: str
) -> LoadReport | None:
    say("Loading the demo data (`make run DEMO=0` starts without it):")
    addresses = {f"NAJIMI_{name.upper()}_ADDRESS": child.address for name, child in children.items()}
    try:
        report = load_demo(addresses, admin_token, data_dir, progress=lambda line: say(f"  {line}"))
    except grpc.RpcError as error:
        say(f"  the demo data did not load ({error.code().name}: {error.details()}); the services run on")
        return None
    if report.already_loaded:
        say(f"  {report.lines()[0]}")
    say(f"  done in {report.seconds:.1f} s")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-demo", action="store_true", help="start without loading the demo data")
    args = parser.parse_args(argv)
    level = console_level(os.environ)
    addresses = service_addresses(os.environ)
    data_dir = Path(os.environ.get("NAJIMI_DATA_DIR", "data")).resolve()
    echo = ConsoleEcho(level, relative(data_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = ensure_dev_tokens(data_dir)

    stop = threading.Event()
    running = False
    console = threading.Lock()  # the first-model thread says nothing after "Stopping…"

    def say_while_running(line: str) -> None:
        with console:
            if not stop.is_set():
                say(line)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not running:  # still starting: abandon the start-up, then stop what runs
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)

    say(f"Starting the four services (data and logs in {relative(data_dir)}/):")
    children: dict[str, ServiceProcess] = {}
    workers: dict[str, ServiceProcess] = {}
    failed = False
    try:
        children = start_services(data_dir, addresses, tokens, echo, demo=not args.no_demo)
        # After the services: the recommendation service has migrated the schema it polls.
        workers[TRAINING_WORKER] = start_training_worker(
            data_dir, {name: child.address for name, child in children.items()}, tokens, echo
        )
        report = None if args.no_demo else load_demo_data(data_dir, children, tokens["admin"])
        if report is not None:
            simulator = start_demo_devices(data_dir, children, tokens, echo, report)
            if simulator:
                workers[SIMULATOR] = simulator
        first_model = report is not None
        say(banner(data_dir, children, first_model, SIMULATOR in workers))
        if first_model:
            # Imported here, after the banner: its imports (SQLAlchemy, the copy's tables) take
            # about 0.5 s that the start-up need not wait for.
            from services.demo_model import train_first_model_in_background

            train_first_model_in_background(
                {name: child.address for name, child in children.items()},
                tokens,
                load_settings("recommendation", data_dir=data_dir),
                stop,
                say_while_running,
            )
        running = True
        while not stop.wait(1.0):
            ended = [
                name for name, child in {**children, **workers}.items() if child.process.poll() is not None
            ]
            if ended:
                say(f"{', '.join(ended)} stopped on its own (see its log): stopping the others")
                failed = True
                break
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:  # a service that did not start: its last log lines say why
        print(error, file=sys.stderr, flush=True)
        failed = True
    finally:
        running = True  # a second Ctrl-C while stopping only repeats the request
        with console:
            stop.set()
            if children:
                say("Stopping…")
        codes = {name: child.terminate() for name, child in {**workers, **children}.items()}
    exits = [f"{name} exited {code}" for name, code in codes.items() if code != 0]
    if children:
        say("Stopped: " + (", ".join(exits) if exits else "every service exited 0"))
    sys.exit(1 if failed or exits else 0)


if __name__ == "__main__":
    main()
