"""The command line through Typer's CliRunner, on a tiny random Llama with a small byte-level tokenizer.

No real model loads here (`kvstream.engine.load_model` is replaced), except in the one test
marked ``slow``. Every failing case must give exit code 2, one ``kvstream: error:`` line on
stderr, no traceback, and leave no results behind.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kvstream.cli.app import app
from kvstream.testing import tiny_llama

runner = CliRunner()

TASK_ARGS = ["--task", "passkey", "--length", "300", "--samples", "2"]
"""A passkey run small enough for the tiny model: 2 samples of ~300 byte-level tokens."""


# --------------------------------------------------------------------------- helpers


def byte_tokenizer():
    """A real fast tokenizer: the 256 byte symbols, three specials and a ChatML-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for name in specials:
        vocab[name] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def small_model():
    """tiny_llama with the byte vocabulary and head_dim 64 (so the default value groups of 64 divide it)."""
    return tiny_llama(
        vocab_size=260,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=1024,
    )


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: the tiny model gains nothing from more, and busy machines lose a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle():
    return small_model(), byte_tokenizer()


@pytest.fixture
def fake_model(monkeypatch, bundle):
    """Replace the model loader (and the reading of its positions); ``loads`` records every load."""
    loads: list[str] = []

    def load(name="smollm2-135m", *args, **kwargs):
        loads.append(name)
        return bundle

    monkeypatch.setattr("kvstream.engine.load_model", load)
    monkeypatch.setattr("kvstream.cli.checks.model_positions", lambda name: bundle[0].config.max_position_embeddings)
    return SimpleNamespace(model=bundle[0], tokenizer=bundle[1], loads=loads)


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2, exactly one ``kvstream: error:`` line on stderr, no traceback; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvstream: error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- app-wide


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("kvstream ")
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("download", "quantize-run", "eval", "ablate", "tune", "report", "plugins"):
        assert command in result.stdout
    assert "First steps" in result.stdout


@pytest.mark.parametrize("command", ["eval", "quantize-run", "ablate", "tune"])
def test_every_config_field_is_an_option(command):
    from dataclasses import fields

    from kvstream.config import CompressionConfig

    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = result.stdout
    for f in fields(CompressionConfig):
        # long option names are cut in narrow help panels; their first 18 characters always show
        assert ("--" + f.name.replace("_", "-"))[:18] in text, f.name
    assert "--bits" in text and "--config" in text and "Examples" in text


@pytest.mark.parametrize("command", ["download", "report", "plugins"])
def test_other_commands_take_config(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "--config" in result.stdout


def test_unknown_option_is_one_line():
    line = assert_user_error(invoke("eval", "--task", "passkey", "--chunk-sizee", "64"), "--chunk-sizee")
    assert "--help" in line


# --------------------------------------------------------------------------- plugins


def test_plugins_lists_builtins():
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    for name in ("uniform", "ema", "streaming", "full"):
        assert name in result.stdout
    assert "kvstream" in result.stdout
    assert "config " in result.stdout


def test_plugins_flags_broken_ones_and_exits_zero(monkeypatch):
    from kvstream.registry import PluginInfo, Registry

    original = Registry.infos

    def infos(self):
        found = original(self)
        if self.group == "quantizers":
            found.append(
                PluginInfo("quantizers", "shaky", "shaky.mod:Q", "shaky-pkg", "9.9", error="ImportError: no module")
            )
        return found

    monkeypatch.setattr(Registry, "infos", infos)
    result = invoke("plugins", "--group", "quantizers")
    assert result.exit_code == 0
    assert "shaky" in result.stdout and "BROKEN" in result.stdout and "ImportError" in result.stdout


def test_plugins_unknown_group():
    assert_user_error(invoke("plugins", "--group", "nope"), "group")


# --------------------------------------------------------------------------- quantize-run


def test_quantize_run_compare_fp(fake_model):
    result = invoke(
        "quantize-run", "What is 2+2?", "--max-new-tokens", "4", "--compare-fp", "--chunk-size", "8", "--bits", "2/8"
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "streaming cache" in out and "full precision" in out
    assert "Outliers per layer" in out
    assert "effective bits per element" in out and "prefill tokens/s" in out and "decode tokens/s" in out
    assert "key_bits_normal=2" in out and "value_bits_normal=2" in out
    assert fake_model.loads == ["smollm2-135m"]


def test_quantize_run_reads_stdin_and_file(fake_model, tmp_path):
    result = invoke("quantize-run", "-", "--max-new-tokens", "2", "--raw", input="Tell me a story.")
    assert result.exit_code == 0, result.output
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Summarise this text, please.")
    result = invoke("quantize-run", "--file", prompt, "--max-new-tokens", "2", "--config", "kivi-like")
    assert result.exit_code == 0, result.output
    assert "kivi-like" in result.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["quantize-run", "hi", "--bits", "4/"], ["--bits", "4/8"]),
        (["quantize-run", "hi", "--bits", "x"], ["--bits"]),
        (["quantize-run", "hi", "--bits", "5"], ["--bits", "5"]),
        (["quantize-run", "hi", "--chunk-size", "abc"], ["chunk_size", "abc"]),
        (["quantize-run", "hi", "--key-rope", "middle"], ["key_rope", "pre"]),
        (["quantize-run", "hi", "--quantizer", "nope"], ["nope", "kvstream plugins"]),
        (["quantize-run", "hi", "--config", "no-such-preset"], ["config file not found"]),
        (["quantize-run", "   "], ["empty prompt"]),
        (["quantize-run", "--file", "/no/such/prompt.txt"], ["/no/such/prompt.txt"]),
        (["quantize-run", "hi", "--value-quant-groups", "48"], ["value_quant_groups", "head_dim"]),
    ],
)
def test_quantize_run_errors(fake_model, args, needles):
    assert_user_error(invoke(*args), *needles)


def test_quantize_run_without_a_prompt_demonstrates_compression(fake_model):
    import re

    result = invoke("quantize-run", "--max-new-tokens", "4", "--compare-fp", "--chunk-size", "128")
    assert result.exit_code == 0, result.output
    assert "demonstration: a " in result.stdout and "(4 full chunks of 128)" in result.stdout
    quantized, full = map(float, re.search(r"effective bits per element\W+([\d.]+)\W+([\d.]+)", result.stdout).groups())
    assert quantized < full / 3  # the prompt is packed at 4/8 bits (plus metadata); fp32 in full precision
    assert "nothing was packed" not in result.stdout


def test_quantize_run_prompt_longer_than_context(fake_model):
    assert_user_error(invoke("quantize-run", "word " * 400, "--raw"), "context", "1024")
    assert_user_error(
        invoke("quantize-run", "word " * 180, "--raw", "--max-new-tokens", "200"), "--max-new-tokens", "context"
    )


def test_missing_model_is_one_line(tmp_path):
    assert_user_error(invoke("quantize-run", "hi", "--model", str(tmp_path / "nowhere")), "not found")


# --------------------------------------------------------------------------- sweep and tune logic


def test_parse_sweep_and_presets():
    from kvstream.cli.ablate import load_preset, merge, parse_sweep, preset_names
    from kvstream.config import CompressionConfig

    sweep = parse_sweep(["chunk_size=128,256", "bits=2/8,4/8"])
    configs = sweep.configs(CompressionConfig())
    assert len(configs) == 4
    assert [(c.key_bits_normal, c.chunk_size) for c in configs] == [(2, 128), (2, 256), (4, 128), (4, 256)]
    assert {c.rotation for c in configs} == {"none"}  # bits= sweeps the width alone, the strategy held still
    assert {"chunk-size", "ema-decay", "bits", "sink-size", "outliers", "rope"} <= set(preset_names())
    expected = {"chunk-size": 3, "ema-decay": 3, "bits": 4, "sink-size": 4, "outliers": 8, "rope": 4}
    for name, count in expected.items():
        preset = load_preset(name)
        assert preset.description and preset.task == "passkey"
        assert len(preset.configs(CompressionConfig())) == count, name
    merged = merge(load_preset("chunk-size"), parse_sweep(["chunk_size=64", "ema_decay=0.5,0.9"]))
    assert merged.grid == {"chunk_size": [64], "ema_decay": [0.5, 0.9]}


def test_tune_objective_and_space():
    from kvstream.config import ConfigError
    from kvstream.tune import HIGH_BITS, INFEASIBLE, Objective, search_space

    with pytest.raises(ConfigError, match="--budget-bits"):
        Objective(metric="accuracy", higher_is_better=True)
    quality = Objective(metric="accuracy", higher_is_better=True, budget_bits=4.5)
    assert quality.score(0.8, 4.0) == 0.8
    assert quality.score(1.0, 5.0) < INFEASIBLE < quality.score(0.0, 4.5)
    assert quality.score(1.0, 5.0) < quality.score(1.0, 4.6)
    ppl = Objective(metric="perplexity", higher_is_better=False, min_quality=12.0)
    assert ppl.mode == "bits"
    assert ppl.score(11.0, 3.0) == -3.0 and ppl.score(11.0, 2.5) > ppl.score(11.0, 3.0)
    assert ppl.score(13.0, 2.0) < INFEASIBLE
    space = search_space({"chunk_size", "key_bits_sink_outlier"})
    assert "chunk_size" not in space and HIGH_BITS not in space and "key_rope" in space


def test_tune_study_is_seeded_and_respects_the_budget():
    from kvstream.config import CompressionConfig
    from kvstream.tune import Measurement, Objective, params_of, search_space, tune

    def evaluate(config):
        bits = (config.key_bits_normal + config.value_bits_normal) / 2 + 0.4
        quality = bits / 5 - 0.01 * (config.chunk_size / 128)
        return Measurement(config.config_hash(), quality, bits)

    objective = Objective(metric="accuracy", higher_is_better=True, budget_bits=3.5)
    base = CompressionConfig()
    first = tune(evaluate, base, objective, trials=12, seed=3)
    second = tune(evaluate, base, objective, trials=12, seed=3)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert len(first.trials) == 12
    assert first.trials[0].params == params_of(base, search_space())
    assert not first.trials[0].feasible  # 4/4 bits is over the 3.5 budget
    best = first.best
    assert best is not None and best.bits <= 3.5
    assert all(best.score >= t.score for t in first.trials if t.feasible)
    assert set(first.table().columns) >= {"trial", "run_id", "quality", "bits_per_element", "feasible", "score"}


# --------------------------------------------------------------------------- errors of eval, ablate, tune


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["eval", "--task", "pasky"], ["unknown task", "pasky", "did you mean passkey", "kvstream plugins"]),
        (["eval", "--task", "zzzz"], ["unknown task", "zzzz", "known:", "kvstream plugins"]),
        (["eval"], ["--task"]),
        (["eval", "--task", "narrativeqa", "--bits", "4/"], ["--bits"]),
        (["eval", "--task", "narrativeqa", "--samples", "0"], ["--samples"]),
        (["eval", "--task", "narrativeqa", "--cache", "nope"], ["nope", "cache"]),
        (["ablate", "chunk_size="], ["chunk_size", "empty value"]),
        (["ablate", "chunk_size=abc"], ["chunk_size", "abc"]),
        (["ablate", "chunk_sise=128,256"], ["unknown config field", "chunk_sise"]),
        (["ablate", "chunk_size"], ["KEY=V1,V2"]),
        (["ablate", "bits=4/,8"], ["--bits"]),
        (["ablate"], ["nothing to sweep", "--preset"]),
        (["ablate", "--preset", "nope"], ["preset", "chunk-size"]),
        (["ablate", "ema_decay=0.5,1.5"], ["ema_decay"]),
        (["tune", "--task", "narrativeqa"], ["--budget-bits", "--min-quality"]),
        (["tune", "--task", "narrativeqa", "--budget-bits", "4", "--trials", "0"], ["--trials"]),
    ],
)
def test_run_command_errors(fake_model, tmp_path, args, needles):
    results = tmp_path / "results"
    assert_user_error(invoke(*args, "--results", results), *needles)
    assert not results.exists()
    assert fake_model.loads == []


def test_report_without_results(tmp_path):
    assert_user_error(invoke("report", "--results", tmp_path / "none", "--out", tmp_path / "rep"), "kvstream eval")
    assert not (tmp_path / "rep").exists()


def test_download_errors(tmp_path):
    assert_user_error(invoke("download", "longbench", "--from-file", tmp_path / "missing.zip"), "missing.zip")
    assert_user_error(invoke("download", str(tmp_path / "no-model-here")), "not found")


# --------------------------------------------------------------------------- eval, ablate, tune end to end


@pytest.fixture
def tasks_registered():
    """The built-in synthetic and perplexity tasks, as their entry points register them."""
    from kvstream.registry import registry

    names = registry("tasks").names()
    for name in ("passkey", "niah_single", "perplexity"):
        assert name in names, f"task {name!r} is not registered (reinstall kvstream: `make setup`)"


def test_eval_table_json_and_csv(fake_model, tasks_registered, tmp_path):
    results = tmp_path / "results"
    result = invoke("eval", *TASK_ARGS, "--bits", "2/8", "--chunk-size", "64", "--results", results)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "key_bits_normal=2" in out and "chunk_size=64" in out
    for word in ("accuracy", "bits_per_element", "peak_cache_bytes", "95% CI", "stored in"):
        assert word in out
    run_dirs = [d for d in results.iterdir() if not d.name.startswith(("_", "."))]
    assert len(run_dirs) == 1 and run_dirs[0].name in out.replace("\n", "")

    result = invoke("eval", *TASK_ARGS, "--bits", "2/8", "--chunk-size", "64", "--results", results, "-F", "json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run_id"] == run_dirs[0].name
    assert payload["config"]["key_bits_normal"] == 2 and payload["config"]["chunk_size"] == 64
    metrics = {row["metric"]: row for row in payload["summary"]}
    assert {"accuracy", "bits_per_element"} <= set(metrics)
    assert {"quantized", "full_precision", "delta", "ci_low", "ci_high", "n"} <= set(metrics["accuracy"])

    result = invoke("eval", *TASK_ARGS, "--config", "kivi-like", "--results", results, "-F", "csv")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert {"run_id", "metric", "quantized", "full_precision", "delta"} <= set(frame.columns)
    assert fake_model.loads == ["smollm2-135m"] * 3


def test_eval_reruns_a_run_whose_prompts_changed(fake_model, tasks_registered, tmp_path, monkeypatch):
    from kvstream.tasks.synthetic import passkey

    results = tmp_path / "results"
    first = invoke("eval", *TASK_ARGS, "--results", results)
    assert first.exit_code == 0, first.output
    (run_dir,) = [d for d in results.iterdir() if not d.name.startswith(("_", "."))]
    same = invoke("eval", *TASK_ARGS, "--results", results)
    assert f"run {run_dir.name} is stored with the same key: this run replaces it" in " ".join(same.stdout.split())
    assert json.loads((run_dir / "manifest.json").read_text())["baseline"]["reused"] is True

    monkeypatch.setattr(passkey, "instruction", passkey.instruction.replace("important", "essential"))
    changed = invoke("eval", *TASK_ARGS, "--results", results)
    assert changed.exit_code == 0, changed.output
    lines = [line for line in changed.stdout.splitlines() if "since it was stored" in line]
    assert lines == [
        f"re-run {run_dir.name}: prompts changed since it was stored",
        f"recompute baseline {next((results / '_baseline').iterdir()).name}: prompts changed since it was stored",
    ]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["baseline"]["reused"] is False


def test_eval_missing_data_is_one_line(fake_model, tasks_registered, tmp_path):
    results = tmp_path / "results"
    line = assert_user_error(
        invoke("eval", "--task", "narrativeqa", "--data-dir", tmp_path / "empty", "--results", results),
        "narrativeqa",
    )
    assert "kvstream download" in line
    assert not results.exists()
    missing = tmp_path / "no-such-text.txt"
    assert_user_error(invoke("eval", "--task", "perplexity", "--corpus", missing, "--results", results), "not found")
    assert not results.exists()


ABLATE_ARGS = ["ablate", "chunk_size=64,128,256", *TASK_ARGS, "--bits", "2/8", "-F", "csv"]


def test_ablate_interrupted_and_resumed_matches_one_sweep(fake_model, tasks_registered, tmp_path, monkeypatch):
    from kvstream.eval import runner as eval_runner

    whole = invoke(*ABLATE_ARGS, "--results", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    expected = pd.read_csv(io.StringIO(whole.stdout))
    assert len(expected) == 3 and list(expected["chunk_size"]) == [64, 128, 256]
    assert expected["best"].sum() <= 1
    assert {"quantized", "full_precision", "delta", "bits_per_element", "pareto"} <= set(expected.columns)

    real = eval_runner.run_plan
    calls = []

    def flaky(plan, **kwargs):
        calls.append(plan.spec.config.chunk_size)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(plan, **kwargs)

    monkeypatch.setattr(eval_runner, "run_plan", flaky)
    results = tmp_path / "resumed"
    interrupted = invoke(*ABLATE_ARGS, "--results", results)
    assert interrupted.exit_code == 130
    assert "interrupted: 2 of 3 runs" in interrupted.stderr and "again to resume" in interrupted.stderr
    assert "Traceback" not in interrupted.output
    assert len([d for d in results.iterdir() if not d.name.startswith(("_", "."))]) == 2

    monkeypatch.setattr(eval_runner, "run_plan", real)
    loads_before = len(fake_model.loads)
    resumed = invoke(*ABLATE_ARGS, "--results", results)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stderr.count("skip ") == 2
    assert len(fake_model.loads) == loads_before + 1
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(resumed.stdout)), expected)

    again = invoke(*ABLATE_ARGS, "--results", results)
    assert again.exit_code == 0 and again.stderr.count("skip ") == 3
    assert "re-run" not in again.stderr and "recompute" not in again.stderr
    assert len(fake_model.loads) == loads_before + 2  # loaded to check the stored keys, nothing run


def test_ablate_table_and_preset(fake_model, tasks_registered, tmp_path):
    results = tmp_path / "results"
    result = invoke("ablate", "--preset", "rope", *TASK_ARGS, "--results", results)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "sweep bits (2) x key_rope (2) = 4 run(s)" in out
    assert "Ablation of passkey" in out and "key_rope" in out and "◆" in out
    assert len([d for d in results.iterdir() if not d.name.startswith(("_", "."))]) == 4


def test_tune_persists_every_trial_and_saves_the_best(fake_model, tasks_registered, tmp_path):
    from kvstream.config import CompressionConfig

    results = tmp_path / "results"
    best_file = tmp_path / "best.yaml"
    args = ["tune", *TASK_ARGS, "--budget-bits", "64", "--trials", "3", "--results", results]
    result = invoke(*args, "--save", best_file, "--chunk-size", "128")
    assert result.exit_code == 0, result.output
    assert "Trials" in result.stdout and "best:" in result.stdout and "Best config" in result.stdout
    best = CompressionConfig.from_yaml(best_file)
    assert best.chunk_size == 128  # fixed on the command line, so not searched
    runs = [d for d in results.iterdir() if not d.name.startswith(("_", "."))]
    assert 1 <= len(runs) <= 3

    again = invoke(*args, "--chunk-size", "128", "-F", "json")
    assert again.exit_code == 0, again.output
    payload = json.loads(again.stdout)
    assert len(payload["trials"]) == 3 and all(t["reused"] for t in payload["trials"])
    assert payload["best_config"] == best.to_dict()


def test_download_shows_what_was_stored(monkeypatch, tmp_path):
    stored = tmp_path / "longbench"
    stored.mkdir()
    (stored / "narrativeqa.jsonl").write_text("{}\n")
    seen = {}

    def fake_download(target, *, progress=None, force=False, source=None):
        seen.update(target=target, force=force, source=source)
        if progress:
            progress("Unpacking", 1, 2)
            progress("Unpacking", 2, 2)
        return [stored, stored / "narrativeqa.jsonl"]

    monkeypatch.setattr("kvstream.data.download", fake_download)
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK")
    result = invoke("download", "longbench", "--from-file", archive, "--force")
    assert result.exit_code == 0, result.output
    assert seen == {"target": "longbench", "force": True, "source": archive}
    assert "narrativeqa.jsonl" in result.stdout and "store:" in result.stdout


def test_config_precedence(tmp_path):
    from kvstream.cli.config_fields import build_config

    path = tmp_path / "mine.yaml"
    path.write_text("description: test\nkey_bits_normal: 3\nvalue_bits_normal: 3\nchunk_size: 128\n")
    config = build_config(str(path), "2/4", {"key_bits_normal": "4"})
    assert (config.key_bits_normal, config.value_bits_normal) == (4, 2)
    assert (config.key_bits_sink_outlier, config.value_bits_sink_outlier) == (4, 4)
    assert config.chunk_size == 128
    kept = build_config("kvquant-like", "4")
    assert kept.key_bits_normal == 4 and kept.key_bits_sink_outlier == 8 and kept.attention_sink_size == 1


def test_guide_documents_every_field_with_its_default():
    from dataclasses import fields

    from kvstream.cli.config_fields import format_value
    from kvstream.config import CompressionConfig

    guide = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
    defaults = CompressionConfig()
    for f in fields(CompressionConfig):
        value = getattr(defaults, f.name)
        spellings = {format_value(value), str(value), str(value).lower()}
        rows = {f"| `{f.name}` | {v} |" for v in spellings} | {f"| `{f.name}` | `{v}` |" for v in spellings}
        assert any(row in guide for row in rows), f"docs/guide.md: no row for {f.name} with default {value!r}"
    for command in ("download", "quantize-run", "eval", "ablate", "tune", "report", "plugins"):
        assert f"### `kvstream {command}`" in guide


@pytest.mark.slow
def test_quantize_run_real_model_compare_fp():
    result = invoke("quantize-run", "What is 2+2?", "--max-new-tokens", "8", "--compare-fp")
    assert result.exit_code == 0, result.output
    assert "streaming cache" in result.stdout and "full precision" in result.stdout
    assert result.stdout.count("╭") >= 2  # two answer panels
    assert "effective bits per element" in result.stdout


def test_eval_longbench_end_to_end_on_a_written_dataset(fake_model, tmp_path):
    """`kvstream eval --task hotpotqa` on a LongBench-format JSONL the test writes: prompts, scoring, rows."""
    data = tmp_path / "longbench"
    data.mkdir()
    records = [
        {
            "input": f"Which city is named in passage {i}?",
            "context": f"Passage {i}: the meeting took place in Paris. " * 8,
            "answers": ["Paris"],
            "length": 80,
            "dataset": "hotpotqa",
            "language": "en",
            "all_classes": None,
            "_id": f"lb-{i}",
        }
        for i in range(3)
    ]
    (data / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = tmp_path / "results"
    args = ["eval", "--task", "hotpotqa", "--data-dir", data, "--length", "400", "--bits", "4/8"]
    result = invoke(*args, "--results", results, "--format", "json")
    assert result.exit_code == 0, (result.output, result.exception)
    rows = pd.concat(pd.read_csv(p) for p in results.glob("*/rows.csv"))
    per_sample = rows[(rows["metric"] == "qa_f1") & rows["sample"].notna() & (rows["sample"] != "")]
    assert sorted(per_sample["sample"].unique()) == ["lb-0", "lb-1", "lb-2"]
    assert set(per_sample["variant"]) == {"quantized", "full_precision"}
    assert per_sample["value"].between(0, 100).all()
    assert {"bits_per_element", "peak_cache_bytes"} <= set(rows["metric"])


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--task", "passkey"],
        ["quantize-run"],
        ["ablate", "chunk_size=128,256"],
        ["tune", "--trials", "1"],
    ],
)
def test_unknown_dtype_and_absent_device_are_refused_before_any_work(args, fake_model):
    assert_user_error(invoke(*args, "--dtype", "float8"), "dtype", "float8")
    assert not fake_model.loads
    if not torch.cuda.is_available():
        assert_user_error(invoke(*args, "--device", "cuda"), "no CUDA device")
        assert not fake_model.loads
