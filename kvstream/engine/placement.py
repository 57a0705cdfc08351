"""Where a model's layers run: one device, or a device map spreading them over GPUs, the CPU and disk.

``--device-map`` is accelerate's: a strategy (``auto``, ``balanced``, ``balanced_low_0``,
``sequential``) that fills the GPUs, then the CPU, then disk, or an explicit map from module names
to devices (``{"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}``), given as JSON
text or a JSON file. Modules on disk (and, with GPUs in the map, on the CPU) are offloaded: their
weights wait there and come to the execution device for each forward pass. Every layer's keys and
values, and so its part of a cache, are on the device where that layer runs.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

DeviceMap = str | dict[str, int | str]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
PLACES = ("cpu", "disk")


def parse_device_map(text: str | None, *, here: bool = True) -> DeviceMap | None:
    """``--device-map``: a strategy name, a JSON object, or a JSON file holding one; checked (`ValueError`).

    ``here=False`` checks the form only: the map is for other machines (Ray workers), whose GPUs this
    one may not have.
    """
    if text is None:
        return None
    text = text.strip()
    if text in STRATEGIES:
        return text
    source = "--device-map"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(
                f"--device-map: {text!r} is not {', '.join(STRATEGIES)}, a JSON object or a JSON file "
                '(for example {"model.layers.0": 0, "model.layers.1": "cpu"})'
            )
        text, source = path.read_text(encoding="utf-8"), f"--device-map {path}"
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{source}: must be a JSON object from module names to devices")
    for module, place in mapping.items():
        check_place(module, place, here=here)
    return mapping


def check_place(module: str, place: Any, *, here: bool = True) -> None:
    """One entry of a device map: a GPU index, ``cuda:N``, ``cpu`` or ``disk`` (present on this machine if ``here``)."""
    if isinstance(place, bool) or not isinstance(place, (int, str)):
        raise ValueError(f"--device-map: {module}: {place!r} is not a GPU index, cuda:N, cpu or disk")
    if place in PLACES:
        return
    try:
        device = torch.device(f"cuda:{place}" if isinstance(place, int) else place)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device-map: {module}: {place!r} is not a GPU index, cuda:N, cpu or disk") from None
    if here and device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device-map: {module}: {place!r} asked for, but this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )


def main_device(device_map: DeviceMap) -> torch.device:
    """Where a mapped model mostly runs (it decides the default dtype): the first GPU in the map, else the CPU."""
    if isinstance(device_map, str):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for place in device_map.values():
        if place not in PLACES:
            return torch.device(f"cuda:{place}" if isinstance(place, int) else place)
    return torch.device("cpu")


_OFFLOAD: list[str] = []


def offload_folder() -> str:
    """A folder for weights offloaded to disk, private to this process and removed when it exits."""
    if not _OFFLOAD:
        _OFFLOAD.append(tempfile.mkdtemp(prefix="kvstream-offload-"))
        atexit.register(shutil.rmtree, _OFFLOAD[0], True)
    return _OFFLOAD[0]


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (its hook's), or None for a module without a hook."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", [hook]):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def input_device(model: Any) -> torch.device:
    """The device of the input embeddings, where token ids must go (their hook's when offloaded)."""
    embeddings = model.get_input_embeddings()
    return execution_device(embeddings) or embeddings.weight.device


def model_devices(model: Any) -> list[torch.device]:
    """Every device the model's modules run on, in order of first appearance."""
    found: dict[str, torch.device] = {}
    for module in model.modules():
        device = execution_device(module)
        if device is None:
            params = list(module.parameters(recurse=False))
            device = params[0].device if params and params[0].device.type != "meta" else None
        if device is not None:
            found.setdefault(str(device), device)
    return list(found.values()) or [torch.device("cpu")]
