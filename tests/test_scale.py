"""Beyond one machine: executors (local and Ray), shared optuna studies, models over several devices.

Ray runs as a local instance of 2 CPUs shared by the module's tests; the functions its workers run
are pickled by value, so the workers need not import this file. The sweep tests use the tiny random
Llama and byte tokenizer of the CLI tests, saved as a model folder every worker can load.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_cli import bundle, byte_tokenizer, fake_model, invoke, single_thread, small_model  # noqa: F401

from kvstream.config import CompressionConfig, ConfigError
from kvstream.executors import ExecutorError, ExecutorSettings, LocalExecutor
from kvstream.studies import SharedStudy, StudyTarget, storage_url
from kvstream.tune import Measurement, Objective, tune

# --------------------------------------------------------------------------- helpers


def double(x: int, progress=None) -> int:
    return 2 * x


def fail_on_three(x: int, progress=None) -> int:
    if x == 3:
        raise ValueError(f"no {x}")
    return x


def crash_once(marker: str, x: int, progress=None) -> int:
    """Kill the worker process the first time (the marker file records it), then behave."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return x


def synthetic(config: CompressionConfig) -> Measurement:
    """A cheap stand-in for an eval run: quality rises with bits, chunk size costs a little."""
    bits = (config.key_bits_normal + config.value_bits_normal) / 2 + 0.4
    return Measurement(config.config_hash(), bits / 5 - 0.01 * (config.chunk_size / 128), bits)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for the module; executors reuse it instead of starting their own."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The CLI tests' tiny model and byte tokenizer as a folder `load_model` (and a Ray worker) reads."""
    folder = tmp_path_factory.mktemp("models") / "tiny-byte-llama"
    small_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- executors


def test_local_executor_runs_in_order_and_lets_errors_through():
    executor = LocalExecutor()
    assert [o.value for o in executor.run_all((str(i), double, (i,)) for i in range(3))] == [0, 2, 4]
    executor.submit("3", fail_on_three, 3)
    with pytest.raises(ValueError, match="no 3"):
        executor.next_done()


def test_executor_settings_are_checked(monkeypatch):
    with pytest.raises(ExecutorError, match="not one of local, ray"):
        ExecutorSettings("dask").check()
    with pytest.raises(ExecutorError, match="--executor ray"):
        ExecutorSettings("local", address="auto").check()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ExecutorError, match=r"pip install 'kvstream\[cluster\]'"):
        ExecutorSettings("ray").check()


def test_ray_executor_reports_failures_and_crashes_without_stopping_others(ray_local, tmp_path):
    from kvstream.executors.ray import RayExecutor

    with RayExecutor() as executor:
        assert executor.capacity == 2 and executor.resources.gpus == 0
        jobs = [(str(i), fail_on_three, (i,)) for i in range(5)]
        jobs.append(("crash", crash_once, (str(tmp_path / "marker"), 9)))
        outcomes = {o.key: o for o in executor.run_all(jobs)}
    assert {k: o.value for k, o in outcomes.items() if o.ok} == {"0": 0, "1": 1, "2": 2, "4": 4}
    assert outcomes["3"].error == "no 3" and isinstance(outcomes["3"].exception, ValueError)
    assert "WorkerCrashedError" in outcomes["crash"].error
    assert ray_local.is_initialized()  # an instance the executor did not start is left running


# --------------------------------------------------------------------------- sweeps on Ray

SWEEP = ["ablate", "chunk_size=64,128", "--task", "passkey", "--length", "300", "--samples", "2", "--bits", "2/8"]


def runs_of(results: Path) -> dict[str, dict]:
    return {
        d.name: json.loads((d / "manifest.json").read_text())
        for d in sorted(results.iterdir())
        if (d / "manifest.json").is_file() and not d.name.startswith(("_", "."))
    }


def test_ray_sweep_gives_the_rows_of_a_local_sweep_with_one_baseline(ray_local, model_folder, tmp_path):
    args = [*SWEEP, "--model", str(model_folder), "-F", "csv"]
    local = invoke(*args, "--results", tmp_path / "local")
    remote = invoke(*args, "--results", tmp_path / "ray", "--executor", "ray")
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    expected = pd.read_csv(io.StringIO(local.stdout))
    assert len(expected) == 2
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(remote.stdout)), expected)
    manifests = runs_of(tmp_path / "ray")
    assert len(manifests) == 2 and all(m["baseline"]["reused"] for m in manifests.values())
    assert len(list((tmp_path / "ray" / "_baseline").iterdir())) == 1
    again = invoke(*args, "--results", tmp_path / "ray", "--executor", "ray")
    assert again.exit_code == 0 and again.stderr.count("skip ") == 2


class CrashOnce:
    """passkey, except that the first run with chunk size 128 kills its worker; every finished sample is logged."""

    name = "crash-once"
    per_sample_metric = "accuracy"

    def __init__(self, marker: Path, log: Path) -> None:
        self.marker, self.log = marker, log

    def samples(self, options, tokenizer):
        from kvstream.registry import registry

        return registry("tasks").get("passkey").samples(options, tokenizer)

    def run(self, ctx, sample):
        from kvstream.registry import registry

        if ctx.chunk_size == 128 and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        rows = registry("tasks").get("passkey").run(ctx, sample)
        with self.log.open("a") as log:
            log.write(f"{ctx.chunk_size} {sample.id}\n")
        return rows


def test_a_killed_ray_task_is_reported_and_the_sweep_resumes_without_rerunning(ray_local, model_folder, tmp_path):
    from kvstream.eval.jobs import EvalRuns, ModelSource
    from kvstream.eval.runner import EvalSpec
    from kvstream.executors.ray import RayExecutor
    from kvstream.results import ResultsStore
    from kvstream.tasks.base import TaskOptions

    task = CrashOnce(tmp_path / "crashed", tmp_path / "log.txt")
    options = TaskOptions(samples=2, length=300)
    results = tmp_path / "results"
    specs = [
        EvalSpec(task, str(model_folder), CompressionConfig(chunk_size=c), options, results) for c in (32, 64, 128)
    ]

    def sweep() -> dict[str, str | None]:
        with RayExecutor() as executor:
            runs = EvalRuns(executor, ModelSource(str(model_folder)), ResultsStore(results))
            planned, _ = runs.plan(specs)
            for run in planned:
                if not run.stored.reusable:
                    runs.submit(run.spec)
            outcomes = {}
            while runs.pending:
                outcome = runs.next_done()
                outcomes[outcome.key] = outcome.error
            return outcomes

    first = sweep()
    assert [first[s.run_id()] is None for s in specs] == [True, True, False]
    assert "WorkerCrashedError" in first[specs[2].run_id()]
    assert set(runs_of(results)) == {specs[0].run_id(), specs[1].run_id()}
    second = sweep()
    assert second == {specs[2].run_id(): None}  # only the killed run ran again
    assert set(runs_of(results)) == {s.run_id() for s in specs}
    done = (tmp_path / "log.txt").read_text().splitlines()
    assert len(done) == len(set(done)) == 3 * 2 + 2  # each run's samples once, and the baseline's (chunks of 256)


# --------------------------------------------------------------------------- the command line as a person meets it


@pytest.mark.parametrize(
    ("mask", "tree", "expected"), [(0o022, None, 0o755), (0o027, None, 0o750), (0o077, 0o770, 0o770)]
)
def test_results_folders_respect_the_umask_and_the_tree(tmp_path, mask, tree, expected):
    from kvstream.results.io import json_writer, write_dir_atomic

    root = tmp_path / "results"
    before = os.umask(mask)
    try:
        root.mkdir()
        if tree is not None:
            root.chmod(tree)
        write_dir_atomic(root / "run", {"manifest.json": json_writer({})})
    finally:
        os.umask(before)
    assert (root / "run").stat().st_mode & 0o777 == expected


def test_progress_is_logged_in_plain_lines_when_stderr_is_no_terminal(monkeypatch):
    from rich.console import Console

    from kvstream.cli.console import ProgressBars

    stream = io.StringIO()
    now = [0.0]
    monkeypatch.setattr("kvstream.cli.console.time.monotonic", lambda: now[0])
    bars = ProgressBars(Console(file=stream, width=80))
    assert bars.plain
    report = bars.callback("passkey: ")
    with bars:
        for seconds, what, done, total in [
            (1, "prefill", 100, 1000),  # a fresh bar: no line yet
            (13, "prefill", 500, 1000),  # 12 s later: a line, inside the sample
            (14, "prefill", 1000, 1000),  # prefill ends once per sample: no line
            (15, "quantized", 1, 1),  # a finished bar: a line
        ]:
            now[0] = seconds
            report(what, done, total)
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "passkey: tokens prefilled: 500/1000",
        "passkey: quantized cache: 1/1",
    ]


@pytest.mark.parametrize("command", ["download", "quantize-run", "eval", "ablate", "tune", "report", "plugins"])
def test_help_reads_whole_at_80_columns(command):
    from test_cli import runner
    from typer.main import get_command

    from kvstream.cli.app import app

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "``" not in text and ":class:" not in text  # nothing cut, no reStructuredText
    for param in get_command(app).commands[command].params:
        for name in param.opts:
            if name.startswith("--"):
                assert name in text, name


@pytest.mark.usefixtures("fake_model")
def test_executor_ray_without_ray_says_how_to_install_it(monkeypatch, tmp_path):
    from test_cli import assert_user_error

    monkeypatch.setitem(sys.modules, "ray", None)
    for command in (SWEEP, TUNE + ["--trials", "1"]):
        line = assert_user_error(invoke(*command, "--executor", "ray", "--results", tmp_path / "r"), "--executor ray")
        assert "pip install 'kvstream[cluster]'" in line
    assert not (tmp_path / "r").exists()


def test_a_long_sample_reports_the_tokens_it_prefilled(model_folder, tmp_path):
    from kvstream import load_model
    from kvstream.eval.runner import PREFILL, EvalSpec, run_eval
    from kvstream.tasks.base import TaskOptions

    seen: list[tuple[str, int, int]] = []
    options = TaskOptions(samples=1, length=300)
    spec = EvalSpec("passkey", str(model_folder), CompressionConfig(chunk_size=64), options, results_dir=tmp_path)
    run_eval(spec, bundle=load_model(str(model_folder), device="cpu"), progress=lambda *event: seen.append(event))
    prefill = [(done, total) for what, done, total in seen if what == PREFILL]
    assert prefill[0][0] == 64 and prefill[-1][0] == prefill[-1][1] > 256  # chunk by chunk, to the prompt's end


# --------------------------------------------------------------------------- shared studies


def test_storage_url():
    assert storage_url(None, Path("/r")) == "sqlite:////r/studies.sqlite3"
    assert storage_url("postgresql://u@h/db", Path("/r")) == "postgresql://u@h/db"
    assert storage_url("s.db", Path("/r")) == f"sqlite:///{Path('s.db').resolve()}"


def test_in_memory_study_is_as_before():
    objective = Objective(metric="accuracy", higher_is_better=True, budget_bits=3.5)
    first = tune(synthetic, CompressionConfig(), objective, trials=6, seed=3)
    second = tune(synthetic, CompressionConfig(), objective, trials=6, seed=3)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert [t.number for t in first.trials] == list(range(6))


def test_study_refuses_another_question(tmp_path):
    target = StudyTarget(storage_url(str(tmp_path / "s.db"), tmp_path), "s")
    import optuna

    SharedStudy(target, optuna.samplers.RandomSampler(), {"task": "passkey"})
    with pytest.raises(ConfigError, match="task='passkey'"):
        SharedStudy(target, optuna.samplers.RandomSampler(), {"task": "perplexity"})


def test_a_dead_trial_is_failed_and_retried_not_lost(tmp_path):
    import optuna
    from optuna.trial import TrialState

    target = StudyTarget(storage_url(str(tmp_path / "s.db"), tmp_path), "s", heartbeat_seconds=1, grace_seconds=2)
    objective = Objective(metric="accuracy", higher_is_better=True, budget_bits=8)
    dead = SharedStudy(target, optuna.samplers.RandomSampler(seed=0), {"t": 1})
    trial = dead.claim(3)
    params = {"key_bits_normal": trial.suggest_categorical("key_bits_normal", [2, 3, 4])}
    dead.start_beating(trial)  # one heartbeat, then the "process" is gone
    time.sleep(3)
    space = {"key_bits_normal": (2, 3, 4)}
    result = tune(synthetic, CompressionConfig(), objective, trials=3, space=space, study=target, fingerprint={"t": 1})
    trials = dead.study.get_trials()
    assert trials[0].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == params
    assert len(result.trials) == 3


TUNE_PROCESS = textwrap.dedent(
    """
    import os, sys, time
    from kvstream.config import CompressionConfig
    from kvstream.studies import StudyTarget
    from kvstream.tune import Measurement, Objective, tune

    def evaluate(config):
        time.sleep(0.4)
        bits = (config.key_bits_normal + config.value_bits_normal) / 2
        return Measurement(f"{os.getpid()}-{config.config_hash()}", bits / 5, bits)

    open(sys.argv[3], "w").close()
    while not all(os.path.exists(p) for p in sys.argv[4:]):  # start together
        time.sleep(0.05)
    tune(evaluate, CompressionConfig(), Objective("accuracy", True, budget_bits=3.5), trials=int(sys.argv[2]),
         study=StudyTarget(sys.argv[1], "shared"), fingerprint={"test": 1})
    """
)


def test_two_processes_reach_the_trial_count_together(tmp_path):
    import optuna
    from optuna.trial import TrialState

    url = storage_url(str(tmp_path / "study.db"), tmp_path)
    ready = [str(tmp_path / f"ready-{i}") for i in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", TUNE_PROCESS, url, "10", ready[i], *ready], env=env) for i in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    trials = optuna.load_study(study_name="shared", storage=url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 10
    assert len({t.user_attrs["run_id"].split("-")[0] for t in complete}) == 2  # both processes worked
    assert all(t.user_attrs.get("kvstream_surplus") for t in trials if t.state == TrialState.FAIL)


TUNE = ["tune", "--task", "passkey", "--length", "300", "--samples", "2", "--budget-bits", "64"]


@pytest.mark.usefixtures("fake_model")
def test_tune_on_a_stored_study_resumes_to_the_total(tmp_path):
    results = tmp_path / "results"
    first = invoke(*TUNE, "--trials", "2", "--study", "s", "--results", results, "-F", "json")
    assert first.exit_code == 0, first.output
    assert (results / "studies.sqlite3").is_file()
    again = invoke(*TUNE, "--trials", "3", "--study", "s", "--results", results, "-F", "json")
    assert again.exit_code == 0, again.output
    trials = json.loads(again.stdout)["trials"]
    assert [t["trial"] for t in trials][:2] == [t["trial"] for t in json.loads(first.stdout)["trials"]]
    assert len(trials) == 3 and again.stderr.count("trial ") == 1  # one new trial; the study lists all three
    other = invoke(*TUNE, "--trials", "3", "--study", "s", "--results", results, "--chunk-size", "64")
    assert other.exit_code == 2 and "--study s: this study tunes" in other.stderr


def test_tune_trials_as_ray_tasks(ray_local, model_folder, tmp_path):
    result = invoke(
        *TUNE, "--trials", "3", "--model", model_folder, "--results", tmp_path, "--executor", "ray", "-F", "json"
    )
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 3 and all(not t["reused"] for t in trials)
    assert len(runs_of(tmp_path)) == len({t["run_id"] for t in trials})
    assert len(list((tmp_path / "_baseline").iterdir())) == 1


# --------------------------------------------------------------------------- models over several devices


OFFLOADED = {
    "model.embed_tokens": "disk",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


def test_device_map_with_disk_offload_gives_the_same_logits_and_cache(model_folder):
    from kvstream import chunked_prefill, load_model, make_cache
    from kvstream.engine.placement import input_device, model_devices
    from kvstream.testing import random_ids

    one, _ = load_model(str(model_folder), device="cpu")
    spread, _ = load_model(str(model_folder), device_map=OFFLOADED)
    assert spread.hf_device_map == OFFLOADED
    assert spread.get_input_embeddings().weight.device.type == "meta"  # waits on disk
    assert input_device(spread) == torch.device("cpu") and model_devices(spread) == [torch.device("cpu")]
    ids = random_ids(96, vocab=260)
    with torch.inference_mode():
        torch.testing.assert_close(spread(ids).logits, one(ids).logits, rtol=1e-5, atol=1e-5)
    config = CompressionConfig(chunk_size=32, value_quant_groups=32)
    caches = [make_cache(m, config) for m in (one, spread)]
    logits = [chunked_prefill(m, ids, c, config.chunk_size) for m, c in zip((one, spread), caches, strict=True)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    reports = [c.memory_report() for c in caches]
    assert reports[1]["bits_per_element"] == reports[0]["bits_per_element"] < 16
    assert reports[1]["by_device"] == {"cpu": reports[1]["stored_bytes"]}


def test_position_tables_keep_one_copy_per_further_device(tiny_model):
    """The tables every layer reads follow the tokens onto each device that asks (``meta`` stands in for a GPU)."""
    from kvstream import chunked_prefill, make_cache
    from kvstream.testing import random_ids

    config = CompressionConfig(chunk_size=16, value_quant_groups=16)
    cache = make_cache(tiny_model, config)
    chunked_prefill(tiny_model, random_ids(40), cache, config.chunk_size)
    assert cache.tables_on(torch.device("cpu"))[0] is cache.positions  # the first layer's device: no copy
    other = torch.device("meta")
    positions, valid = cache.tables_on(other)
    assert positions.device == other and positions.shape == cache.positions.shape == valid.shape
    report = cache.memory_report()
    copy_bytes = positions.numel() * positions.element_size() + valid.numel()
    assert report["by_device"]["meta"] == copy_bytes and report["stored_bytes"] == sum(report["by_device"].values())
    chunked_prefill(tiny_model, random_ids(4, seed=2), cache, config.chunk_size)
    assert cache.tables_on(other)[0].shape == cache.positions.shape == (1, 44)  # extended, not rebuilt
    cache.crop(-4)  # the tail only: packed blocks are never cut
    assert cache.tables_on(other)[0].shape == (1, 40)
    cache.batch_repeat_interleave(2)
    assert cache.tables_on(other)[0].shape == (2, 40)


def test_device_map_option_is_checked(tmp_path):
    from kvstream.engine.placement import parse_device_map

    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": "cpu"}') == {"model": "cpu"}
    path = tmp_path / "map.json"
    path.write_text('{"model": "disk"}')
    assert parse_device_map(str(path)) == {"model": "disk"}
    for bad, needle in [("{", "not valid JSON"), ('{"model": "gpu"}', "model"), ("nowhere.json", "auto")]:
        with pytest.raises(ValueError, match=needle):
            parse_device_map(bad)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="CUDA device"):
            parse_device_map('{"model": 7}')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_offloaded_to_the_cpu_run_on_the_gpu_with_the_same_logits(model_folder):
    from kvstream import chunked_prefill, load_model, make_cache
    from kvstream.engine.placement import input_device
    from kvstream.testing import random_ids

    one, _ = load_model(str(model_folder), device="cuda:0", dtype="float32")
    placed = {**OFFLOADED, "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "cpu"}
    spread, _ = load_model(str(model_folder), dtype="float32", device_map=placed)
    assert input_device(spread) == torch.device("cuda:0")
    ids = random_ids(96, vocab=260)
    config = CompressionConfig(chunk_size=32)
    caches = [make_cache(m, config) for m in (one, spread)]
    logits = [chunked_prefill(m, ids, c, config.chunk_size) for m, c in zip((one, spread), caches, strict=True)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert all(layer.keys.device.type == "cuda" for layer in caches[1].layers)  # offloaded weights run on the GPU
    assert set(caches[1].memory_report()["by_device"]) == {"cuda:0"}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layers_on_two_gpus_keep_their_cache_on_their_device(model_folder):
    from kvstream import chunked_prefill, load_model, make_cache
    from kvstream.testing import random_ids

    one, _ = load_model(str(model_folder), device="cuda:0", dtype="float32")
    spread, _ = load_model(
        str(model_folder),
        dtype="float32",
        device_map={
            "model.embed_tokens": 0,
            "model.rotary_emb": 0,
            "model.layers.0": 0,
            "model.layers.1": 1,
            "model.norm": 1,
            "lm_head": 1,
        },
    )
    ids = random_ids(96, vocab=260)
    config = CompressionConfig(chunk_size=32, value_quant_groups=32)
    caches = [make_cache(m, config) for m in (one, spread)]
    logits = [chunked_prefill(m, ids, c, config.chunk_size) for m, c in zip((one, spread), caches, strict=True)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert [layer.keys.device.index for layer in caches[1].layers] == [0, 1]
    assert set(caches[1].memory_report()["by_device"]) == {"cuda:0", "cuda:1"}
