"""Development tokens: generated once per data directory for `make run` and tests.

`<data_dir>/dev-tokens.json` holds the plaintext tokens (mode 0600) for scripts and
grpcurl users; `<data_dir>/token-hashes.json` holds only their SHA-256 hashes, which is
all the services read (NAJIMI_TOKEN_HASHES_FILE). In production, the hashes file comes
from a Kubernetes Secret and the plaintext tokens never touch the cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.access_policy import named_service_principals
from shared.auth import hash_token, new_token
from shared.settings import SERVICE_NAMES

# The suite's own services (each presents its token when it calls another) and every
# service principal the access policy names, so a development setup can act as each.
DEV_PRINCIPALS = tuple(
    dict.fromkeys(["admin", *(f"service:{name}" for name in SERVICE_NAMES), *named_service_principals()])
)


def _write_private(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(content)


def ensure_dev_tokens(data_dir: Path) -> dict[str, str]:
    """Returns principal -> token, creating the two token files on first use."""
    tokens_file = data_dir / "dev-tokens.json"
    tokens: dict[str, str] = json.loads(tokens_file.read_text()) if tokens_file.exists() else {}
    missing = [p for p in DEV_PRINCIPALS if p not in tokens]
    if missing:
        tokens.update({principal: new_token() for principal in missing})
        _write_private(tokens_file, json.dumps(tokens, indent=2) + "\n")
    hashes = {principal: hash_token(token) for principal, token in tokens.items()}
    _write_private(data_dir / "token-hashes.json", json.dumps(hashes, indent=2) + "\n")
    return tokens
