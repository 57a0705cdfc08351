"""The client side of a JSON-lines worker process (see :mod:`kvstream.peers.kvpress_worker` for the protocol).

The worker's stdout is read by a thread into a queue, so every wait has a timeout; its stderr goes
to a temporary file whose last lines are quoted when the worker fails or dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstream.peers.base import PeerError

_EOF = object()


class WorkerProcess:
    """One worker started from ``argv``; :meth:`call` sends a request and waits for its reply."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "worker",
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.env = env
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.versions: dict[str, Any] = {}
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[Any] = queue.Queue()
        self._stderr: Any = None
        self._next_id = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> dict[str, Any]:
        """Start the worker and wait for its ready line; its ``versions``."""
        if self.running:
            return self.versions
        self.close()
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed by close())
        self._lines = queue.Queue()
        try:
            self._process = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                encoding="utf-8", env=self.env, cwd=self.cwd, bufsize=1,
            )  # fmt: skip
        except OSError as error:
            raise PeerError(f"{self.name}: cannot start {self.argv[0]} ({error})") from None
        threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True).start()
        hello = self._receive(self.start_timeout, "ready line")
        if not hello.get("ready"):
            self.close()
            raise PeerError(f"{self.name} did not start: {hello.get('error') or hello}")
        self.versions = dict(hello.get("versions") or {})
        return self.versions

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to quit, then end it if it does not; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                try:
                    assert process.stdin is not None
                    process.stdin.write(json.dumps({"id": -1, "op": "quit"}) + "\n")
                    process.stdin.flush()
                    process.stdin.close()
                except (OSError, ValueError):
                    pass
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close(timeout=1.0)

    # ------------------------------------------------------------------ requests

    def call(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send ``op`` with ``args`` and return the reply's ``result``; :class:`PeerError` if it fails."""
        if not self.running:
            self.start()
        assert self._process is not None and self._process.stdin is not None
        self._next_id += 1
        rid = self._next_id
        try:
            self._process.stdin.write(json.dumps({"id": rid, "op": op, "args": args}) + "\n")
            self._process.stdin.flush()
        except (OSError, ValueError):
            raise PeerError(f"{self.name} ended before '{op}' could be sent{self._exit_note()}") from None
        while True:
            reply = self._receive(timeout, f"reply to '{op}'")
            if reply.get("id") == rid:
                break
        if not reply.get("ok"):
            raise PeerError(f"{self.name} failed on '{op}': {reply.get('error')}")
        return dict(reply.get("result") or {})

    def stderr_tail(self, lines: int = 5) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.flush()
            self._stderr.seek(0)
            text = self._stderr.read()
            self._stderr.seek(0, os.SEEK_END)
        except (OSError, ValueError):
            return ""
        kept = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(line.strip() for line in kept)

    # ------------------------------------------------------------------ internals

    def _read(self, stream: Any) -> None:
        try:
            for line in stream:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put(_EOF)

    def _exit_note(self) -> str:
        process = self._process
        code = process.poll() if process is not None else None
        note = f" (exit code {code})" if code is not None else ""
        tail = self.stderr_tail()
        return f"{note}; its stderr ends: {tail}" if tail else note

    def _receive(self, timeout: float | None, what: str) -> dict[str, Any]:
        """The next JSON object the worker writes; a line that is not one is an error naming it."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            note = self._exit_note()
            self.close(timeout=1.0)
            raise PeerError(f"{self.name} wrote no {what} within {timeout:g} s{note}") from None
        if line is _EOF:
            if self._process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(5)
            note = self._exit_note()
            self.close(timeout=1.0)
            raise PeerError(f"{self.name} ended before writing its {what}{note}")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            text = line.strip()[:200]
            raise PeerError(f"{self.name} wrote a line that is not a JSON object instead of its {what}: {text!r}")
        return message
