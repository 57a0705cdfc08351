"""GPU timing of kvstream in one short run: end-to-end chunked prefill and decode, and decode attention alone.

Made for a single run on a lent CUDA machine (one H200), so every measurement is guarded: a failure
prints one line naming the variant and the error and the run goes on; a time budget (``--budget``,
counted from the start of the script) skips what would not fit and stops any one measurement that
overruns (SIGALRM), so the script ends in time. Results are written after every measurement.

1. End to end, on a random-weight decoder shaped like SmolLM2-135M (30 layers, hidden 576, 9 query /
   3 KV heads of 64, MLP 1536, vocabulary 49152) in bf16: chunked prefill (`kvstream.chunked_prefill`)
   and greedy decode (median per step) at 4k-32k tokens for full precision (transformers `DynamicCache`,
   sdpa attention), kvstream 4/8 and the presets bits-2.5 / bits-3.3, interleaved between variants
   (medians over repetitions); peak GPU memory of each run; which history reader served prefill and
   decode. The prefill chunk grows (256, 512, ...) at a context whose kvstream prefill is projected to
   take longer than ``--max-prefill-s``; the chunk column says which one ran (the same for every variant
   of that context; the cache's block size stays ``chunk_size`` 256).
2. Decode attention alone: kvstream's packed attention (Triton decode kernel, sinks, exact tail) for one
   query token over a packed layer of N tokens (built by the real cache: `update` then `complete_update`,
   chunk by chunk) against torch SDPA over an fp16 KV cache of the same length, timed with CUDA events
   (median of many calls), for batch 1 / 3 KV heads / 9 query heads / head_dim 64 and batch 8 / 8 KV heads /
   32 query heads / head_dim 128.

    python benchmarks/gpu.py --out "$OUT"                                   # on the GPU machine
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke --device cpu --out /tmp/gpusmoke   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

T0 = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent


def _early_device(argv: list[str]) -> str:
    """The ``--device`` asked for, read before torch and triton are imported."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cuda"


if _early_device(sys.argv).startswith("cpu"):
    # on the CPU the Triton kernel runs in Triton's interpreter, which must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
"""SmolLM2-135M's geometry (the bundled model: Llama, 30 layers, GQA 9/3 heads of 64)."""

KERNEL_CASES = {
    "b1 kv3 q9 d64": dict(batch=1, kv_heads=3, q_heads=9, head_dim=64),
    "b8 kv8 q32 d128": dict(batch=8, kv_heads=8, q_heads=32, head_dim=128),
}
SMOKE_KERNEL_CASES = {
    "b1 kv3 q9 d64": dict(batch=1, kv_heads=3, q_heads=9, head_dim=64),
    "b2 kv2 q8 d128 (smoke)": dict(batch=2, kv_heads=2, q_heads=8, head_dim=128),
}
FP_LABEL = "full precision"
MAIN_LABEL = "kvstream 4/8"
DECODE_WARM_STEPS = 2
RESERVE_S = 8.0
"""Seconds of the budget kept back for writing the results."""


# --------------------------------------------------------------------------- guards and timing


class MeasurementTimeout(Exception):
    """A measurement ran past its share of the time budget."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = T0 + seconds

    def left(self) -> float:
        return self.end - time.monotonic() - RESERVE_S


_DEADLINES: list[tuple[float, float]] = []
"""(monotonic deadline, seconds allowed) of every open `time_limit`, innermost last."""


def _arm() -> None:
    if not _DEADLINES:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    remaining = min(d for d, _ in _DEADLINES) - time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))


def _expire(signum: int, frame: Any) -> None:
    due = [s for d, s in _DEADLINES if d <= time.monotonic() + 0.01]
    if due:
        raise MeasurementTimeout(f"stopped after {due[0]:.0f}s (its share of the time budget)")
    _arm()


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `MeasurementTimeout` in the main thread after ``seconds`` (between Python bytecodes); nests."""
    if seconds <= 0:
        raise MeasurementTimeout("no time left in the budget")
    signal.signal(signal.SIGALRM, _expire)
    entry = (time.monotonic() + seconds, seconds)
    _DEADLINES.append(entry)
    _arm()
    try:
        yield
    finally:
        _DEADLINES.remove(entry)
        _arm()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a device error is reported by the measurement that met it
            torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


class Recorder:
    """Everything measured, written to ``out`` after every measurement (so a killed run keeps what it had)."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "meta": meta,
            "kernel": [],
            "e2e_runs": [],
            "e2e": [],
            "errors": [],
            "skipped": [],
            "notes": [],
        }

    def attempt(self, label: str, fn: Callable[[], Any], limit: float) -> Any:
        """``fn()``, or None after printing one line naming ``label`` and the error."""
        try:
            with time_limit(limit):
                return fn()
        except Exception as error:
            line = f"FAILED {label}: {type(error).__name__}: {first_line(error)}"
            print(line, flush=True)
            where = traceback.extract_tb(error.__traceback__)
            self.data["errors"].append(
                {
                    "label": label,
                    "error": f"{type(error).__name__}: {first_line(error)}",
                    "where": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where[-4:]],
                }
            )
            cleanup()
            self.save()
            return None

    def skip(self, label: str, reason: str) -> None:
        print(f"SKIPPED {label}: {reason}", flush=True)
        self.data["skipped"].append({"label": label, "reason": reason})

    def note(self, text: str) -> None:
        print(f"NOTE {text}", flush=True)
        self.data["notes"].append(text)

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - T0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu_bench.md").write_text(render(self.data))


def time_calls(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of ``fn``: CUDA events around each call of a back-to-back stream on a GPU
    (launch gaps included where the host is the bottleneck), ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall = time.perf_counter()
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        sync(device)
        times = [start.elapsed_time(end) * 1e-3 for start, end in zip(starts, ends, strict=True)]
    else:
        times = []
        for _ in range(reps):
            tick = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tick)
    wall = (time.perf_counter() - wall) / reps
    return {"median_s": statistics.median(times), "min_s": min(times), "wall_per_call_s": wall, "reps": reps}


# --------------------------------------------------------------------------- models and caches


def build_model(device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides: Any) -> Any:
    """A random-weight Llama built as `kvstream.testing.tiny_llama` builds its tiny decoders, sized by ``overrides``."""
    from kvstream.testing import tiny_llama

    return tiny_llama(seed, **overrides).to(device=device, dtype=dtype).eval()


def reader_name(reader: Any) -> str:
    return getattr(reader, "__name__", None) or type(reader).__name__


def readers_of(cache: Any, model: Any, chunk: int) -> dict[str, str]:
    """Which history reader kvstream's attention picks for a prefill chunk and for a decode step of ``cache``."""
    if not hasattr(cache, "reads_packed"):
        return {"prefill": "sdpa", "decode": "sdpa"}
    if not cache.reads_packed:
        return {"prefill": "restored copy + sdpa", "decode": "restored copy + sdpa"}
    from kvstream.attention.packed import history_reader

    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = [layer for layer in cache.layers if getattr(layer, "groups", None)]
    out = {}
    for phase, q_len in (("prefill", chunk), ("decode", 1)):
        if not layers:
            out[phase] = "no packed blocks"
            continue
        device = layers[0].keys.device
        query = torch.zeros(layers[0].keys.shape[0], heads, q_len, head_dim, device=device, dtype=layers[0].keys.dtype)
        names = sorted({reader_name(history_reader(layer, query)) for layer in layers})
        out[phase] = "+".join(names)
    return out


# --------------------------------------------------------------------------- 2. decode attention alone


def kernel_section(args: argparse.Namespace, device: torch.device, rec: Recorder, budget: Budget) -> None:
    from kvstream import CompressionConfig, make_cache

    cases = SMOKE_KERNEL_CASES if args.smoke else KERNEL_CASES
    contexts = sorted(args.kernel_contexts)
    section_end = time.monotonic() + args.kernel_budget
    cfg = CompressionConfig(key_bits_normal=4, value_bits_normal=4)
    for label, geometry in cases.items():
        left = min(budget.left(), section_end - time.monotonic())
        if left < 5:
            rec.skip(f"kernel {label}", f"{left:.0f}s left of the kernel section's budget")
            continue
        log(f"decode attention, case {label}, N = {contexts}")
        with torch.inference_mode():
            rec.attempt(
                f"kernel {label}",
                lambda label=label, geometry=geometry: kernel_case(
                    args, device, rec, budget, section_end, cfg, make_cache, label, contexts, **geometry
                ),
                limit=left,
            )
        cleanup()
        rec.save()


def kernel_case(
    args: argparse.Namespace,
    device: torch.device,
    rec: Recorder,
    budget: Budget,
    section_end: float,
    cfg: Any,
    make_cache: Callable[..., Any],
    label: str,
    contexts: list[int],
    batch: int,
    kv_heads: int,
    q_heads: int,
    head_dim: int,
) -> None:
    from kvstream.attention.pending import take_pending

    dtype = torch.bfloat16
    longest = contexts[-1]
    model = build_model(
        device,
        dtype,
        seed=args.seed,
        vocab_size=128,
        hidden_size=q_heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=longest + 64,
        rope_theta=100000.0,
    )
    cache = make_cache(model, cfg)
    layer = cache.layers[0]
    g = torch.Generator(device=device).manual_seed(args.seed)
    # the keys and values the model would hand over (post-RoPE, a few large key channels as real models have),
    # plus the decoded token's at index ``longest``; fp16 for SDPA, bf16 (the model's dtype) for kvstream
    keys = torch.randn(batch, kv_heads, longest + 1, head_dim, device=device, generator=g, dtype=torch.float16)
    keys[..., :3] *= 6.0
    values = torch.randn(batch, kv_heads, longest + 1, head_dim, device=device, generator=g, dtype=torch.float16)
    query16 = torch.randn(batch, q_heads, 1, head_dim, device=device, generator=g, dtype=torch.float16)
    chunk = cfg.chunk_size
    packed = 0
    for n in contexts:
        if time.monotonic() > section_end or budget.left() < 3:
            rec.skip(f"kernel {label} N={n}", "out of the kernel section's time budget")
            break
        tick = time.perf_counter()
        while packed < n:  # the real cache packs chunk by chunk, as a prefill would
            end = min(packed + chunk, n)
            cache.update(keys[:, :, packed:end].to(dtype), values[:, :, packed:end].to(dtype), 0)
            take_pending()  # no attention reads this append: pack it at once
            layer.complete_update(end - packed)
            packed = end
        sync(device)
        pack_s = time.perf_counter() - tick
        if not getattr(layer, "kernel_ready", lambda: True)():
            rec.note(f"kernel {label} N={n}: the packed layer is not kernel-ready (the Triton reader cannot read it)")
        row = kernel_point(args, device, rec, budget, section_end, label, layer, keys, values, query16, n)
        row.update(case=label, batch=batch, kv_heads=kv_heads, q_heads=q_heads, head_dim=head_dim, pack_s=pack_s)
        finish_kernel_row(row)
        rec.data["kernel"].append(row)
        rec.save()
        log(kernel_line(row))


def kernel_point(
    args: argparse.Namespace,
    device: torch.device,
    rec: Recorder,
    budget: Budget,
    section_end: float,
    label: str,
    layer: Any,
    keys: torch.Tensor,
    values: torch.Tensor,
    query16: torch.Tensor,
    n: int,
) -> dict[str, Any]:
    """Timings of one query token over the ``n`` tokens packed in ``layer``, against SDPA over the same fp16 keys."""
    from kvstream.attention.packed import grouped_queries, packed_attention, reference_history
    from kvstream.kernels import TritonDecode, triton_decode, visibility
    from kvstream.kernels.online import OnlineSoftmax

    dtype = layer.keys.dtype
    batch, q_heads, _, head_dim = query16.shape
    kv_heads = keys.shape[1]
    query = query16.to(dtype)
    scale = head_dim**-0.5
    reader = TritonDecode()
    tail_k = keys[:, :, n : n + 1].to(dtype)
    tail_v = values[:, :, n : n + 1].to(dtype)
    k16 = keys[:, :, : n + 1].contiguous()
    v16 = values[:, :, : n + 1].contiguous()
    n_rep = q_heads // kv_heads

    def kvstream_attention() -> torch.Tensor:
        return packed_attention(layer, query, tail_k, tail_v, None, scale, reader)

    q_grouped = grouped_queries(query, kv_heads) * scale
    sinks = layer.sink_tokens()
    visible, _ = visibility(layer, None, None if sinks is None else sinks[0])

    def blocks_only() -> None:
        triton_decode.decode_history(layer, q_grouped, visible, OnlineSoftmax())

    def sdpa_gqa() -> torch.Tensor:
        return F.scaled_dot_product_attention(query16, k16, v16, enable_gqa=True)

    row: dict[str, Any] = {
        "tokens": n,
        "packed_bytes": layer.packed_nbytes(),
        "fp16_bytes": 2 * 2 * batch * kv_heads * n * head_dim,
    }
    reps, warmup = args.kernel_reps, args.kernel_warmup

    def limit() -> float:
        return max(1.0, min(budget.left(), section_end - time.monotonic()))

    # checks in fp32 (the readers compute in fp32 and return the query's dtype), so the kernel's own error shows
    got = rec.attempt(
        f"kernel {label} N={n} kvstream attention",
        lambda: packed_attention(layer, query.float(), tail_k, tail_v, None, scale, reader),
        limit(),
    )
    want = rec.attempt(f"kernel {label} N={n} sdpa fp16", sdpa_gqa, limit())
    oracle = rec.attempt(
        f"kernel {label} N={n} reference reader",
        lambda: packed_attention(layer, query.float(), tail_k, tail_v, None, scale, reference_history),
        limit(),
    )
    if got is not None:
        got = got.transpose(1, 2).float()
        if want is not None:  # quantization error (plus bf16 rounding) against exact fp16 attention
            row["rel_error_vs_fp16"] = relative_error(got, want)
        if oracle is not None:  # the kernel against kvstream's reference reader of the same packed bytes
            row["rel_error_vs_reference"] = relative_error(got, oracle.transpose(1, 2))
    for name, fn in (("kvstream", kvstream_attention), ("kvstream_blocks", blocks_only), ("sdpa_gqa", sdpa_gqa)):
        timing = rec.attempt(
            f"kernel {label} N={n} {name}", lambda fn=fn: time_calls(fn, device, reps, warmup), limit()
        )
        if timing is not None:
            row[name] = timing
    repeated = rec.attempt(
        f"kernel {label} N={n} repeat KV heads",
        lambda: (k16.repeat_interleave(n_rep, dim=1), v16.repeat_interleave(n_rep, dim=1)),
        limit(),
    )
    if repeated is not None:
        k_rep, v_rep = repeated

        def sdpa_heads() -> torch.Tensor:
            return F.scaled_dot_product_attention(query16, k_rep, v_rep)

        timing = rec.attempt(
            f"kernel {label} N={n} sdpa_heads", lambda: time_calls(sdpa_heads, device, reps, warmup), limit()
        )
        if timing is not None:
            row["sdpa_heads"] = timing
    return row


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


def finish_kernel_row(row: dict[str, Any]) -> None:
    sdpa = [row[k]["median_s"] for k in ("sdpa_gqa", "sdpa_heads") if k in row]
    if sdpa and "kvstream" in row:
        row["sdpa_best_s"] = min(sdpa)
        row["speedup"] = row["sdpa_best_s"] / row["kvstream"]["median_s"]


def kernel_line(row: dict[str, Any]) -> str:
    def us(key: str) -> str:
        return f"{row[key]['median_s'] * 1e6:.1f}us" if key in row else "-"

    speed = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
    return (
        f"kernel {row['case']} N={row['tokens']}: kvstream {us('kvstream')} (blocks {us('kvstream_blocks')}), "
        f"sdpa gqa {us('sdpa_gqa')}, sdpa heads {us('sdpa_heads')}, speedup {speed}, "
        f"rel err vs fp16 {row.get('rel_error_vs_fp16', float('nan')):.3g}, "
        f"vs reference reader {row.get('rel_error_vs_reference', float('nan')):.2g}"
    )


# --------------------------------------------------------------------------- 1. end to end


def e2e_variants(args: argparse.Namespace, rec: Recorder) -> list[tuple[str, Any]]:
    from kvstream import CompressionConfig

    variants: list[tuple[str, Any]] = [
        (FP_LABEL, None),
        (MAIN_LABEL, CompressionConfig(key_bits_normal=4, value_bits_normal=4)),
    ]
    for preset in args.presets:
        cfg = rec.attempt(
            f"load preset {preset}", lambda preset=preset: CompressionConfig.from_yaml(ROOT / "configs" / preset), 30
        )
        if cfg is not None:
            variants.append((Path(preset).stem, cfg))
    return variants


def new_cache(model: Any, cfg: Any) -> Any:
    from kvstream import make_cache

    if cfg is None:  # the baseline: transformers' own cache and sdpa attention
        from transformers import DynamicCache

        if model.config._attn_implementation != "sdpa":
            model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    return make_cache(model, cfg)  # attaches kvstream's attention to the model


def e2e_run(
    model: Any, cfg: Any, ids: torch.Tensor, chunk: int, steps: int, device: torch.device, kernels: bool = True
) -> dict[str, Any]:
    """One fresh cache: prefill ``ids`` in chunks, then ``steps`` timed greedy decode steps (after warm ones);
    ``kernels=False`` turns kvstream's fused kernels off (``KVSTREAM_KERNELS=0``) for this run."""
    before = os.environ.get("KVSTREAM_KERNELS")
    os.environ["KVSTREAM_KERNELS"] = "1" if kernels else "0"
    try:
        return _e2e_run(model, cfg, ids, chunk, steps, device)
    finally:
        if before is None:
            os.environ.pop("KVSTREAM_KERNELS", None)
        else:
            os.environ["KVSTREAM_KERNELS"] = before


def _e2e_run(model: Any, cfg: Any, ids: torch.Tensor, chunk: int, steps: int, device: torch.device) -> dict[str, Any]:
    from kvstream import chunked_prefill
    from kvstream.engine.prefill import forward_hidden

    cleanup()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    cache = new_cache(model, cfg)
    step_times = []
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        sync(device)
        tick = time.perf_counter()
        logits = chunked_prefill(model, ids, cache, chunk)
        sync(device)
        prefill = time.perf_counter() - tick
        token = logits.argmax(-1, keepdim=True)
        for step in range(DECODE_WARM_STEPS + steps):
            sync(device)
            tick = time.perf_counter()
            hidden = forward_hidden(model, token, cache, cache.get_seq_length(), None)
            token = model.get_output_embeddings()(hidden[:, -1]).argmax(-1, keepdim=True)
            sync(device)
            if step >= DECODE_WARM_STEPS:
                step_times.append(time.perf_counter() - tick)
    out: dict[str, Any] = {
        "prefill_s": prefill,
        "decode_step_s": statistics.median(step_times),
        "decode_steps_s": step_times,
    }
    # warnings of the run, once each (kvstream says why a decode step falls back to the reference reader)
    out["warnings"] = sorted({f"{w.category.__name__}: {first_line(w.message)}" for w in caught})[:10]
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_above_weights_bytes"] = out["peak_bytes"] - base
    report = getattr(cache, "memory_report", None)
    if callable(report):
        memory = report()
        out["bits_per_element"] = memory.get("bits_per_element")
        out["cache_peak_stored_bytes"] = memory.get("peak_stored_bytes")
        reported = memory.get("readers", memory.get("reader"))
        if isinstance(reported, dict) and reported:  # the readers that served, as the cache recorded them
            out["readers"] = {phase: str(names) for phase, names in reported.items()}
    else:
        out["bits_per_element"] = float(torch.finfo(model.dtype).bits)
    if "readers" not in out:  # a cache that records none: which reader kvstream's attention would pick now
        out["readers"] = readers_of(cache, model, chunk)
    del cache, logits
    return out


def estimate(runs: list[dict[str, Any]], context: int, chunk: int, steps: int) -> float | None:
    """Projected seconds of one run at ``context``, from the longest measured one: prefill quadratic in the
    context and inversely proportional to the chunk (the history tiles read), decode linear."""
    if not runs:
        return None
    last = max(runs, key=lambda r: r["context"])
    grow = context / last["context"]
    prefill = last["prefill_s"] * grow**2 * last["chunk"] / chunk
    decode = last["decode_step_s"] * grow * (steps + DECODE_WARM_STEPS)
    return prefill + decode + 1.0


def e2e_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rec: Recorder, budget: Budget):
    contexts = sorted(args.contexts)
    steps = args.decode_steps
    geometry = {**SMOLLM2, "num_hidden_layers": args.layers, "max_position_embeddings": contexts[-1] + 64 + steps}
    log(f"end to end: building a random-weight SmolLM2-135M-shaped model ({args.layers} layers, {dtype})")
    model = rec.attempt("build model", lambda: build_model(device, dtype, seed=args.seed, **geometry), budget.left())
    if model is None:
        return
    rec.data["meta"]["e2e_model"] = {k: v for k, v in geometry.items()}
    variants = e2e_variants(args, rec)
    g = torch.Generator().manual_seed(args.seed + 1)
    all_ids = torch.randint(0, SMOLLM2["vocab_size"], (1, contexts[-1]), generator=g).to(device)
    runs: dict[str, list[dict[str, Any]]] = {}

    # warm-up: every variant once on a short input (kernels compiled, allocator primed)
    warm = all_ids[:, : args.warm_tokens]
    usable: list[tuple[str, Any, bool]] = []
    for label, cfg in variants:
        for kernels in (True, False) if cfg is not None else (True,):
            name = label if kernels else f"{label} (kernels off)"
            log(f"warm-up {name} ({warm.shape[1]} tokens)")
            result = rec.attempt(
                f"warm-up {name}",
                lambda cfg=cfg, kernels=kernels: e2e_run(model, cfg, warm, args.chunk, 2, device, kernels),
                min(budget.left(), args.max_run_s),
            )
            if result is not None:
                usable.append((name, cfg, kernels))
                log(f"  readers {result['readers']}")
                break
            if kernels and cfg is not None:  # a fused kernel that fails here: measure the reference path instead
                rec.note(f"{label}: failed with kvstream's kernels on; measured with KVSTREAM_KERNELS=0")
    if not usable:
        return

    chunks: dict[int, int] = {}
    skipped: set[tuple[int, str]] = set()
    seen_warnings: set[str] = set()
    # round 0: full precision and kvstream 4/8 at every context first (the comparison that matters most);
    # the presets join from round 1 (their first run interleaved with the others' second), so they cannot
    # take the time the main pair needs at the longest contexts
    for round_ in range(args.reps + 1):
        for context in contexts:
            if context not in chunks:
                main = next((v for k, v in runs.items() if k.startswith(MAIN_LABEL)), [])
                chunks[context] = pick_chunk(args, main, context, steps, rec)
            chunk = chunks[context]
            ids = all_ids[:, :context]
            for label, cfg, kernels in usable:  # interleaved, so drifts of the machine hit every variant alike
                rep = round_ - (0 if label.startswith((FP_LABEL, MAIN_LABEL)) else 1)
                key = (context, label)
                if rep < 0 or rep >= args.reps or key in skipped:
                    continue
                done = [r for r in runs.setdefault(label, []) if r["context"] == context]
                if len(done) < rep:
                    continue  # an earlier repetition failed or was skipped here
                projected = estimate(done or runs[label], context, chunk, steps)
                left = budget.left()
                cap = min(left, args.max_run_s)
                if projected is not None and projected > cap:
                    if rep == 0:
                        rec.skip(
                            f"e2e {label} at {context}",
                            f"projected {projected:.0f}s > {cap:.0f}s allowed ({left:.0f}s of the budget left)",
                        )
                    skipped.add(key)
                    continue
                if left < 3:
                    skipped.add(key)
                    continue
                log(f"e2e {context} tokens, rep {rep}, {label} (chunk {chunk})")
                result = rec.attempt(
                    f"e2e {label} at {context} (rep {rep})",
                    lambda cfg=cfg, ids=ids, chunk=chunk, kernels=kernels: e2e_run(
                        model, cfg, ids, chunk, steps, device, kernels
                    ),
                    cap,
                )
                if result is None:
                    skipped.add(key)
                    continue
                result.update(context=context, chunk=chunk, rep=rep, variant=label)
                runs[label].append(result)
                rec.data["e2e_runs"].append(result)
                peak = result.get("peak_above_weights_bytes")
                log(
                    f"  prefill {result['prefill_s']:.3f}s, decode {result['decode_step_s'] * 1e3:.2f} ms/token"
                    + (f", peak +{peak / 2**20:.0f} MiB" if peak is not None else "")
                    + f", readers {result['readers']}"
                )
                for text in result["warnings"]:
                    if text not in seen_warnings:
                        seen_warnings.add(text)
                        log(f"  warning: {text}")
                rec.data["e2e"] = summarize(rec.data["e2e_runs"])
                rec.save()


def pick_chunk(args: argparse.Namespace, main_runs: list[dict[str, Any]], context: int, steps: int, rec: Recorder):
    """``--chunk``, doubled while kvstream 4/8's projected prefill at ``context`` exceeds ``--max-prefill-s``."""
    chunk = args.chunk
    if not main_runs:
        return chunk
    first = estimate(main_runs, context, chunk, 0)
    while chunk < args.max_chunk and chunk * 2 <= context // 2:
        projected = estimate(main_runs, context, chunk, 0)
        if projected is None or projected <= args.max_prefill_s:
            break
        chunk *= 2
    if chunk != args.chunk:
        rec.note(
            f"{context} tokens: prefill in chunks of {chunk} (with {args.chunk}, kvstream 4/8's prefill was "
            f"projected at {first:.0f}s > --max-prefill-s {args.max_prefill_s:g}); the same chunk for every variant"
        )
    return chunk


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (context, variant) and ratios to full precision at the same context."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["context"], r["variant"]), []).append(r)
    rows = []
    for (context, variant), samples in groups.items():
        row = {
            "context": context,
            "variant": variant,
            "chunk": samples[0]["chunk"],
            "reps": len(samples),
            "prefill_s": statistics.median(s["prefill_s"] for s in samples),
            "decode_step_s": statistics.median(s["decode_step_s"] for s in samples),
            "readers": samples[-1]["readers"],
            "warnings": sorted({w for s in samples for w in s.get("warnings", [])}),
            "bits_per_element": samples[-1].get("bits_per_element"),
        }
        for key in ("peak_bytes", "peak_above_weights_bytes"):
            if key in samples[-1]:
                row[key] = max(s[key] for s in samples)
        rows.append(row)
    by_context = {r["context"]: r for r in rows if r["variant"] == FP_LABEL}
    for row in rows:
        fp = by_context.get(row["context"])
        if fp is None:
            continue
        row["prefill_vs_fp"] = row["prefill_s"] / fp["prefill_s"]
        row["decode_vs_fp"] = row["decode_step_s"] / fp["decode_step_s"]
        if fp.get("peak_above_weights_bytes"):
            row["peak_vs_fp"] = row["peak_above_weights_bytes"] / fp["peak_above_weights_bytes"]
    order = {}
    for r in runs:
        order.setdefault(r["variant"], len(order))
    rows.sort(key=lambda r: (r["context"], order[r["variant"]]))
    return rows


# --------------------------------------------------------------------------- report


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    out = [
        "# kvstream GPU timings",
        "",
        f"_{meta.get('started', '')}, device {meta.get('device_name', '?')}, torch {meta.get('torch', '?')}, "
        f"triton {meta.get('triton', '?')}, transformers {meta.get('transformers', '?')}, revision "
        f"{meta.get('revision', '?')}, {meta.get('elapsed_s', 0):.0f}s in all"
        + (" (SMOKE run: tiny sizes)" if meta.get("smoke") else "")
        + "._",
        "",
    ]
    if data["kernel"]:
        out += [
            "## Decode attention alone (one query token)",
            "",
            "kvstream: `packed_attention` with the Triton reader over a 4/8 packed layer (blocks by the Triton "
            "kernel, sinks and the new token exactly, bf16 query); blocks: `triton_decode.decode_history` alone. "
            "SDPA: `torch.nn.functional.scaled_dot_product_attention` over an fp16 cache of the same tokens, with "
            "`enable_gqa` (gqa) and over KV heads repeated beforehand (heads). Median of CUDA-event times per call "
            "in a back-to-back stream. Speedup: the faster SDPA over kvstream (target at 32k: at least 2x). Errors: "
            "relative L2 error of kvstream's output against the fp16 SDPA output (quantization) and against kvstream's "
            "PyTorch reference reader over the same packed bytes (the kernel's own error; both in fp32).",
            "",
        ]
        rows = []
        for r in data["kernel"]:
            target = ""
            if r["tokens"] >= 32768 and "speedup" in r:
                target = ">= 2x: met" if r["speedup"] >= 2 else ">= 2x: **missed**"

            def us(key: str, r: dict[str, Any] = r) -> str:
                return fmt(r[key]["median_s"] * 1e6 if key in r else None, ".1f")

            rows.append(
                [
                    r["case"],
                    str(r["tokens"]),
                    us("kvstream"),
                    us("kvstream_blocks"),
                    us("sdpa_gqa"),
                    us("sdpa_heads"),
                    fmt(r.get("speedup"), ".2f", "x"),
                    f"{r['packed_bytes'] / 2**20:.1f} / {r['fp16_bytes'] / 2**20:.1f}",
                    fmt(r.get("rel_error_vs_fp16"), ".3f"),
                    fmt(r.get("rel_error_vs_reference"), ".1e"),
                    target,
                ]
            )
        headers = [
            "case",
            "N",
            "kvstream us",
            "blocks us",
            "sdpa gqa us",
            "sdpa heads us",
            "speedup",
            "packed / fp16 MiB",
            "err vs fp16",
            "err vs ref",
            "target",
        ]
        out += [table(headers, rows), ""]
    if data["e2e"]:
        model = meta.get("e2e_model", {})
        out += [
            "## End to end: chunked prefill and greedy decode",
            "",
            f"Random-weight Llama shaped like SmolLM2-135M ({model.get('num_hidden_layers', '?')} layers, hidden "
            f"{model.get('hidden_size', '?')}, {model.get('num_attention_heads', '?')}/"
            f"{model.get('num_key_value_heads', '?')} heads of {model.get('head_dim', '?')}), "
            f"{meta.get('dtype', '?')}, batch 1. Prefill: `kvstream.chunked_prefill` in chunks of the chunk column; "
            f"decode: median of {meta.get('decode_steps', '?')} greedy steps (after {DECODE_WARM_STEPS} untimed); "
            "medians over the reps (interleaved between variants). Peak: `torch.cuda.max_memory_allocated` during "
            "the run above what was allocated before it (the weights). Readers: the history readers that served the "
            "prefill chunks / decode steps as the cache recorded them (`memory_report()['readers']`; for a cache "
            "that records none, the one kvstream's attention picks). vs fp: ratio to full precision at that context.",
            "",
        ]
        rows = []
        for r in data["e2e"]:
            rows.append(
                [
                    str(r["context"]),
                    r["variant"],
                    str(r["chunk"]),
                    str(r["reps"]),
                    f"{r['prefill_s']:.3f}",
                    fmt(r.get("prefill_vs_fp"), ".2f", "x"),
                    f"{r['decode_step_s'] * 1e3:.2f}",
                    fmt(r.get("decode_vs_fp"), ".2f", "x"),
                    fmt(r["peak_above_weights_bytes"] / 2**20 if "peak_above_weights_bytes" in r else None, ".0f"),
                    fmt(r.get("peak_vs_fp"), ".2f", "x"),
                    fmt(r.get("bits_per_element"), ".2f"),
                    f"{r['readers'].get('prefill', '?')} / {r['readers'].get('decode', '?')}",
                ]
            )
        headers = [
            "context",
            "variant",
            "chunk",
            "reps",
            "prefill s",
            "vs fp",
            "decode ms/token",
            "vs fp",
            "peak MiB",
            "vs fp",
            "bits/elt",
            "readers (prefill / decode)",
        ]
        out += [table(headers, rows), ""]
    warned = [f"{r['context']} tokens, {r['variant']}: {w}" for r in data["e2e"] for w in r.get("warnings", [])]
    if warned:
        out += ["## Warnings during the end-to-end runs", ""] + [f"- {w}" for w in warned] + [""]
    for title, key, show in (
        ("Notes", "notes", lambda x: x),
        ("Skipped", "skipped", lambda x: f"{x['label']}: {x['reason']}"),
        ("Failures", "errors", lambda x: f"{x['label']}: {x['error']}"),
    ):
        if data[key]:
            out += [f"## {title}", ""] + [f"- {show(x)}" for x in data[key]] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def ints(text: str) -> list[int]:
    return [int(float(t.lower().rstrip("k")) * (1024 if t.lower().endswith("k") else 1)) for t in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else ./gpu-bench)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the code paths (CPU allowed)")
    parser.add_argument("--sections", default="kernel,e2e", help="which parts to run: kernel, e2e")
    parser.add_argument("--contexts", type=ints, default=None, help="end-to-end contexts (default 4k,8k,16k,32k)")
    parser.add_argument("--kernel-contexts", type=ints, default=None, help="decode-attention lengths (default: same)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 30, smoke 2)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed greedy steps (default 32, smoke 3)")
    parser.add_argument("--reps", type=int, default=None, help="end-to-end repetitions at most (default 3)")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk (grows where too slow, see below)")
    parser.add_argument("--max-chunk", type=int, default=4096)
    parser.add_argument("--max-prefill-s", type=float, default=None, help="grow the chunk above this (default 15)")
    parser.add_argument("--max-run-s", type=float, default=None, help="cap of one end-to-end run (default 60)")
    parser.add_argument("--presets", default="bits-2.5.yaml,bits-3.3.yaml", help="configs/ presets to add ('' none)")
    parser.add_argument("--kernel-reps", type=int, default=None, help="timed calls per point (default 200, smoke 2)")
    parser.add_argument("--kernel-warmup", type=int, default=None)
    parser.add_argument("--kernel-budget", type=float, default=None, help="seconds for the kernel part (default 90)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script (default 320)")
    parser.add_argument("--warm-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "contexts": [512, 1024] if smoke else [4096, 8192, 16384, 32768],
        "layers": 2 if smoke else 30,
        "decode_steps": 3 if smoke else 32,
        "reps": 2 if smoke else 3,
        "max_prefill_s": 15.0,
        "max_run_s": 60.0,
        "kernel_reps": 2 if smoke else 200,
        "kernel_warmup": 1 if smoke else 10,
        "kernel_budget": 90.0,
        "budget": 240.0 if smoke else 320.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kernel_contexts is None:
        args.kernel_contexts = args.contexts
    if smoke:
        args.warm_tokens = min(args.warm_tokens, 256)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu-bench")
    return args


def metadata(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "started": f"{dt.datetime.now():%Y-%m-%d %H:%M}",
        "smoke": args.smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "decode_steps": args.decode_steps,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    for name in ("triton", "transformers"):
        try:
            meta[name] = __import__(name).__version__
        except Exception as error:
            meta[name] = f"unavailable ({type(error).__name__})"
    try:
        from kvstream.results.provenance import code_revision, short_revision

        os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # read the checkout without touching its index
        meta["revision"] = short_revision(code_revision())
    except Exception:
        meta["revision"] = "unknown"
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except Exception as error:
        print(f"--device {args.device!r}: {error}", flush=True)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu --smoke (and TRITON_INTERPRET=1) to check the paths")
        return 2
    if device.type != "cuda" and not args.smoke:
        print("warning: not on CUDA; sizes are the full ones (add --smoke for tiny ones)", flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    budget = Budget(args.budget)
    rec = Recorder(args.out, metadata(args, device, dtype))
    log(
        f"kvstream GPU benchmark on {rec.data['meta']['device_name']} ({device}), torch {torch.__version__}, "
        f"triton {rec.data['meta']['triton']}, budget {args.budget:.0f}s, out {args.out}"
        + (" [SMOKE]" if args.smoke else "")
    )
    rec.save()
    if "kernel" in args.sections:
        kernel_section(args, device, rec, budget)
    if "e2e" in args.sections:
        rec.attempt("end to end", lambda: e2e_section(args, device, dtype, rec, budget), max(budget.left(), 1.0))
    rec.save()
    print()
    print(render(rec.data), flush=True)
    log(f"wrote {args.out / 'gpu_bench.md'} and {args.out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
