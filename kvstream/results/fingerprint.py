"""The model a result was measured with: a hash of its files, its dtype and its device.

Hashing a model's files reads every byte once; the hash of each file is then kept in
``<kvstream home>/fingerprints.json`` under its path with its size and modification time, so a
later run re-reads only files that changed. A model built in memory (no folder behind it) is
hashed from its config and tensors, once per model object.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any

from kvstream.results.keys import digest

CACHE_NAME = "fingerprints.json"
_BLOCK = 1 << 22
_in_memory: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def model_folder(model: Any) -> Path | None:
    """The folder the model was loaded from (``from_pretrained``), when it still holds a ``config.json``."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    folder = Path(str(name)).expanduser()
    return folder if (folder / "config.json").is_file() else None


def model_fingerprint(model: Any) -> str:
    """Hash of the model's files, or of its config and tensors when it has no folder."""
    folder = model_folder(model)
    if folder is not None:
        return folder_fingerprint(folder)
    if model not in _in_memory:
        _in_memory[model] = _tensors_fingerprint(model)
    return _in_memory[model]


def folder_fingerprint(folder: Path) -> str:
    """Hash of every file under ``folder`` (hidden ones aside), each file's hash cached by path, size and mtime."""
    from kvstream.data.store import home, write_json_atomic
    from kvstream.results.io import read_json

    cache_path = home() / CACHE_NAME
    try:
        cache: dict[str, Any] = read_json(cache_path)
    except (OSError, ValueError):
        cache = {}
    changed = False
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        stat = path.stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        where = str(path.resolve())
        known = cache.get(where)
        if not isinstance(known, dict) or {k: known.get(k) for k in stamp} != stamp:
            known = {**stamp, "sha256": _file_sha256(path)}
            cache[where] = known
            changed = True
        entries.append((relative.as_posix(), known["sha256"]))
    if changed:
        write_json_atomic(cache_path, cache)
    return digest(entries)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def _tensors_fingerprint(model: Any) -> str:
    import torch

    sha = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        sha.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(data.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def model_dtype(model: Any) -> str:
    """The dtype of the model's floating-point weights (``float32``, ``bfloat16``, ...)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "unknown"


def model_device(model: Any) -> str:
    """Where the weights are: ``cpu``, ``cuda:0 (NVIDIA H200)``, several joined by commas under a device map."""
    import torch

    devices = sorted({t.device for t in model.parameters()}, key=str)

    def name(device: torch.device) -> str:
        if device.type == "cuda":
            return f"{device} ({torch.cuda.get_device_name(device)})"
        return str(device)

    return ", ".join(name(d) for d in devices) or "cpu"
