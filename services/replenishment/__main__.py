"""`python -m services.replenishment` (console script `najimi-replenishment`)."""

from shared import stop_signals

# First, before the slow imports: from here on SIGTERM or SIGINT is a clean stop (exit 0).
stop_signals.install()

from services.replenishment.app import build_app  # noqa: E402
from shared.server import serve  # noqa: E402


def main() -> None:
    serve(build_app, "replenishment")


if __name__ == "__main__":
    main()
