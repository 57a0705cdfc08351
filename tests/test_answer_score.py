"""The gold answer's teacher-forced log-likelihood: against a plain forward, and without a trace on the cache."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import pytest
import torch

from kvstream import CompressionConfig, chunked_prefill, greedy_generate, make_cache
from kvstream.config import resolve_config_path
from kvstream.engine.scoring import AnswerScore, answer_logprobs, fork_cache, score_answer
from kvstream.eval.runner import make_context
from kvstream.testing import random_ids, tiny_decoder, tiny_llama

PROMPT, ANSWER, CHUNK = 200, 40, 32
"""A prompt that packs several chunks and leaves a partial one; an answer whose append packs another."""


@pytest.fixture(scope="module")
def model():
    return tiny_llama(max_position_embeddings=512)


def hand_logprobs(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Each answer token's log-probability from one plain forward over prompt and answer, log_softmax by hand."""
    with torch.no_grad():
        logits = model(torch.cat([prompt, answer[None]], dim=1)).logits[0].double()
    n = prompt.shape[1]
    picked = logits[n - 1 : n - 1 + answer.numel()].gather(1, answer[:, None])[:, 0]
    return picked - torch.logsumexp(logits[n - 1 : n - 1 + answer.numel()], dim=-1)


@pytest.mark.parametrize("chunk", [16, 32, 64, 256])
def test_the_score_is_the_hand_computed_log_likelihood_with_the_full_precision_cache(model, chunk):
    prompt, answer = random_ids(PROMPT, seed=3), random_ids(ANSWER, seed=4)[0]
    cache = make_cache(model, CompressionConfig(cache="full", chunk_size=chunk))
    last = chunked_prefill(model, prompt, cache, chunk)
    got = answer_logprobs(model, cache, last, answer)
    want = hand_logprobs(model, prompt, answer)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == PROMPT  # the cache itself still ends with the prompt


def test_the_eval_path_scores_the_gold_answer_and_generates_from_the_prompt(model):
    prompt, answer = random_ids(PROMPT, seed=5)[0].tolist(), random_ids(ANSWER, seed=6)[0].tolist()
    tokenizer = type("Tok", (), {"eos_token_id": None, "decode": staticmethod(lambda ids, **_: repr(ids))})()
    ctx = make_context(model, tokenizer, CompressionConfig(cache="full", chunk_size=CHUNK))
    scored = ctx.generate_scored(prompt, answer, 6)
    want = hand_logprobs(model, torch.tensor([prompt]), torch.tensor(answer))
    assert scored.tokens == ANSWER
    assert math.isclose(scored.logprob, float(want.sum()), rel_tol=1e-5)
    assert math.isclose(scored.mean_logprob, float(want.mean()), rel_tol=1e-5)
    assert scored.text == ctx.generate(prompt, 6)  # generation starts from the prompt, not from the answer


def test_one_token_answer_needs_no_forward_and_an_empty_one_scores_nothing(model):
    prompt = random_ids(50, seed=7)
    cache = make_cache(model, CompressionConfig(cache="full", chunk_size=CHUNK))
    last = chunked_prefill(model, prompt, cache, CHUNK)
    (one,) = answer_logprobs(model, cache, last, [9]).tolist()
    assert math.isclose(one, float(torch.log_softmax(last[0].double(), -1)[9]), rel_tol=1e-6)
    assert score_answer(model, cache, last, []) == AnswerScore(0.0, 0)
    assert math.isnan(AnswerScore(0.0, 0).mean)


def tiny(**changes) -> CompressionConfig:
    return CompressionConfig(chunk_size=CHUNK, value_quant_groups=16, **changes)


def preset(name: str) -> CompressionConfig:
    """A budget preset of ``configs/`` at the tiny model's scale (its tail blocks and 16-bit tail kept)."""
    config = CompressionConfig.from_yaml(resolve_config_path(name))
    return replace(config, chunk_size=CHUNK, value_quant_groups=16, key_token_group=16, tail_block=8)


CACHES = {
    "full": lambda: tiny(cache="full"),
    "4/8 bits": lambda: tiny(),
    "2/8 bits": lambda: tiny(key_bits_normal=2, value_bits_normal=2),
    "recent window, decoded tokens exact": lambda: tiny(recent_window=8, decode_storage="full_precision"),
    "bits-2.5": lambda: preset("bits-2.5"),
    "bits-3.3": lambda: preset("bits-3.3"),
    "kivi": lambda: tiny(cache="kivi", key_bits_normal=2, value_bits_normal=2),
    "quanto": lambda: tiny(cache="quanto", key_bits_normal=2, value_bits_normal=2),
}
"""Every kind of cache the eval runs: the baseline, kvstream's widths and presets, and the plugin caches."""

PLUGINS = {"kivi": "kvstream_kivi", "quanto": "kvstream_quanto"}


def tensors_of(obj, seen=None, path="cache") -> dict[str, torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes and containers, by path."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type, torch.nn.Module)):
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out = {path: obj}
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) is not torch.Tensor and flatten is not None:  # a tensor subclass (quanto's): the tensors inside
            for inner in flatten()[0]:
                out.update(tensors_of(getattr(obj, inner), seen, f"{path}.{inner}"))
        return out
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and not type(obj).__module__.startswith("transformers.configuration"):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items() if not k.startswith("model_config")]
    else:
        items = []
    for name, value in items:
        out.update(tensors_of(value, seen, name))
    return out


CASES = [(name, "llama") for name in CACHES] + [(name, "mistral") for name in CACHES if name not in PLUGINS]
"""Every cache on a full-attention model; kvstream's also on a sliding-window one (whose blocks are freed)."""


@pytest.mark.parametrize(("name", "family"), CASES)
def test_scoring_leaves_the_cache_exactly_as_the_prompt_left_it(name, family):
    if name in PLUGINS and importlib.util.find_spec(PLUGINS[name]) is None:
        pytest.skip(f"plugin {PLUGINS[name]} is not installed")
    model = tiny_decoder(family)
    config = CACHES[name]()
    prompt, answer = random_ids(PROMPT, seed=11), random_ids(ANSWER, seed=12)[0]

    def run(score: bool):
        cache = make_cache(model, config)
        seen: dict[str, object] = {}

        def after_prefill(logits: torch.Tensor) -> None:
            before = {k: (t, t.clone()) for k, t in tensors_of(cache).items()}
            report = cache.memory_report()
            seen["score"] = score_answer(model, cache, logits, answer)
            after = tensors_of(cache)
            assert after.keys() == before.keys()
            for key, (tensor, copy) in before.items():
                assert after[key] is tensor, key  # nothing rebound
                if type(tensor) is torch.Tensor:
                    assert torch.equal(tensor, copy), key  # nothing written
            assert cache.memory_report() == report

        out = greedy_generate(
            model, prompt, cache, 8, config.chunk_size, after_prefill=after_prefill if score else None
        )
        return out, cache.memory_report(), seen.get("score")

    plain, plain_report, _ = run(False)
    scored, scored_report, score = run(True)
    assert torch.equal(plain, scored)  # the same tokens from the same state
    assert scored_report == plain_report  # bytes, peak and effective bits untouched by the fork
    assert score.tokens == ANSWER and math.isfinite(score.logprob)


@pytest.mark.parametrize("name", ["full", "4/8 bits", "bits-2.5"])
def test_the_fork_gives_each_layer_back_once_its_decoder_layer_has_run(model, name, monkeypatch):
    import weakref

    from kvstream.engine import scoring

    forks: list = []
    real_fork = scoring.fork_cache
    monkeypatch.setattr(scoring, "fork_cache", lambda cache: forks.append(real_fork(cache)) or forks[-1])
    cache = make_cache(model, CACHES[name]())
    last = chunked_prefill(model, random_ids(PROMPT, seed=8), cache, CHUNK)
    refs: list = []
    alive: list[list[bool]] = []

    def before_layer(module, args):
        if not refs:  # the fork's layers as `fork_cache` made them
            refs.extend(weakref.ref(layer) for layer in forks.pop().layers)
        alive.append([ref() is not None for ref in refs])

    handles = [layer.register_forward_pre_hook(before_layer) for layer in model.model.layers]
    try:
        answer_logprobs(model, cache, last, random_ids(ANSWER, seed=9)[0])
    finally:
        for handle in handles:
            handle.remove()
    # before decoder layer i runs, the fork's layers before i (and what their appends built) are gone
    layers = len(model.model.layers)
    assert alive == [[j >= i for j in range(layers)] for i in range(layers)]
    assert all(ref() is None for ref in refs)


@pytest.mark.parametrize("name", list(CACHES))
def test_giving_layers_back_changes_no_score(model, name, monkeypatch):
    if name in PLUGINS and importlib.util.find_spec(PLUGINS[name]) is None:
        pytest.skip(f"plugin {PLUGINS[name]} is not installed")
    from contextlib import nullcontext

    from kvstream.engine import scoring

    def scores() -> torch.Tensor:
        cache = make_cache(model, CACHES[name]())
        last = chunked_prefill(model, random_ids(PROMPT, seed=13), cache, CHUNK)
        return answer_logprobs(model, cache, last, random_ids(ANSWER, seed=14)[0])

    released = scores()
    monkeypatch.setattr(scoring, "released_as_they_finish", lambda *args: nullcontext())
    assert torch.equal(released, scores())


def test_a_fork_shares_the_tensors_and_copies_the_bookkeeping(model):
    cache = make_cache(model, tiny())
    chunked_prefill(model, random_ids(PROMPT, seed=2), cache, CHUNK)
    fork = fork_cache(cache)
    assert fork is not cache and fork.layers[0] is not cache.layers[0] and fork.layers[0].owner is fork
    assert fork.layers[0].keys is cache.layers[0].keys and fork.layers[0].groups is not cache.layers[0].groups
    assert fork.config is cache.config or fork.config == cache.config


def test_a_run_pairs_the_answer_log_likelihood_with_its_baseline(model, tmp_path):
    from test_eval import WordTokenizer

    from kvstream.eval import EvalSpec, run_eval
    from kvstream.schema import FULL_PRECISION, QUANTIZED
    from kvstream.tasks.base import TaskOptions
    from kvstream.tasks.synthetic import ANSWER_LOGPROB, vt

    tok = WordTokenizer()
    spec = EvalSpec(vt, "tiny", tiny(key_bits_normal=2, value_bits_normal=2), TaskOptions(samples=4, length=150))
    spec.results_dir = tmp_path
    result = run_eval(spec, bundle=(model, tok))
    rows = result.rows[(result.rows["metric"] == ANSWER_LOGPROB) & (result.rows["sample"] != "")]
    assert sorted(rows["variant"].value_counts().to_dict().items()) == [(FULL_PRECISION, 4), (QUANTIZED, 4)]
    # the baseline's per-token score is the hand-computed one on the sample's own prompt and gold answer
    sample = vt.samples(spec.options, tok)[0]
    want = hand_logprobs(model, torch.tensor([sample.meta["prompt_ids"]]), torch.tensor(sample.meta["answer_ids"]))
    fp = rows[(rows["variant"] == FULL_PRECISION) & (rows["sample"] == sample.id)]["value"].item()
    assert fp == pytest.approx(float(want.mean()), rel=1e-5)
    line = result.summary.set_index("metric").loc[ANSWER_LOGPROB]
    assert line["kind"] == "task" and line["n"] == 4
    assert line["delta"] == pytest.approx(line[QUANTIZED] - line[FULL_PRECISION])
    assert line["ci_low"] <= line["delta"] <= line["ci_high"]
    assert result.manifest["key"]["generation"] != ""  # the scoring rule is part of the key (see result_key)
    agg = result.rows[result.rows["sample"] == ""].set_index(["variant", "metric"])["value"]
    assert agg[(QUANTIZED, "answer_score_seconds")] > 0
