"""Strategy discovery through entry points: quantizers, stats managers, caches and tasks.

kvstream's own strategies are registered in its ``pyproject.toml`` exactly like a third party's;
nothing here lists them. A plugin that fails to load is recorded with its reason and every other
strategy stays usable; two distributions registering one name is an error naming both.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any

GROUPS = {
    "quantizers": "kvstream.quantizers",
    "stats": "kvstream.stats",
    "caches": "kvstream.caches",
    "tasks": "kvstream.tasks",
}


class PluginError(LookupError):
    """An unknown, broken or ambiguous strategy name; the message says which and why."""


@dataclass
class PluginInfo:
    """One discovered strategy: where it comes from and whether it loaded."""

    group: str
    name: str
    value: str
    package: str
    version: str
    obj: Any = None
    error: str | None = None

    @property
    def description(self) -> str:
        if self.error:
            return f"BROKEN: {self.error}"
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass
class Registry:
    """Entry points of one group, loaded lazily and checked against the group's interface."""

    group: str
    _infos: dict[str, PluginInfo] | None = field(default=None, repr=False)
    _conflicts: dict[str, list[PluginInfo]] = field(default_factory=dict, repr=False)

    def _discover(self) -> dict[str, PluginInfo]:
        if self._infos is None:
            infos: dict[str, PluginInfo] = {}
            for ep in md.entry_points(group=GROUPS[self.group]):
                dist = ep.dist
                info = PluginInfo(
                    group=self.group,
                    name=ep.name,
                    value=ep.value,
                    package=dist.metadata["Name"] if dist else "?",
                    version=dist.version if dist else "?",
                )
                info._ep = ep  # type: ignore[attr-defined]
                if ep.name in infos and infos[ep.name].package != info.package:
                    self._conflicts.setdefault(ep.name, [infos[ep.name]]).append(info)
                    continue
                infos[ep.name] = info
            self._infos = infos
        return self._infos

    def _load(self, info: PluginInfo) -> None:
        if info.obj is not None or info.error is not None:
            return
        try:
            obj = info._ep.load()  # type: ignore[attr-defined]
        except Exception as exc:  # a plugin's import may fail in any way; report it, keep the rest
            info.error = f"failed to import {info.value}: {exc.__class__.__name__}: {exc}"
            return
        missing = _missing_interface(self.group, obj)
        if missing:
            info.error = f"{info.value} does not implement the {self.group} interface (missing {missing})"
            return
        info.obj = obj

    def names(self) -> list[str]:
        return sorted(self._discover())

    def infos(self) -> list[PluginInfo]:
        """Every strategy of the group, loaded (broken ones carry their error)."""
        out = []
        for name in self.names():
            if name in self._conflicts:
                continue  # listed once per distribution below
            info = self._discover()[name]
            self._load(info)
            out.append(info)
        for name, clash in self._conflicts.items():
            packages = " and ".join(f"{c.package} ({c.value})" for c in clash)
            for c in clash:
                c.error = f"name {name!r} is registered by both {packages}"
            out.extend(clash)
        return out

    def get(self, name: str) -> Any:
        """The strategy object registered under ``name``, or a `PluginError` saying why not."""
        infos = self._discover()
        if name in self._conflicts:
            packages = " and ".join(f"{c.package} ({c.value})" for c in self._conflicts[name])
            raise PluginError(f"{self.group} {name!r} is registered by both {packages}; uninstall one")
        if name not in infos:
            known = ", ".join(self.names()) or "none installed"
            raise PluginError(
                f"unknown {self.group[:-1] if self.group != 'stats' else 'stats'} {name!r} "
                f"(known: {known}; `kvstream plugins` lists them)"
            )
        info = infos[name]
        self._load(info)
        if info.error:
            raise PluginError(f"{self.group} {name!r} is unusable: {info.error}")
        return info.obj


_INTERFACES: dict[str, tuple[str, ...]] = {
    "quantizers": ("quantize", "dequantize"),
    "stats": ("update", "key_outliers", "value_outliers", "reset", "snapshot"),
    "caches": ("from_model",),
    "tasks": ("samples", "run"),
}


def _missing_interface(group: str, obj: Any) -> str:
    missing = [attr for attr in _INTERFACES[group] if not callable(getattr(obj, attr, None))]
    return ", ".join(missing)


_REGISTRIES: dict[str, Registry] = {}


def registry(group: str) -> Registry:
    """The (process-wide, lazily discovered) registry of one group."""
    if group not in GROUPS:
        raise PluginError(f"unknown plugin group {group!r}; groups are {', '.join(GROUPS)}")
    if group not in _REGISTRIES:
        _REGISTRIES[group] = Registry(group)
    return _REGISTRIES[group]


def refresh() -> None:
    """Forget discovered entry points (after installing a plugin into the running interpreter)."""
    _REGISTRIES.clear()


def get(group: str, name: str) -> Any:
    return registry(group).get(name)


def all_plugins() -> list[PluginInfo]:
    return [info for group in GROUPS for info in registry(group).infos()]
