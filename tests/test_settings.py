"""Settings: environment, flags, and the README's table kept true."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine import settings as config


def test_every_setting_has_a_field_row():
    assert [f.name for f in config.FIELDS] == [f.name for f in dataclasses.fields(config.Settings)]


def test_readme_documents_every_flag_and_variable():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for flag, env, default, _help in config.describe():
        assert f"| `{flag}` | `{env}` | `{default}` |" in readme


def test_environment_then_flags():
    env = {"COMFY_ENDPOINT_PORT": "9000", "COMFY_ENDPOINT_DATA_DIR": "/srv/data", "COMFY_ENDPOINT_MAX_QUEUE": "3"}
    settings = config.settings_from_env(env, max_queue=7)
    assert (settings.port, settings.data_dir, settings.max_queue) == (9000, Path("/srv/data"), 7)
    assert settings.output_dir == Path("/srv/data/output")


@pytest.mark.parametrize("env", [{"COMFY_ENDPOINT_PORT": "http"}, {"COMFY_ENDPOINT_MAX_QUEUE": "-1"},
                                 {"COMFY_ENDPOINT_LOG_LEVEL": "loud"}])
def test_bad_environment_values_name_the_variable(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        config.settings_from_env(env)
