"""Peers: other KV-cache compressors run on the same samples as kvstream, each a row beside it.

Two kinds:

- **adapters** (:class:`Peer`): a compressor with its own runtime, run on kvstream's prompt and
  answer token ids through ``run()``, which returns a :class:`PeerResult` (greedy text, the gold
  answer's teacher-forced log-likelihood, bits per element, timings):
  llama.cpp's KV quantization (``llamacpp-*``, through ``llama-cpp-python``) and NVIDIA kvpress's
  eviction presses (``kvpress-*``, in kvpress's own environment);
- **caches** (:class:`CachePeer`): compressors already registered as kvstream caches by the
  plugins (transformers' ``QuantizedCache`` with quanto, the KIVI-style cache), which run through
  kvstream's own evaluation harness from their :meth:`CachePeer.config`.

Every peer's ``unavailable()`` is ``None`` when it can run here, else the one-line reason (the
row is then skipped with it). Nothing here imports torch, transformers or a peer's library until
a peer is checked or run: :mod:`kvstream.peers.kvpress_worker` is started under kvpress's own
interpreter, where this package's ``__init__`` must import as well.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstream.peers.base import Peer, PeerError, PeerResult, PeerUnavailable

DEFAULT_MODEL = "smollm2-135m"

LLAMACPP_TYPES = ("f16", "q8_0", "q4_0")
"""llama.cpp KV types listed by default (f16 is llama.cpp's own full-precision baseline)."""
KVPRESS_PRESSES = ("snapkv", "expected-attention")
KVPRESS_BITS = (4.5, 2.5)
"""Bits per element the default kvpress rows hold (kept tokens = bits / 16)."""


@dataclass(frozen=True)
class CachePeer:
    """A peer registered as a kvstream cache by a plugin; it runs through kvstream's own harness."""

    name: str
    label: str
    cache: str
    """The cache strategy's registered name (``quanto``, ``kivi``)."""
    bits: int
    value_quant_groups: int | None = None
    requires: str | None = None
    """A top-level module it needs beyond the plugin, checked without importing it."""
    install: str = ""

    kind = "cache"

    def config(self) -> Any:
        """The :class:`~kvstream.config.CompressionConfig` that runs it."""
        from kvstream.config import CompressionConfig

        extra = {} if self.value_quant_groups is None else {"value_quant_groups": self.value_quant_groups}
        return CompressionConfig(cache=self.cache, key_bits_normal=self.bits, value_bits_normal=self.bits, **extra)

    def unavailable(self) -> str | None:
        names = {ep.name for ep in md.entry_points(group="kvstream.caches")}
        if self.cache not in names:
            return f"the '{self.cache}' cache is not registered ({self.install})"
        if self.requires:
            try:
                found = importlib.util.find_spec(self.requires) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"{self.requires} is not installed ({self.install})"
        return None


CACHE_PEERS: dict[str, CachePeer] = {
    peer.name: peer
    for peer in (
        CachePeer("quanto-4", "quanto 4-bit (QuantizedCache)", "quanto", 4, requires="optimum.quanto",
                  install="pip install -e plugins/kvstream-quanto"),
        CachePeer("quanto-2", "quanto 2-bit (QuantizedCache)", "quanto", 2, requires="optimum.quanto",
                  install="pip install -e plugins/kvstream-quanto"),
        CachePeer("kivi-4", "KIVI-style 4-bit (plugin)", "kivi", 4, value_quant_groups=32,
                  install="pip install -e plugins/kvstream-kivi"),
        CachePeer("kivi-2", "KIVI-style 2-bit (plugin)", "kivi", 2, value_quant_groups=32,
                  install="pip install -e plugins/kvstream-kivi"),
    )
}  # fmt: skip
"""Cache peers by name; their configurations mirror the quality benchmark's quanto and KIVI rows."""


def adapter_names() -> list[str]:
    """The adapter peers listed by default, in table order."""
    names = [f"llamacpp-{kv}" for kv in LLAMACPP_TYPES]
    names += [f"kvpress-{press}-{bits:g}" for press in KVPRESS_PRESSES for bits in KVPRESS_BITS]
    return names


def peer_names() -> list[str]:
    """Every peer listed by default: the adapters, then the cache peers."""
    return adapter_names() + list(CACHE_PEERS)


def make_peer(name: str, model: str | Path = DEFAULT_MODEL, *, threads: int = 2) -> Peer | CachePeer:
    """The peer called ``name`` on ``model``.

    Names: ``llamacpp-<type>`` (``f16``, ``q8_0``, ``q4_0``, and the other llama.cpp KV types),
    ``kvpress-<press>-<bits>`` (``snapkv``, ``expected-attention``, ... keeping ``bits/16`` of the
    tokens), ``kvpress-none`` (kvpress's environment without a press) and the names of
    :data:`CACHE_PEERS` (``model`` and ``threads`` do not apply to those).
    """
    if name in CACHE_PEERS:
        return CACHE_PEERS[name]
    if name.startswith("llamacpp-"):
        from kvstream.peers.llamacpp import LlamaCppPeer

        return LlamaCppPeer(name.removeprefix("llamacpp-"), model, threads=threads)
    if name.startswith("kvpress-"):
        from kvstream.peers.presses import PRESS_LABELS, KvpressPeer

        rest = name.removeprefix("kvpress-")
        if rest == "none":
            return KvpressPeer("none", None, model, threads=threads)
        press, _, bits = rest.rpartition("-")
        if press in PRESS_LABELS:
            try:
                return KvpressPeer(press, float(bits), model, threads=threads)
            except ValueError:
                pass
    raise ValueError(
        f"unknown peer {name!r} (known: {', '.join(peer_names())}; also llamacpp-<type>, kvpress-<press>-<bits>)"
    )


def all_peers(model: str | Path = DEFAULT_MODEL, *, threads: int = 2) -> list[Peer | CachePeer]:
    """Every peer of :func:`peer_names` on ``model``."""
    return [make_peer(name, model, threads=threads) for name in peer_names()]


__all__ = [
    "CACHE_PEERS",
    "DEFAULT_MODEL",
    "CachePeer",
    "Peer",
    "PeerError",
    "PeerResult",
    "PeerUnavailable",
    "adapter_names",
    "all_peers",
    "make_peer",
    "peer_names",
]
