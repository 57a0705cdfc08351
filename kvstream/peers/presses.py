"""NVIDIA kvpress's eviction presses, run in kvpress's own environment through a JSON-lines worker.

kvpress 0.5.5 requires ``transformers<5.3`` (kvstream pins 5.24) and ``pandas<3``, so it cannot share
kvstream's environment: ``make peers`` builds ``.venv-kvpress`` beside ``.venv`` with the pins of
:data:`KVPRESS_ENV`, and each peer here talks to :mod:`kvstream.peers.kvpress_worker` started with
that environment's Python (``KVSTREAM_KVPRESS_PYTHON`` names another interpreter). Peers of one
interpreter, model and thread count share one worker, which loads the model once.

The model is kvstream's own converted folder (safetensors, fp32 on the CPU) of the same model, so
kvpress and kvstream read identical weights; only the transformers version differs, and every
result names it.

Bytes per token: an eviction press keeps a fraction of the prompt's tokens at full width, so a
press matches a cache of ``b`` bits per element when it keeps ``b / 16`` of the tokens it compresses
(``compression_ratio = 1 - b / 16``) against fp16. The peers listed by default keep 4.5/16 and
2.5/16: 4.5 bits is kvstream's 4-bit cache with its scales and zero-points (and llama.cpp's q4_0),
2.5 bits kvstream's 2-bit caches with theirs (the ``bits-2.5`` preset). ``bits_per_element`` is
measured from the tokens the cache holds at the end of generation (the kept prompt tokens, the
question fed after compression and the generated tokens), counted at 16 bits each: kvpress holds
them in the model's dtype, fp16 or bf16 on a GPU; the CPU run here holds fp32, and ``bits_basis``
says so with that figure too.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from kvstream.peers.base import PeerError, PeerResult, PeerUnavailable, check_inputs, kv_bits_per_element
from kvstream.peers.jsonlines import WorkerProcess

KVPRESS_ENV = ("torch==2.13.0", "transformers==5.2.0", "kvpress==0.5.5")
"""What ``make peers`` installs into kvpress's environment (kvpress 0.5.5 needs transformers>=4.56,<5.3)."""

ENV_VAR = "KVSTREAM_KVPRESS_PYTHON"
WORKER_MODULE = "kvstream.peers.kvpress_worker"
START_TIMEOUT = 300.0
RUN_TIMEOUT = 3600.0

PRESS_LABELS = {
    "snapkv": "SnapKV",
    "expected-attention": "expected attention",
    "streaming-llm": "StreamingLLM",
    "knorm": "key norm",
    "tova": "TOVA",
    "none": "no press",
}


def source_root() -> Path:
    """The folder holding the ``kvstream`` package (put on the worker's ``PYTHONPATH``)."""
    import kvstream

    return Path(kvstream.__file__).resolve().parent.parent


def default_python() -> Path:
    """kvpress's interpreter: ``$KVSTREAM_KVPRESS_PYTHON``, else ``.venv-kvpress`` beside the sources."""
    named = os.environ.get(ENV_VAR)
    if named:
        return Path(named).expanduser()
    folder = "Scripts" if sys.platform == "win32" else "bin"
    return source_root() / ".venv-kvpress" / folder / "python"


def keep_for_bits(bits: float) -> float:
    """The fraction of tokens an fp16 eviction cache keeps to hold ``bits`` bits per element."""
    if not 0 < bits <= 16:
        raise ValueError(f"bits must be in (0, 16], got {bits}")
    return bits / 16


# --------------------------------------------------------------------------- shared workers

_WORKERS: dict[tuple[str, ...], WorkerProcess] = {}
_FAILED: dict[tuple[str, ...], str] = {}
_LOCK = threading.Lock()


def worker_command(python: Path) -> list[str]:
    return [str(python), "-m", WORKER_MODULE]


def _worker(python: Path, argv: list[str] | None, threads: int) -> WorkerProcess:
    """The running worker for this interpreter (or command) and thread count, started once; a failed start is kept."""
    where = str(python.parent.parent) if argv is None else " ".join(argv)
    argv = argv or worker_command(python)
    key = (*argv, str(threads))
    with _LOCK:
        if key in _FAILED:
            raise PeerUnavailable(_FAILED[key])
        worker = _WORKERS.get(key)
        if worker is not None and worker.running:
            return worker
        env = dict(os.environ)
        root = str(source_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(
            OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
            TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        )  # fmt: skip
        worker = WorkerProcess(argv, name="kvpress worker", env=env, start_timeout=START_TIMEOUT)
        try:
            worker.start()
        except PeerError as error:
            _FAILED[key] = f"kvpress does not run in {where}: {error}"
            raise PeerUnavailable(_FAILED[key]) from None
        _WORKERS[key] = worker
        return worker


def close_workers() -> None:
    """End every kvpress worker this process started."""
    with _LOCK:
        for worker in _WORKERS.values():
            worker.close()
        _WORKERS.clear()
        _FAILED.clear()


class KvpressPeer:
    """One kvpress press at one compression ratio, on kvstream's converted copy of ``model``."""

    def __init__(
        self,
        press: str,
        bits: float | None = None,
        model: str | Path = "smollm2-135m",
        *,
        threads: int = 2,
        question_tokens: int = 1,
        options: dict[str, Any] | None = None,
        python: str | Path | None = None,
        command: list[str] | None = None,
        name: str | None = None,
        label: str | None = None,
    ) -> None:
        if press not in PRESS_LABELS:
            raise ValueError(f"unknown kvpress press {press!r} (known: {', '.join(PRESS_LABELS)})")
        if (press == "none") != (bits is None):
            raise ValueError("give bits for a press, and none for 'none'")
        self.press = press
        self.bits = bits
        self.keep = 1.0 if bits is None else keep_for_bits(bits)
        self.model = model
        self.threads = threads
        self.question_tokens = question_tokens
        self.options = dict(options or {})
        self.python = Path(python).expanduser() if python else default_python()
        self.command = list(command) if command else None
        self.name = name or (f"kvpress-{press}" if bits is None else f"kvpress-{press}-{bits:g}")
        kind = PRESS_LABELS[press]
        if bits is None:
            self.label = label or "kvpress, no press (its own environment)"
        else:
            self.label = label or f"kvpress {kind}, keeps {bits:g}/16 of tokens ({bits:g} bits)"

    @property
    def compression_ratio(self) -> float:
        """kvpress's ``compression_ratio``: the fraction of the compressed tokens that it evicts."""
        return 1.0 - self.keep

    def unavailable(self) -> str | None:
        if self.command is None and not self.python.is_file():
            return (
                f"kvpress's own environment is missing: no {self.python} "
                f"(make peers builds it with {' '.join(KVPRESS_ENV)}; or set {ENV_VAR})"
            )
        try:
            _worker(self.python, self.command, self.threads)
        except PeerUnavailable as error:
            return str(error)
        return None

    def versions(self) -> dict[str, Any]:
        """The worker's library versions (starts it)."""
        return dict(_worker(self.python, self.command, self.threads).versions)

    def _model_path(self) -> str:
        from kvstream.data.models import resolve_model

        return str(resolve_model(self.model, download=False))

    def run(self, prompt_ids: list[int], answer_ids: list[int], max_new_tokens: int) -> PeerResult:
        check_inputs(prompt_ids, answer_ids, max_new_tokens)
        reason = self.unavailable()
        if reason:
            raise PeerUnavailable(reason)
        worker = _worker(self.python, self.command, self.threads)
        shape = worker.call("load", timeout=START_TIMEOUT, model=self._model_path(), threads=self.threads)
        out = worker.call(
            "run", timeout=RUN_TIMEOUT, press=self.press, compression_ratio=self.compression_ratio,
            prompt_ids=list(prompt_ids), answer_ids=list(answer_ids), max_new_tokens=max_new_tokens,
            question_tokens=self.question_tokens, options=self.options,
        )  # fmt: skip
        return self._result(out, shape, worker.versions)

    def _result(self, out: dict[str, Any], shape: dict[str, Any], versions: dict[str, Any]) -> PeerResult:
        dims = dict(layers=int(shape["layers"]), kv_heads=int(shape["kv_heads"]), head_dim=int(shape["head_dim"]))
        tokens = int(out["tokens_seen"])
        bits = kv_bits_per_element(int(out["held_elements"]) * 2, tokens=tokens, **dims)
        held_bits = kv_bits_per_element(int(out["held_bytes"]), tokens=tokens, **dims)
        held = out.get("held_tokens") or []
        kept = out.get("kept_context_tokens") or []
        basis = (
            f"measured: {min(held, default=0)}-{max(held, default=0)} of {tokens} tokens held per layer "
            f"({min(kept, default=0)}-{max(kept, default=0)} of {out.get('context_tokens')} prompt tokens kept), "
            f"counted at 16 bits (fp16 storage); this run held {shape.get('dtype')}: {held_bits:.2f} bits"
        )
        environment = (
            f"own environment {self.python.parent.parent if self.command is None else ' '.join(self.command)}: "
            f"kvpress {versions.get('kvpress')}, transformers {versions.get('transformers')}, "
            f"torch {versions.get('torch')}, {shape.get('threads')} threads, {shape.get('dtype')}"
        )
        return PeerResult(
            text=str(out["text"]), answer_logprob=float(out["answer_logprob"]), answer_tokens=int(out["answer_tokens"]),
            bits_per_element=bits, prompt_seconds=float(out["prompt_seconds"]),
            decode_seconds=float(out["decode_seconds"]), bits_basis=basis, environment=environment,
            generated_ids=tuple(int(t) for t in out.get("generated_ids") or ()),
        )  # fmt: skip
