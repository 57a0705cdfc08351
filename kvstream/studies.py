"""Optuna studies that several ``kvstream tune`` processes share, on one machine or many.

A study lives in memory (one process, as before) or in an optuna RDB storage: a SQLite file by
default, any SQLAlchemy URL otherwise (``postgresql://...`` for machines that share no disk).
Processes on one study split its trials: `SharedStudy.claim` hands out a trial only while the
study has fewer than the requested total complete or running, so the total is reached
together. Every running trial sends a heartbeat; a trial whose process died stops beating and is
marked failed by the next process that looks, and a copy of it is queued so its parameters are
still tried (optuna's stale-trial callback). A study remembers what it tunes (`fingerprint`), so a
process asking something else of it is refused instead of mixing results.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstream.config import ConfigError

FINGERPRINT = "kvstream"
"""Study user attribute holding what the study tunes."""
SURPLUS = "kvstream_surplus"
"""Trial user attribute of a trial claimed after the total was reached (failed at once, never run)."""
ERROR = "kvstream_error"
"""Trial user attribute: why a trial failed."""
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
MAX_RETRIES = 3
SCHEMA_ATTEMPTS = 5


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence optuna's notes that heartbeats and stale-trial callbacks are experimental, and that heartbeats
    are meant for ``Study.optimize`` (kvstream sends them itself around ask and tell)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def storage_url(storage: str | None, default_dir: Path) -> str:
    """A SQLAlchemy URL for ``--storage``: a URL as given, a file path as SQLite, None as ``studies.sqlite3``."""
    if storage and "://" in storage:
        return storage
    path = Path(storage) if storage else Path(default_dir) / "studies.sqlite3"
    return f"sqlite:///{path.expanduser().resolve()}"


@dataclass(frozen=True)
class StudyTarget:
    """Where a shared study lives and its name; ``url=None`` is a study in this process's memory."""

    url: str | None = None
    name: str | None = None
    heartbeat_seconds: int = HEARTBEAT_SECONDS
    grace_seconds: int = GRACE_SECONDS

    @property
    def shared(self) -> bool:
        return self.url is not None


def sampler_seed(seed: int, shared: bool) -> int:
    """``seed`` for a study of one process; mixed with the host and process id for a shared one, so
    processes starting together do not propose the same first trials."""
    if not shared:
        return seed
    return zlib.crc32(f"{seed}:{socket.gethostname()}:{os.getpid()}".encode()) & 0x7FFFFFFF


class SharedStudy:
    """An optuna study with claiming up to a total, heartbeats, and release of interrupted trials."""

    def __init__(self, target: StudyTarget, sampler: Any, fingerprint: dict[str, Any]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.target = target
        storage = self._storage(target)
        if storage is not None and target.name is None:
            raise ConfigError("a shared study needs a name (--study NAME)")
        self.study = optuna.create_study(
            storage=storage,
            study_name=target.name,
            direction="maximize",
            sampler=sampler,
            load_if_exists=True,
        )
        self._check_fingerprint(fingerprint)
        self._beating: set[int] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _storage(target: StudyTarget) -> Any:
        if target.url is None:
            return None
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        engine = {}
        if target.url.startswith("sqlite:///"):
            engine = {"connect_args": {"timeout": 60}}
            Path(target.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with quiet_optuna():
                    return optuna.storages.RDBStorage(
                        target.url,
                        engine_kwargs=engine,
                        heartbeat_interval=target.heartbeat_seconds,
                        grace_period=target.grace_seconds,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRIES),
                    )
            except SQLAlchemyError:  # another process is creating the same tables right now
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
            except (ImportError, ValueError) as error:
                raise ConfigError(f"--storage: cannot open {target.url} ({' '.join(str(error).split())})") from None
        raise AssertionError("unreachable")

    def _check_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        stored = self.study.user_attrs.get(FINGERPRINT)
        if stored is None:
            self.study.set_user_attr(FINGERPRINT, fingerprint)
            return
        differs = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if differs:
            shown = ", ".join(f"{k}={stored.get(k)!r}" for k in differs)
            raise ConfigError(
                f"--study {self.study.study_name}: this study tunes {shown}, not what this command asks; "
                "give the same task, model, goal and fixed fields, or another --study name"
            )

    # -- trials --------------------------------------------------------------------------------------
    def enqueue(self, params: dict[str, Any]) -> None:
        """Queue ``params`` as a trial to run first, unless the study already has a trial with them."""
        self.study.enqueue_trial(params, skip_if_exists=True)

    def _states(self) -> list[Any]:
        from optuna.storages import fail_stale_trials

        with quiet_optuna():
            fail_stale_trials(self.study)
        return self.study.get_trials(deepcopy=False)

    def claim(self, total: int) -> Any | None:
        """The next trial to run, or None once the study's complete and running trials reach ``total``."""
        from optuna.trial import TrialState

        live = (TrialState.COMPLETE, TrialState.RUNNING)
        if sum(t.state in live for t in self._states()) >= total:
            return None
        with quiet_optuna():
            trial = self.study.ask()  # a queued trial (the base config, a retry) first
        before = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number and t.state in live]
        if len(before) >= total:  # another process claimed the last one at the same moment
            trial.set_user_attr(SURPLUS, True)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def complete(self, trial: Any, score: float, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.study.tell(trial, score)
        self._stop_beating(trial)

    def fail(self, trial: Any, error: str) -> None:
        """Mark ``trial`` failed with ``error`` (an evaluation that raised: not retried)."""
        from optuna.trial import TrialState

        trial.set_user_attr(ERROR, error)
        self.study.tell(trial, state=TrialState.FAIL)
        self._stop_beating(trial)

    def release(self, trial: Any) -> None:
        """Give back a trial this process will not finish (interrupted): failed, and queued again."""
        from optuna.trial import TrialState

        trial.set_user_attr(ERROR, "interrupted")
        self.study.tell(trial, state=TrialState.FAIL)
        self._stop_beating(trial)
        callback = getattr(self.study._storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if callback is not None:
            callback(self.study, self.study._storage.get_trial(trial._trial_id))

    def completed(self) -> list[Any]:
        """Every complete trial of the study (of every process), by number."""
        from optuna.trial import TrialState

        return sorted(self.study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)

    # -- heartbeats ----------------------------------------------------------------------------------
    def start_beating(self, trial: Any) -> None:
        with self._lock:
            self._beating.add(trial._trial_id)
        self._beat(trial._trial_id)

    def _stop_beating(self, trial: Any) -> None:
        with self._lock:
            self._beating.discard(trial._trial_id)

    def _beat(self, trial_id: int) -> None:
        if self.target.shared:
            self.study._storage.record_heartbeat(trial_id)

    @contextmanager
    def heartbeats(self) -> Iterator[None]:
        """A thread sending the heartbeat of every running trial of this process while inside."""
        if not self.target.shared:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.target.heartbeat_seconds / 2):
                with self._lock:
                    ids = list(self._beating)
                for trial_id in ids:
                    self._beat(trial_id)

        thread = threading.Thread(target=loop, name="kvstream-study-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
