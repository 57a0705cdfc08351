"""The results store's own parts: key comparison, model fingerprints, the code revision."""

from __future__ import annotations

import subprocess

import pytest

from kvstream.results import fingerprint
from kvstream.results.keys import ResultKey
from kvstream.results.provenance import code_revision, short_revision
from kvstream.testing import tiny_llama


def make_key(**changes) -> ResultKey:
    fields = dict(
        task="passkey",
        prompts="p" * 16,
        generation="g" * 16,
        model="m" * 16,
        dtype="float32",
        device="cpu",
        baseline_chunk_size=256,
        torch="2.0",
        transformers="5.0",
        kvstream="0.1.0",
        config="c" * 12,
    )
    return ResultKey(**{**fields, **changes})


def test_key_changes_name_each_component():
    key = make_key()
    assert key.changes(key.as_dict()) == []
    assert key.digest() != key.baseline().digest() and key.baseline().config == ""
    stored = make_key(prompts="q" * 16, dtype="bfloat16", torch="1.9").as_dict()
    assert key.changes(stored) == [
        "prompts changed",
        "dtype changed (bfloat16 -> float32)",
        "torch version changed (1.9 -> 2.0)",
    ]
    stored = key.as_dict()
    del stored["device"]
    assert key.changes(stored) == ["device changed"]


def test_folder_fingerprint_hashes_files_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTREAM_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("ignored")
    hashed = []
    real = fingerprint._file_sha256
    monkeypatch.setattr(fingerprint, "_file_sha256", lambda path: hashed.append(path.name) or real(path))

    first = fingerprint.folder_fingerprint(model)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert fingerprint.folder_fingerprint(model) == first and len(hashed) == 2  # cached by path, size and mtime
    (model / "model.safetensors").write_bytes(b"other!!" * 100)
    assert fingerprint.folder_fingerprint(model) != first
    assert hashed[2:] == ["model.safetensors"]


def test_fingerprint_of_a_loaded_and_an_in_memory_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTREAM_HOME", str(tmp_path / "home"))
    model = tiny_llama(seed=3)
    in_memory = fingerprint.model_fingerprint(model)
    assert in_memory == fingerprint.model_fingerprint(model)
    assert in_memory != fingerprint.model_fingerprint(tiny_llama(seed=4))
    model.save_pretrained(tmp_path / "saved")
    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert fingerprint.model_folder(loaded) == tmp_path / "saved"
    assert fingerprint.model_fingerprint(loaded) == fingerprint.folder_fingerprint(tmp_path / "saved")
    assert fingerprint.model_dtype(model) == "float32" and fingerprint.model_device(model) == "cpu"


def git(folder, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=folder,
        check=True,
        capture_output=True,
    )


def test_code_revision_of_a_checkout_clean_and_dirty(tmp_path):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-q", "-m", "one")
    clean = code_revision(package)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    assert short_revision(clean) == clean["commit"][:7]
    (package / "__init__.py").write_text("x = 2\n")
    assert code_revision(package) == {"commit": clean["commit"], "dirty": True}
    assert short_revision(code_revision(package)) == clean["commit"][:7] + "+dirty"
    outside = tmp_path / "plain"
    outside.mkdir()
    assert code_revision(outside) == {"commit": "unknown", "dirty": "unknown"}
    assert short_revision(code_revision(outside)) == "unknown"


def test_code_revision_of_this_package():
    revision = code_revision()
    assert set(revision) == {"commit", "dirty"}
    assert revision["dirty"] in (True, False, "unknown")
    if revision["commit"] != "unknown":
        assert len(revision["commit"]) == 40


@pytest.mark.parametrize("name", ["", "no/such/folder"])
def test_model_folder_needs_a_config(name):
    model = tiny_llama()
    model.name_or_path = name
    assert fingerprint.model_folder(model) is None
