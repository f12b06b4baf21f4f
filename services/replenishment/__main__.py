"""`python -m services.replenishment` (console script `najimi-replenishment`)."""

from services.replenishment.app import build_app
from shared.server import serve


def main() -> None:
    serve(build_app, "replenishment")


if __name__ == "__main__":
    main()
