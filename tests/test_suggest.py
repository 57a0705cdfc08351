"""The same "did you mean" for every name a user types: tasks, config presets, ablation presets, aliases, fields."""

from __future__ import annotations

import pytest

from kvstream.cli.ablate import load_preset
from kvstream.cli.checks import check_task
from kvstream.cli.config_fields import unknown_field_hint
from kvstream.cli.errors import CliError
from kvstream.config import ConfigError, resolve_config_path
from kvstream.data.models import resolve_model
from kvstream.data.store import DataError
from kvstream.registry import PluginError
from kvstream.suggest import closest, did_you_mean


def test_closest_finds_near_misses_only():
    assert closest("pasckey", ["passkey", "niah_single"]) == "passkey"
    assert closest("zzz", ["passkey", "niah_single"]) is None
    assert did_you_mean("zzz", ["passkey"]) == ""


@pytest.mark.parametrize(
    ("call", "error", "wanted"),
    [
        (lambda: check_task("pasckey"), PluginError, "did you mean passkey?"),
        (lambda: resolve_config_path("bits-2.6"), ConfigError, "did you mean bits-2.5?"),
        (lambda: load_preset("rotaton"), CliError, "did you mean rotation?"),
        (lambda: resolve_model("qwen2.5-coder-0.5b!"), DataError, "did you mean qwen2.5-coder-0.5b?"),
    ],
)
def test_every_kind_of_name_suggests_the_near_miss(call, error, wanted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=wanted.replace("?", r"\?").replace(".", r"\.")) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_fields_suggest_the_near_miss():
    assert unknown_field_hint("chunk_sise") == "did you mean chunk_size?"
