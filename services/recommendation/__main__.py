"""`python -m services.recommendation` (console script `najimi-recommendation`)."""

from services.recommendation.app import build_app
from shared.server import serve


def main() -> None:
    serve(build_app, "recommendation")


if __name__ == "__main__":
    main()
