"""Container entrypoint: listen on all interfaces and on the platform's `PORT` (Cloud Run, Heroku-style
platforms set it), then hand over to `comfy-endpoint serve` so every other setting comes from the environment.

The server runs in this process, so the container engine's SIGTERM reaches it directly and starts the drain
(handler/drain.py). As PID 1 a process gets no default signal actions: until the server installs its handlers
(imports take seconds), a SIGTERM would be ignored, so one is installed here that simply exits.
"""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _exit_before_serving(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # nothing is in flight yet


def entrypoint() -> int:
    signal.signal(signal.SIGTERM, _exit_before_serving)
    os.environ.setdefault("COMFY_ENDPOINT_HOST", "0.0.0.0")
    if os.environ.get("PORT"):
        os.environ.setdefault("COMFY_ENDPOINT_PORT", os.environ["PORT"])
    from handler.cli import main

    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(entrypoint())
