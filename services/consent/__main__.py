"""`python -m services.consent` (console script `najimi-consent`)."""

from services.consent.app import build_app
from shared.server import serve


def main() -> None:
    serve(build_app, "consent")


if __name__ == "__main__":
    main()
