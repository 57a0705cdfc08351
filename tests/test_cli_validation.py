"""Bad inputs refused up front: one ``kvstream: error:`` line, exit code 2, nothing written, no model loaded.

Every command runs against a model folder holding only a ``config.json`` (1024 positions, no
weights), and with the model loader replaced by one that fails the test: a check that needed the
model, or that came after loading it, shows up as a failure here.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from test_cli import assert_user_error, invoke, single_thread  # noqa: F401

POSITIONS = 1024

RUN_COMMANDS = {
    "eval": ["eval", "--task", "passkey", "--samples", "1"],
    "ablate": ["ablate", "chunk_size=64,128", "--task", "passkey", "--samples", "1"],
    "tune": ["tune", "--task", "passkey", "--samples", "1", "--budget-bits", "4", "--trials", "1"],
}
"""The commands that run tasks and store results, with arguments that are fine on their own."""


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model folder with a Llama ``config.json`` and no weights: enough to read, impossible to load."""
    from transformers import LlamaConfig

    folder = tmp_path / "config-only-model"
    LlamaConfig(max_position_embeddings=POSITIONS, vocab_size=260).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Fail the test if any command loads a model."""

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the bad input was refused")

    monkeypatch.setattr("kvstream.engine.load_model", refuse)


def run(command: str, *args: object, model: Path, results: Path):
    return invoke(*RUN_COMMANDS[command], *args, "--model", model, "--results", results)


def assert_nothing_written(results: Path) -> None:
    assert not results.exists() or (results.is_dir() and not any(results.iterdir())), list(results.iterdir())


# --------------------------------------------------------------------------- --bits N/M with M < N


@pytest.mark.parametrize("command", ["eval", "ablate", "tune"])
@pytest.mark.parametrize("bits", ["4/3", "16/8", "8/4"])
def test_high_bits_below_normal_bits(command, bits, model_dir, tmp_path):
    results = tmp_path / "results"
    line = assert_user_error(run(command, "--bits", bits, model=model_dir, results=results), "--bits", bits)
    assert "NORMAL/HIGH" in line and "HIGH" in line and ">=" in line
    assert_nothing_written(results)


def test_high_bits_below_normal_in_a_bits_sweep_and_quantize_run(model_dir, tmp_path):
    results = tmp_path / "results"
    assert_user_error(run("ablate", "bits=2/8,4/3", model=model_dir, results=results), "--bits", "4/3", "NORMAL/HIGH")
    assert_nothing_written(results)
    assert_user_error(invoke("quantize-run", "hi", "--bits", "16/8", "--model", model_dir), "--bits", "NORMAL/HIGH")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--key-bits-sink-outlier", "2"], ["key_bits_sink_outlier", "key_bits_normal", ">="]),
        (["--bits", "16"], ["key_bits_sink_outlier", "16", ">="]),
        (["--value-bits-normal", "8", "--value-bits-sink-outlier", "4"], ["value_bits_sink_outlier", "8"]),
    ],
)
def test_high_bits_below_normal_through_config_fields(args, needles, model_dir, tmp_path):
    results = tmp_path / "results"
    assert_user_error(run("eval", *args, model=model_dir, results=results), *needles)
    assert_nothing_written(results)


def test_high_bits_below_normal_in_a_yaml_config(model_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("key_bits_normal: 8\nkey_bits_sink_outlier: 4\n")
    results = tmp_path / "results"
    assert_user_error(run("eval", "--config", config, model=model_dir, results=results), "key_bits_sink_outlier", "8")
    assert_nothing_written(results)


# --------------------------------------------------------------------------- --length beyond the model's positions


@pytest.mark.parametrize("command", ["eval", "ablate", "tune"])
def test_length_beyond_the_model_positions(command, model_dir, tmp_path):
    results = tmp_path / "results"
    result = run(command, "--length", "5000", model=model_dir, results=results)
    assert_user_error(result, "--length", "5000", str(POSITIONS), "max_position_embeddings")
    assert_nothing_written(results)


def test_length_within_the_positions_passes_the_check(model_dir, tmp_path):
    from kvstream.cli.checks import check_positions, model_positions

    assert model_positions(str(model_dir)) == POSITIONS
    check_positions(str(model_dir), POSITIONS)
    check_positions(str(model_dir), None)


def test_max_new_tokens_beyond_the_model_positions(model_dir):
    result = invoke("quantize-run", "hi", "--max-new-tokens", "2000", "--model", model_dir)
    assert_user_error(result, "--max-new-tokens", "2000", str(POSITIONS))


# --------------------------------------------------------------------------- --results that cannot be written


@pytest.mark.parametrize("command", ["eval", "ablate", "tune"])
def test_results_path_is_a_file(command, model_dir, tmp_path):
    results = tmp_path / "results.csv"
    results.write_text("not a folder\n")
    assert_user_error(run(command, model=model_dir, results=results), "--results", str(results), "not a folder")
    assert results.read_text() == "not a folder\n"
    inside = results / "runs"
    assert_user_error(run(command, model=model_dir, results=inside), "--results", str(inside), str(results))


@pytest.mark.parametrize("command", ["eval", "ablate", "tune"])
def test_results_folder_not_writable(command, model_dir, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: let the probe meet the refusal a user would get
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == locked.resolve():
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        for results in (locked, locked / "results"):
            line = assert_user_error(run(command, model=model_dir, results=results), "--results", str(results))
            assert "not writable" in line
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- corpora that are not text


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("command", ["eval", "ablate", "tune"])
def test_corpus_of_random_bytes(command, model_dir, tmp_path):
    corpus = tmp_path / "haystack.txt"
    corpus.write_bytes(random_bytes(4096))
    results = tmp_path / "results"
    line = assert_user_error(
        run(command, "--corpus", corpus, model=model_dir, results=results), "--corpus", str(corpus)
    )
    assert "not text" in line and "UTF-8" in line
    assert_nothing_written(results)


def test_corpus_of_control_characters_and_in_a_folder(model_dir, tmp_path):
    results = tmp_path / "results"
    control = tmp_path / "control.txt"
    control.write_bytes(bytes(random.Random(1).choices(range(1, 32), k=4096)))  # valid UTF-8, no text
    line = assert_user_error(run("eval", "--corpus", control, model=model_dir, results=results), str(control))
    assert "control characters" in line
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("A fine essay about startups.\n" * 50, encoding="utf-8")
    (folder / "b.txt").write_bytes(random_bytes(2048, seed=2))
    assert_user_error(run("eval", "--corpus", folder, model=model_dir, results=results), str(folder / "b.txt"))
    assert_nothing_written(results)


def test_text_corpora_pass_the_check(tmp_path):
    from kvstream.cli.checks import check_corpus

    text = tmp_path / "essay.txt"
    text.write_text("Plain text, with tabs\tand\r\nline breaks, and accents: café, naïve.\f\n" * 20, encoding="utf-8")
    check_corpus(str(text))
    check_corpus("paul_graham")
    check_corpus(None)
