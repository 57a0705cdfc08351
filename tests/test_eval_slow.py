"""Passkey retrieval on the real SmolLM2-135M-Instruct: the baseline and the 4/8-bit cache both find the key."""

from __future__ import annotations

import json

import pytest

from kvstream.config import CompressionConfig, parse_bits
from kvstream.eval import EvalSpec, run_eval
from kvstream.schema import FULL_PRECISION, QUANTIZED
from kvstream.tasks.base import TaskOptions
from kvstream.tasks.synthetic import passkey

pytestmark = pytest.mark.slow


def test_passkey_1024_tokens_bits_4_8(smollm2, tmp_path):
    model, tokenizer = smollm2
    config = CompressionConfig(**parse_bits("4/8"))
    spec = EvalSpec(
        task=passkey,
        model="smollm2-135m",
        config=config,
        options=TaskOptions(samples=2, length=1024),
        results_dir=tmp_path,
    )
    result = run_eval(spec, bundle=(model, tokenizer))
    rows = result.rows
    per = rows[(rows["sample"] != "") & (rows["metric"] == "accuracy")]
    assert len(per) == 4
    for sample in per.itertuples():
        assert abs(json.loads(sample.extra)["prompt_tokens"] - 1024) <= 21
    summary = result.summary.set_index("metric")
    assert summary.loc["accuracy", FULL_PRECISION] == 1.0
    assert summary.loc["accuracy", QUANTIZED] == 1.0
    agg = rows[rows["sample"] == ""].set_index(["variant", "metric"])["value"]
    assert agg[(QUANTIZED, "bits_per_element")] < agg[(FULL_PRECISION, "bits_per_element")]
