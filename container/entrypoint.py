"""Container entrypoint: listen on all interfaces and on the platform's `PORT` (Cloud Run, Heroku-style
platforms set it), then hand over to `comfy-endpoint serve` so every other setting comes from the environment."""
from __future__ import annotations

import os
import sys

from handler.cli import main


def entrypoint() -> int:
    os.environ.setdefault("COMFY_ENDPOINT_HOST", "0.0.0.0")
    if os.environ.get("PORT"):
        os.environ.setdefault("COMFY_ENDPOINT_PORT", os.environ["PORT"])
    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(entrypoint())
