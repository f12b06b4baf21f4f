"""`python -m services.profile` (console script `najimi-profile`)."""

from services.profile.app import build_app
from shared.server import serve


def main() -> None:
    serve(build_app, "profile")


if __name__ == "__main__":
    main()
