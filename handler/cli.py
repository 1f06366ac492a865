"""`comfy-endpoint`: `serve` runs the HTTP service, `run` executes one prompt without a server."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, NoReturn

from engine import settings as config

EXTRA_NODES_ENV = "COMFY_ENDPOINT_EXTRA_NODES"

SERVE_HELP = f"""Serve ComfyUI API-format prompts over HTTP: POST /api/v1/prompts answers with the image, and
ComfyUI's own routes (/prompt, /queue, /history, /object_info, /view, /upload/image, /ws) work as in ComfyUI.
Every flag can also be set by the environment variable named in its help. On SIGTERM the server stops taking
prompts (503), finishes those in flight within --drain-grace-s, and exits 0. {EXTRA_NODES_ENV}=mod1,mod2
registers extra node modules (custom nodes; the tests use it for their test-only nodes)."""

PREFETCH_HELP = """Download the models named by --preload (folder/name, comma-separated) into the model folders or
the hub cache (HF_HOME), and exit: what a container build runs to bake models into its image."""

RUN_HELP = """Run one API-format prompt without a server and write its outputs (for batch jobs and cloud
functions). PROMPT is a JSON file holding the prompt, or {"prompt": ...}; - reads it from standard input. Prints a
JSON summary (output files per node) on standard output; exits 1 when the prompt is invalid, 2 when it fails."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy-endpoint", description="A stateless endpoint for ComfyUI prompts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,run,prefetch}")

    serve = commands.add_parser("serve", help="start the HTTP server", description=SERVE_HELP)
    config.add_arguments(serve)

    run = commands.add_parser("run", help="execute one prompt and exit", description=RUN_HELP)
    run.add_argument("prompt", metavar="PROMPT", help="prompt JSON file, or - for standard input")
    run.add_argument("--out", type=Path, default=None, help="write outputs to this folder (default: DATA_DIR/output)")
    config.add_arguments(run, names=("data_dir", "cache_size", "log_level"))

    prefetch = commands.add_parser("prefetch", help="download the --preload models and exit",
                                   description=PREFETCH_HELP)
    config.add_arguments(prefetch, names=("data_dir", "extra_model_paths", "model_registry", "hub_allow",
                                          "download_retries", "preload", "log_level"))

    args = parser.parse_args(argv)
    try:
        settings = config.settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(settings)
    if args.command == "prefetch":
        return _prefetch(settings)
    return _run(settings, args.prompt, args.out)


def _serve(settings: config.Settings) -> NoReturn:
    from engine.registry import default_registry
    from handler.app import create_app
    from handler.drain import serve

    registry = default_registry(("nodes", *extra_node_modules(os.environ)))
    serve(create_app(settings, registry), settings.host, settings.port, settings.log_level, settings.drain_grace_s)


def extra_node_modules(environ: Mapping[str, str]) -> list[str]:
    """Modules named in `COMFY_ENDPOINT_EXTRA_NODES` (comma-separated, importable, each with a
    `NODE_CLASS_MAPPINGS`), registered beside the shipped nodes: custom nodes, and test-only nodes in tests."""
    return [name.strip() for name in environ.get(EXTRA_NODES_ENV, "").split(",") if name.strip()]


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


def _prefetch(settings: config.Settings) -> int:
    """Fetch every `--preload` entry into the model folders or the hub cache (HF_HOME); 1 when one fails."""
    from engine.errors import EngineError
    from engine.modelfiles import ModelFiles
    from engine.startup import preload_entries

    models = ModelFiles.from_settings(settings)
    try:
        for folder, name in preload_entries(settings.preload):
            print(f"{folder}/{name}: {models.find(folder, name)}")
    except EngineError as exc:
        print(f"comfy-endpoint prefetch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
