"""`python -m services` (what `make run` calls): the whole suite for development.

Generates development tokens (printed once, kept in <data_dir>/dev-tokens.json),
starts the four services on SQLite under the data directory, waits until each is
SERVING, loads the demo data, and on Ctrl-C (or SIGTERM) stops them all gracefully.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess
from shared.settings import DEFAULT_PORTS, SERVICE_NAMES


def main() -> None:
    data_dir = Path(os.environ.get("NAJIMI_DATA_DIR", "data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = ensure_dev_tokens(data_dir)
    addresses = {
        f"NAJIMI_{name.upper()}_ADDRESS": f"127.0.0.1:{port}" for name, port in DEFAULT_PORTS.items()
    }
    children = []
    for name in SERVICE_NAMES:
        env = {
            **addresses,
            "NAJIMI_DATA_DIR": str(data_dir),
            "NAJIMI_SERVICE_TOKEN": tokens[f"service:{name}"],
        }
        children.append(ServiceProcess(name, env, data_dir / f"{name}.log", echo=True))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for child in children:
            child.wait_serving()
        from services.demo_data import load_demo_data

        summary = load_demo_data(addresses, tokens["admin"], data_dir)
        print(
            "\nnajimi is running:\n"
            + "".join(f"  {c.service:<15} {c.address}\n" for c in children)
            + f"development tokens (also in {data_dir / 'dev-tokens.json'}):\n"
            + json.dumps(tokens, indent=2)
            + f"\ndemo data: {summary}\nPress Ctrl-C to stop.\n",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0) and all(c.process.poll() is None for c in children):
            pass
    finally:
        codes = {c.service: c.terminate() for c in children}
        print(f"stopped: {codes}", file=sys.stderr)
    sys.exit(0 if all(code == 0 for code in codes.values()) else 1)


if __name__ == "__main__":
    main()
