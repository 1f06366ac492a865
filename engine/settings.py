"""The one settings object: every knob of the service, fed by environment variables and CLI flags.

Each field is declared once in `FIELDS` with its flag, environment variable, default and help; the CLI builds its
parser from that table and the README's configuration table lists the same rows. A flag given on the command line
wins over the environment, which wins over the default.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "COMFY_ENDPOINT_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"  # 0.0.0.0 in containers (the entrypoint sets it)
    port: int = 8188  # ComfyUI's port, so existing clients need no change
    data_dir: Path = Path("comfy-data")  # ComfyUI's base-directory layout: models/, input/, output/, temp/
    max_queue: int = 16  # pending prompts beyond which new ones get 429 and /readyz 503
    max_body_bytes: int = 64 * 1024 * 1024  # request bodies above this get 413
    history_size: int = 1000  # finished prompts kept for /history
    cache_size: int = 256  # node outputs kept for reuse across prompts (entries, least recently used evicted)
    retry_after_s: int = 5  # the Retry-After header sent with 429
    device: str = "auto"  # the executor's device: auto (CUDA when present), cpu, cuda, cuda:N
    extra_model_paths: Path | None = None  # ComfyUI's extra_model_paths.yaml, to reuse existing model folders
    model_registry: Path | None = None  # a user's registry file, added to the packaged known-models registry
    hub_allow: str = ""  # orgs or org/repo allowed in hf:// references, comma-separated; empty: hf:// refused
    download_retries: int = 3  # attempts per file before a download error is reported
    preload: str = ""  # folder/name entries to fetch at start, comma-separated (e.g. checkpoints/x.safetensors)
    preload_load: bool = False  # also load the preloaded checkpoints into memory at start
    warmup_prompt: Path | None = None  # a prompt file run once at start; /readyz answers 503 until it ran
    memory_budget_mb: int = 0  # resident models' budget (GPU memory on CUDA, RAM on CPU); 0: most of the device
    store_url: str = ""  # s3://bucket/prefix for images shared by replicas; empty: the local data directory
    s3_endpoint: str = ""  # endpoint URL of an S3-compatible store (credentials from AWS_* variables)
    drain_grace_s: int = 30  # after SIGTERM, seconds to finish in-flight prompts before exiting
    log_level: str = "info"

    @property
    def input_dir(self) -> Path:
        return self.data_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.data_dir / "temp"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"


@dataclass(frozen=True)
class Field:
    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError(f"unknown log level {text!r}; use debug, info, warning, error or critical")
    return level


FIELDS: tuple[Field, ...] = (
    Field("host", str, "address to listen on (0.0.0.0 to accept connections from other machines)"),
    Field("port", int, "TCP port to listen on"),
    Field("data_dir", Path, "base directory laid out like ComfyUI's: models/, input/, output/, temp/"),
    Field("max_queue", _positive_int, "most prompts waiting to run; beyond it POST answers 429 and /readyz 503"),
    Field("max_body_bytes", _positive_int, "largest request body accepted, in bytes; larger ones get 413"),
    Field("history_size", _positive_int, "finished prompts kept for /history (oldest dropped first)"),
    Field("cache_size", _positive_int, "node outputs kept between prompts for reuse (entries, LRU)"),
    Field("retry_after_s", _positive_int, "seconds sent in Retry-After with a 429"),
    Field("device", str, "device the executor runs models on: auto (first CUDA GPU, else cpu), cpu, cuda:N"),
    Field("extra_model_paths", Path, "ComfyUI's extra_model_paths.yaml, to use existing model folders"),
    Field("model_registry", Path, "extra known-models registry file (JSON), added to the packaged one"),
    Field("hub_allow", str, "orgs or org/repo allowed in hf:// model references, comma-separated (empty: off)"),
    Field("download_retries", _positive_int, "attempts per file before a hub download is reported failed"),
    Field("preload", str, "models to fetch at start, comma-separated folder/name (e.g. checkpoints/x.safetensors)"),
    Field("preload_load", _bool, "also load the preloaded checkpoints into memory at start"),
    Field("warmup_prompt", Path, "a prompt file run once at start; /readyz answers 503 until it has run"),
    Field("memory_budget_mb", _positive_int, "memory for resident models in MiB (GPU on CUDA, RAM on CPU); 0: auto"),
    Field("store_url", str, "s3://bucket/prefix to share images between replicas (empty: local data directory)"),
    Field("s3_endpoint", str, "endpoint URL of an S3-compatible store; credentials from AWS_* variables"),
    Field("drain_grace_s", _positive_int, "seconds after SIGTERM to finish in-flight prompts before exiting"),
    Field("log_level", _log_level, "logging level: debug, info, warning, error"),
)


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `COMFY_ENDPOINT_*` variables; keyword overrides (e.g. from flags) win."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in FIELDS:
        raw = environ.get(field.env)
        if raw is not None and raw != "":
            try:
                values[field.name] = field.parse(raw)
            except ValueError as exc:
                raise ValueError(f"{field.env}={raw!r}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add one flag per field (or per named field); defaults stay None so the environment can fill them."""
    defaults = Settings()
    for field in FIELDS:
        if names is not None and field.name not in names:
            continue
        default = getattr(defaults, field.name)
        parser.add_argument(
            field.flag,
            type=_argparse_type(field),
            default=None,
            metavar=field.name.upper(),
            help=f"{field.help} (env {field.env}, default {default})",
        )


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in FIELDS}
    return settings_from_env(environ, **overrides)


def _argparse_type(field: Field) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return field.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = field.name
    return parse


def describe() -> list[tuple[str, str, Any, str]]:
    """(flag, env, default, help) rows, the source of the README's configuration table."""
    defaults = Settings()
    return [(f.flag, f.env, getattr(defaults, f.name), f.help) for f in FIELDS]
