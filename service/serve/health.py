"""The container's health probe (`python -m service.serve.health`, the image's HEALTHCHECK): GET
/healthz on the address the server actually listens on, which `fisherguard serve` writes to its
address file once it has bound (docs/deployment.md#containers). Standard library only: it runs every
few seconds and must not pay torch's import."""

import json
import os
import sys
import urllib.request
from pathlib import Path

ADDRESS_FILE = Path(os.environ.get("FISHERGUARD_ADDRESS_FILE", "/tmp/fisherguard-address.json"))


def address() -> tuple[str, int]:
    """Where the server listens: its address file, else FISHERGUARD_HOST / FISHERGUARD_PORT as the server reads them."""
    try:
        d = json.loads(ADDRESS_FILE.read_text())
        host, port = str(d["host"]), int(d["port"])
    except (OSError, ValueError, KeyError):
        host, port = os.environ.get("FISHERGUARD_HOST", "127.0.0.1"), int(os.environ.get("FISHERGUARD_PORT", "8000"))
    return ("127.0.0.1" if host in ("0.0.0.0", "", "::") else host), port


def main() -> int:
    host, port = address()
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as r:
            return 0 if r.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
