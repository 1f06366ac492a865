"""`comfy-endpoint`: `serve` runs the HTTP service, `run` executes one prompt without a server."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine import settings as config

SERVE_HELP = """Serve ComfyUI API-format prompts over HTTP: POST /api/v1/prompts answers with the image, and
ComfyUI's own routes (/prompt, /queue, /history, /object_info, /view, /upload/image, /ws) work as in ComfyUI.
Every flag can also be set by the environment variable named in its help."""

RUN_HELP = """Run one API-format prompt without a server and write its outputs (for batch jobs and cloud
functions). PROMPT is a JSON file holding the prompt, or {"prompt": ...}; - reads it from standard input. Prints a
JSON summary (output files per node) on standard output; exits 1 when the prompt is invalid, 2 when it fails."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy-endpoint", description="A stateless endpoint for ComfyUI prompts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,run}")

    serve = commands.add_parser("serve", help="start the HTTP server", description=SERVE_HELP)
    config.add_arguments(serve)

    run = commands.add_parser("run", help="execute one prompt and exit", description=RUN_HELP)
    run.add_argument("prompt", metavar="PROMPT", help="prompt JSON file, or - for standard input")
    run.add_argument("--out", type=Path, default=None, help="write outputs to this folder (default: DATA_DIR/output)")
    config.add_arguments(run, names=("data_dir", "cache_size", "log_level"))

    args = parser.parse_args(argv)
    try:
        settings = config.settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(settings)
    return _run(settings, args.prompt, args.out)


def _serve(settings: config.Settings) -> int:
    import uvicorn

    from handler.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=None)
    return 0


def _run(settings: config.Settings, source: str, out: Path | None) -> int:
    from handler.oneshot import run_once

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        print(f"comfy-endpoint run: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 2
    code, summary = run_once(settings, text, out)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
