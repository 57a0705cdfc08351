"""What `kvstream eval`, `ablate` and `quantize-run` print about a run: titles naming the model as a
person writes it, and timings free of one-time costs (the cache's warm-up runs before any clock starts).

The tiny random Llama and byte tokenizer of the CLI tests stand in for the model (`test_cli.fake_model`).
"""

from __future__ import annotations

import json
import re
import time

import pytest
from test_cli import (  # noqa: F401
    TASK_ARGS,
    bundle,
    byte_tokenizer,
    fake_model,
    invoke,
    single_thread,
    small_model,
    tasks_registered,
)

from kvstream.cli.options import ModelOptions
from kvstream.config import CompressionConfig

ONE_TIME_SECONDS = 1.0
"""What the first forward through each cache type costs in `one_time_cost`: far above a tiny model's prefill."""


@pytest.fixture
def one_time_cost(monkeypatch) -> set[str]:
    """The first forward pass through each cache type sleeps `ONE_TIME_SECONDS`, inside the timed prefill, as
    building or loading a kernel on first use does; returns the cache types that paid it."""
    from kvstream.engine import prefill

    real = prefill.forward_hidden
    paid: set[str] = set()

    def forward(model, input_ids, cache, start, attention_mask):
        if type(cache).__name__ not in paid:
            paid.add(type(cache).__name__)
            time.sleep(ONE_TIME_SECONDS)
        return real(model, input_ids, cache, start, attention_mask)

    monkeypatch.setattr(prefill, "forward_hidden", forward)
    return paid


def flat(text: str) -> str:
    """``text`` with every run of whitespace one space (rich wraps long lines)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- titles


@pytest.mark.parametrize(
    ("options", "label"),
    [
        (ModelOptions(), "smollm2-135m"),
        (ModelOptions(model="qwen2.5-0.5b", device="cuda", dtype="bfloat16"), "qwen2.5-0.5b (cuda, bfloat16)"),
        (ModelOptions(dtype="float16"), "smollm2-135m (float16)"),
        (ModelOptions(device_map="auto"), "smollm2-135m (device map auto)"),
    ],
)
def test_model_label_names_the_model_and_only_the_options_given(options, label):
    assert options.label == label


@pytest.mark.usefixtures("fake_model", "tasks_registered")
def test_eval_title_names_the_model(tmp_path):
    result = invoke("eval", *TASK_ARGS, "--results", tmp_path)
    assert result.exit_code == 0, result.output
    assert "passkey on smollm2-135m" in result.stdout and "ModelOptions" not in result.stdout
    result = invoke("eval", *TASK_ARGS, "--device", "cpu", "--dtype", "float32", "--results", tmp_path, "-F", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "smollm2-135m"
    result = invoke("eval", *TASK_ARGS, "--device", "cpu", "--dtype", "float32", "--results", tmp_path)
    assert "passkey on smollm2-135m (cpu, float32)" in flat(result.stdout)


@pytest.mark.usefixtures("fake_model", "tasks_registered")
def test_ablate_title_names_the_model(tmp_path):
    result = invoke("ablate", "chunk_size=64", *TASK_ARGS, "--device", "cpu", "--results", tmp_path)
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "1 run(s) of passkey on smollm2-135m (cpu)" in out
    assert "Ablation of passkey on smollm2-135m (cpu)" in out and "ModelOptions" not in out


# --------------------------------------------------------------------------- timings


def test_warm_up_packs_a_chunk_and_decodes_over_it(monkeypatch):
    from kvstream import engine
    from kvstream.eval.runner import WARM_UP_NEW_TOKENS, warm_up

    made = []

    def spy(model, config):
        made.append(real(model, config))
        return made[-1]

    real = engine.make_cache
    monkeypatch.setattr(engine, "make_cache", spy)
    config = CompressionConfig(chunk_size=64)
    warm_up(small_model(), byte_tokenizer(), config)
    generated = made[0]  # then the perplexity's cache and its full-precision reference
    assert generated.layers[0].packed_length == config.chunk_size
    assert generated.get_seq_length() == config.chunk_size + 2 + WARM_UP_NEW_TOKENS - 1


@pytest.mark.usefixtures("fake_model", "tasks_registered")
def test_eval_timings_exclude_one_time_costs(one_time_cost, tmp_path):
    result = invoke("eval", *TASK_ARGS, "--chunk-size", "64", "--results", tmp_path, "-F", "json")
    assert result.exit_code == 0, result.output
    assert one_time_cost == {"StreamingQuantizedCache", "FullPrecisionCache"}
    payload = json.loads(result.stdout)
    prefill = {row["metric"]: row for row in payload["summary"]}["prefill_seconds"]
    samples = int(TASK_ARGS[TASK_ARGS.index("--samples") + 1])
    for variant in ("quantized", "full_precision"):
        # a mean over the samples: at least ONE_TIME_SECONDS / samples had the first sample paid the cost
        assert prefill[variant] < ONE_TIME_SECONDS / samples, (variant, prefill)


@pytest.mark.usefixtures("fake_model")
def test_quantize_run_speed_excludes_one_time_costs(one_time_cost):
    result = invoke(
        "quantize-run", "What is 2+2?", "--max-new-tokens", "4", "--compare-fp", "--chunk-size", "8", "--bits", "2/8"
    )
    assert result.exit_code == 0, result.output
    assert one_time_cost == {"StreamingQuantizedCache", "FullPrecisionCache"}
    tokens = [int(n) for n in re.search(r"prompt / new tokens\W+(\d+) / \d+\W+(\d+) / \d+", result.stdout).groups()]
    speeds = re.search(r"prefill tokens/s\W+([\d,.]+)\W+([\d,.]+)", result.stdout).groups()
    for n, speed in zip(tokens, speeds, strict=True):
        assert n / float(speed.replace(",", "")) < ONE_TIME_SECONDS / 2, (n, speed)
