"""Every generation mode transformers offers for a dynamic cache, run on the streaming cache.

Greedy, sampling, beam search, assisted decoding (an assistant model, prompt lookup), several
sequences per prompt and left-padded batches: at 16 bits each gives DynamicCache's tokens; at 4 bits
each gives what an equivalent run without the mode's cache operation gives (every returned row
against its own sequence in a fresh cache, assisted decoding against a replay that never saw the
rejected candidates). The row operations and `crop` are also tested directly on prefilled caches.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache
from kvstream.cache.streaming import StreamingLayer
from kvstream.engine.prefill import position_ids_for
from kvstream.quant.uniform import UniformQuantizer
from kvstream.testing import random_ids, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated")

FULL = dict(key_bits_normal=16, key_bits_sink_outlier=16, value_bits_normal=16, value_bits_sink_outlier=16)
PROMPT = 37
PADS = (0, 6)
NEW = 8


def _config(bits: int, **changes) -> CompressionConfig:
    """Blocks of 8 tokens; at 4 bits with outlier channels and groups, and sinks."""
    if bits == 16:
        return CompressionConfig(chunk_size=8, value_quant_groups=16, **FULL, **changes)
    return CompressionConfig(
        chunk_size=8,
        value_quant_groups=8,
        key_bits_normal=bits,
        value_bits_normal=bits,
        outlier_threshold_relative=1.5,
        **changes,
    )


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_hidden_layers=3, max_position_embeddings=512)


@pytest.fixture(scope="module")
def assistant():
    """A different random model: most of its candidates are rejected. It drafts 4 tokens every step."""
    draft = tiny_llama(seed=5, max_position_embeddings=512)
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    return draft


def _prompts(batch: int, pads: tuple[int, ...] = (), seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (never the pad id 0, except in the pads) and the mask, row i left-padded with ``pads[i]``."""
    ids = random_ids(PROMPT, seed=seed, batch=batch).clamp_min(1)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def _repetitive_prompt() -> torch.Tensor:
    """A prompt of a repeated phrase, so that prompt lookup finds candidates (the first ones cross a block)."""
    phrase = random_ids(6, seed=11).clamp_min(1)
    return torch.cat([random_ids(PROMPT - 30, seed=12).clamp_min(1), phrase.repeat(1, 5)], dim=1)


BATCH_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True),
    "beam_search": dict(num_beams=3, do_sample=False),
    "beam_sampling": dict(num_beams=3, do_sample=True),
    "several_per_prompt": dict(do_sample=True, num_return_sequences=3),
    "several_beams_per_prompt": dict(num_beams=3, num_return_sequences=2, do_sample=False),
}
ASSISTED_MODES = ["assistant_model", "prompt_lookup"]


def _generate(model, cache, inputs: dict, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(
            **inputs,
            past_key_values=cache,
            max_new_tokens=NEW,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **kwargs,
        )


def _assisted_inputs(mode: str, assistant) -> tuple[dict, dict]:
    if mode == "assistant_model":
        return {"input_ids": _prompts(1)[0]}, {"assistant_model": assistant, "do_sample": False}
    return {"input_ids": _repetitive_prompt()}, {"prompt_lookup_num_tokens": 4, "do_sample": False}


@pytest.fixture
def rewinds(monkeypatch) -> list[int]:
    """Counts the blocks `crop` took back (one entry per layer and crop)."""
    taken: list[int] = []
    rewind = StreamingLayer.rewind_packing

    def counting(layer, start, state):
        taken.append(start)
        rewind(layer, start, state)

    monkeypatch.setattr(StreamingLayer, "rewind_packing", counting)
    return taken


# -- 16 bits: DynamicCache's tokens and scores ------------------------------------------------------------
@pytest.mark.parametrize("mode", [*BATCH_MODES, *ASSISTED_MODES])
def test_sixteen_bits_give_dynamic_cache_tokens(model, assistant, rewinds, mode):
    if mode in BATCH_MODES:
        ids, mask = _prompts(2, PADS)
        inputs, kwargs = {"input_ids": ids, "attention_mask": mask}, BATCH_MODES[mode]
    else:
        inputs, kwargs = _assisted_inputs(mode, assistant)
    want = _generate(model, DynamicCache(config=model.config), inputs, **kwargs)
    cache = make_cache(model, _config(16))
    got = _generate(model, cache, inputs, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for mine, theirs in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)
    if "num_beams" in kwargs:
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=2e-5, rtol=1e-4)
    assert cache.layers[0].n_blocks >= 4  # the prompt alone fills several blocks
    if mode in ASSISTED_MODES:
        assert rewinds, "some rejected candidates must have been packed already"


# -- 4 bits: each returned row is what its own sequence gives in a fresh cache ------------------------------
def _forced_logprobs(model, config, prompt: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` after a one-row prompt, in a fresh cache, appended as generate does:
    the prompt in one forward, then one token at a time."""
    cache = make_cache(model, config)
    out = []
    with torch.inference_mode():
        logits = model(input_ids=prompt, attention_mask=mask, position_ids=position_ids_for(mask), cache=cache).logits
        for token in tokens:
            logprobs = logits[0, -1].float().log_softmax(-1)
            out.append(logprobs[token])
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            positions = position_ids_for(mask)[:, -1:]
            logits = model(input_ids=token.view(1, 1), attention_mask=mask, position_ids=positions, cache=cache).logits
    return torch.stack(out)


@pytest.mark.parametrize("mode", list(BATCH_MODES))
def test_four_bit_rows_equal_their_own_sequence_in_a_fresh_cache(model, mode):
    """Beams reordered, rows expanded: every returned sequence scores as it does alone, padding and all."""
    config = _config(4)
    kwargs = dict(BATCH_MODES[mode], length_penalty=0.0)
    ids, mask = _prompts(2, PADS)
    cache = make_cache(model, config)
    out = _generate(model, cache, {"input_ids": ids, "attention_mask": mask}, **kwargs)
    assert any(g.keys.high is not None for g in cache.layers[1].groups)  # outlier units exercised
    per_prompt = out.sequences.shape[0] // 2
    forced = [
        _forced_logprobs(model, config, ids[i // per_prompt, None], mask[i // per_prompt, None], seq[PROMPT:])
        for i, seq in enumerate(out.sequences)
    ]
    if "num_beams" in kwargs:  # the score of a beam is the sum of its tokens' log-probabilities
        assert bool((out.beam_indices[:, 1:NEW] != out.beam_indices[:, :1]).any()), "beams must be reordered"
        torch.testing.assert_close(out.sequences_scores, torch.stack(forced).sum(-1), atol=2e-4, rtol=1e-4)
    else:
        chosen = out.sequences[:, PROMPT:, None]
        got = torch.stack([step.float().log_softmax(-1) for step in out.logits], dim=1).gather(2, chosen)[..., 0]
        torch.testing.assert_close(got, torch.stack(forced), atol=2e-4, rtol=1e-4)


# -- 4 bits: assisted decoding equals a run that never saw the rejected candidates --------------------------
@pytest.mark.parametrize("decode_storage", ["buffered", "full_precision"])
@pytest.mark.parametrize("mode", ASSISTED_MODES)
def test_four_bit_assisted_decoding_equals_a_replay_without_rejected_tokens(
    model, assistant, rewinds, mode, decode_storage
):
    config = _config(4, decode_storage=decode_storage)
    inputs, kwargs = _assisted_inputs(mode, assistant)
    cache = make_cache(model, config)
    kept: list[int] = []  # cache length after every crop: the replay appends up to there, and crops nothing
    crop = cache.crop

    def logged(tokens_to_remove: int) -> None:
        crop(tokens_to_remove)
        kept.append(cache.get_seq_length())

    cache.crop = logged
    out = _generate(model, cache, inputs, **kwargs)
    if decode_storage == "buffered":  # with full-precision decode storage only the first verification packs
        assert rewinds, "some rejected candidates must have been packed already"
    sequence = out.sequences
    replay = make_cache(model, config)
    start = 0
    with torch.inference_mode():
        for end in kept:
            logits = model(input_ids=sequence[:, start:end], cache=replay).logits
            replay.crop(0)
            # after every kept token past the prompt, the replay's greedy choice is the token assisted decoding kept
            first = max(start, inputs["input_ids"].shape[1] - 1)
            assert torch.equal(logits[0, first - start :].argmax(-1), sequence[0, first + 1 : end + 1])
            start = end
    for mine, theirs in zip(cache.layers, replay.layers, strict=True):
        assert (mine.packed_length, mine.length) == (theirs.packed_length, theirs.length)
        torch.testing.assert_close(mine.restore_history(), theirs.restore_history(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
    report = cache.memory_report()
    assert report["stored_bytes"] == sum(report["breakdown"].values())


# -- crop, directly --------------------------------------------------------------------------------------
def _synthetic(batch: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[batch, 2, n, 16]`` with two loud key channels (outliers)."""
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, 2, n, 16, generator=g), torch.randn(batch, 2, n, 16, generator=g)
    keys[..., 3] *= 12
    keys[..., 9] *= 6
    return keys, values


def _append(cache, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
    for i in range(len(cache.layers)):
        cache.update(keys[:, :, start:end] + i, values[:, :, start:end] - i, i)


def _held(cache) -> list[torch.Tensor]:
    """Every tensor the cache holds per layer, the statistics and the position table, in a fixed order."""
    out = [cache.positions, cache.valid]
    for i, layer in enumerate(cache.layers):
        out += [layer.keys, layer.values, *cache.stats.layer_state(i)]
        for group in layer.groups:
            for store in (group.keys, group.values):
                for q in (store.high, store.low):
                    if q is not None:
                        out += [q.codes, *(t for t in (q.scale, q.zero) if t is not None)]
                if store.position is not None:
                    out.append(store.position)
            for _, sinks in group.sinks:
                out += [sinks.keys.codes, sinks.keys.scale, sinks.values.codes, sinks.values.scale, sinks.slots]
    return out


def _assert_same(a, b) -> None:
    held_a, held_b = _held(a), _held(b)
    assert len(held_a) == len(held_b)
    for x, y in zip(held_a, held_b, strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


def test_crop_takes_back_the_block_packed_last_bit_for_bit(model):
    """Appending 45 + 6 tokens (a block closes at 48) and cropping 4 leaves the cache of 45 + 2, byte for byte."""
    config = _config(4, attention="restore")
    keys, values = _synthetic(2, 64)
    cropped, fresh = make_cache(model, config), make_cache(model, config)
    for cache, pieces in ((cropped, (45, 51)), (fresh, (45, 47))):
        _append(cache, keys, values, 0, pieces[0])
        cache.activate_past_recording()
        _append(cache, keys, values, pieces[0], pieces[1])
    assert cropped.layers[0].packed_length == 48
    cropped.crop(-4)
    assert cropped.layers[0].packed_length == 40 and cropped.get_seq_length() == 47
    _assert_same(cropped, fresh)
    assert cropped.memory_report()["breakdown"] == fresh.memory_report()["breakdown"]
    for cache in (cropped, fresh):  # and the block closing at 48 packs the same bytes in both
        _append(cache, keys, values, 47, 60)
    _assert_same(cropped, fresh)
    report = cropped.memory_report()
    assert report["breakdown"]["crop_checkpoint"] == 3 * 2 * (2 * 2 * 8 * 16 * 4)  # one block kept exactly
    assert report["stored_bytes"] == sum(report["breakdown"].values())


def test_crop_refuses_what_it_cannot_undo_and_leaves_the_cache_unchanged(model):
    config = _config(4, attention="restore")
    keys, values = _synthetic(1, 64)
    cache = make_cache(model, config)
    _append(cache, keys, values, 0, 21)  # blocks up to 16, tail 16..21
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(3)
    with pytest.raises(ValueError, match="cannot crop layer 0 to 15 tokens: tokens before 16 are packed"):
        cache.crop(-6)
    assert [layer.length for layer in cache.layers] == [21] * 3 and cache.positions.shape[1] == 21
    cache.crop(-5)  # the whole tail
    assert cache.get_seq_length() == 16 and cache.layers[0].keys.shape[2] == 0
    cache.activate_past_recording()
    _append(cache, keys, values, 16, 26)  # packs 16..24
    with pytest.raises(ValueError, match="tokens before 16 are packed"):
        cache.crop(-11)  # only the block packed last can be taken back
    cache.crop(-10)
    assert cache.get_seq_length() == 16 and cache.layers[0].packed_length == 16


# -- row operations, directly --------------------------------------------------------------------------------
ROW_PADS = (0, 5, 11)


def _prefilled(model, config, rows: list[int] | None = None):
    """A cache of the three prompts of ``ROW_PADS`` (or only ``rows`` of them) prefilled in chunks, with its mask."""
    ids, mask = _prompts(3, ROW_PADS, seed=7)
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    cache = make_cache(model, config)
    chunked_prefill(model, ids, cache, config.chunk_size, attention_mask=mask)
    return cache, mask


def _row_bytes(q, dim: int) -> torch.Tensor:
    """Packed codes of a quantized tensor as one byte row per batch row ([rows, outer, bytes])."""
    outer = int(torch.tensor(q.shape[:dim]).prod())
    if q.bits == 16:
        return q.codes.movedim(dim, 0).reshape(q.shape[dim], -1)
    return q.codes.view(outer, q.shape[dim], -1).transpose(0, 1)


def test_selected_rows_hold_the_original_rows_bytes(model):
    cache, _ = _prefilled(model, _config(4))
    before = [list(layer.groups) for layer in cache.layers]
    tails = [(layer.keys, layer.values) for layer in cache.layers]
    stats = [cache.stats.layer_state(i) for i in range(3)]
    history = [layer.restore_history() for layer in cache.layers]
    positions, valid = cache.positions, cache.valid
    sinks = cache.layers[0].sink_tokens()
    index = torch.tensor([2, 0, 0, 1])
    cache.batch_select_indices(index)
    for now, then in zip(cache.layers[0].sink_tokens(), sinks, strict=True):  # the kept fp32 read of the sinks
        assert torch.equal(now, then[index])
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, tails[i][0][index]) and torch.equal(layer.values, tails[i][1][index])
        for old, new in zip(before[i], layer.groups, strict=True):
            for old_store, new_store in ((old.keys, new.keys), (old.values, new.values)):
                for a, b in ((old_store.high, new_store.high), (old_store.low, new_store.low)):
                    if a is not None:
                        assert torch.equal(_row_bytes(b, 1), _row_bytes(a, 1)[index])
                        assert torch.equal(b.scale, a.scale[:, index])
                if old_store.position is not None:
                    assert torch.equal(new_store.position, old_store.position[:, index])
            for (_, old_sinks), (_, new_sinks) in zip(old.sinks, new.sinks, strict=True):
                assert torch.equal(_row_bytes(new_sinks.keys, 0), _row_bytes(old_sinks.keys, 0)[index])
                assert torch.equal(new_sinks.slots, old_sinks.slots[index])
        restored = layer.restore_history()
        assert torch.equal(restored[0], history[i][0][index]) and torch.equal(restored[1], history[i][1][index])
        for now, then in zip(cache.stats.layer_state(i), stats[i], strict=True):
            assert torch.equal(now, then[index])
    assert torch.equal(cache.positions, positions[index]) and torch.equal(cache.valid, valid[index])
    assert any(g.sinks for g in cache.layers[0].groups) and any(g.keys.high is not None for g in before[1])


def test_memory_report_follows_the_rows(model):
    cache, _ = _prefilled(model, _config(4))
    cache.layers[0].sink_tokens()  # the kept fp32 sink read is per row as well
    report = cache.memory_report()
    cache.reorder_cache(torch.tensor([1, 2, 0]))
    same = cache.memory_report()
    assert same["stored_bytes"] == sum(same["breakdown"].values())
    shared = {"block_rope"}  # dropped with the old batch, rebuilt on next use
    assert {k: v for k, v in same["breakdown"].items() if k not in shared} == {
        k: v for k, v in report["breakdown"].items() if k not in shared
    }
    cache.batch_repeat_interleave(2)
    doubled = cache.memory_report()
    assert doubled["elements"] == 2 * report["elements"]
    for kind, nbytes in report["breakdown"].items():
        if kind not in shared:
            assert doubled["breakdown"][kind] == 2 * nbytes, kind
    assert doubled["stored_bytes"] == sum(doubled["breakdown"].values()) == cache.stored_bytes()


@pytest.mark.parametrize("operation", ["select", "mask", "repeat"])
def test_row_operations_equal_a_cache_built_for_those_rows(model, operation):
    """The next decode step of the rearranged cache equals that of a cache prefilled for those rows only."""
    config = _config(4)
    cache, mask = _prefilled(model, config)
    if operation == "select":
        rows = [2, 0]
        cache.batch_select_indices(torch.tensor(rows))
    elif operation == "mask":
        rows = [0, 2]
        cache.batch_select_indices(torch.tensor([True, False, True]))
    else:
        rows = [0, 0, 1, 1, 2, 2]
        cache.batch_repeat_interleave(2)
    built, built_mask = _prefilled(model, config, rows)
    assert torch.equal(built_mask, mask[rows])
    step = torch.cat([built_mask, built_mask.new_ones(len(rows), 1)], dim=1)
    token = torch.full((len(rows), 1), 5)
    with torch.inference_mode():
        got = model(input_ids=token, attention_mask=step, position_ids=position_ids_for(step)[:, -1:], cache=cache)
        want = model(input_ids=token, attention_mask=step, position_ids=position_ids_for(step)[:, -1:], cache=built)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    for mine, theirs in zip(cache.layers, built.layers, strict=True):
        torch.testing.assert_close(mine.restore_history(), theirs.restore_history(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,trailing", [(3, (5, 4)), (4, (8, 4)), (2, (3, 3))])
def test_quantized_rows_on_and_off_byte_boundaries(bits, trailing):
    """Rows whose codes start mid-byte are unpacked and packed again: the same codes, no re-quantization."""
    x = torch.randn(2, 3, *trailing)
    q = UniformQuantizer().quantize(x, bits, dim=-1)
    index = torch.tensor([2, 0, 2, 1])
    rows = q.select_rows(1, index)
    assert rows.shape == (2, 4, *trailing) and rows.nbytes() < 2 * q.nbytes()
    assert torch.equal(UniformQuantizer().dequantize(rows), UniformQuantizer().dequantize(q)[:, index])


def test_row_selection_without_row_support_in_the_stats_raises(model):
    class NoRows:
        def __getattr__(self, name):
            if name == "select_rows":
                raise AttributeError(name)
            return getattr(stats, name)

    cache, _ = _prefilled(model, _config(4))
    stats, cache.stats = cache.stats, NoRows()
    with pytest.raises(NotImplementedError, match="cannot select batch rows"):
        cache.reorder_cache(torch.tensor([1, 0, 2]))


def test_contrastive_search_is_not_in_core_transformers(model):
    """transformers 5.24 moved contrastive search to custom generate code on the Hub: core refuses it."""
    ids, _ = _prompts(1)
    with pytest.raises(ValueError, match="trust_remote_code"):
        _generate(model, make_cache(model, _config(4)), {"input_ids": ids}, penalty_alpha=0.6, top_k=4)
