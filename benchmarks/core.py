"""Core benchmark: quality, memory and speed of the streaming cache against full precision and peers.

Everything is measured in one run on the same model, text and machine; the full-precision cache
is the baseline of every ratio. Timings interleave the strategies and keep the median of the
repetitions, since the machines are shared. Writes a Markdown report (``--out``).

    python benchmarks/core.py --out docs/benchmarks.md            # the full run (`make bench`)
    python benchmarks/core.py --tokens 512 --long 1024 --speed-contexts 512 --out /tmp/b.md   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

import kvstream
from kvstream import CompressionConfig, chunked_prefill, make_cache, streaming_perplexity
from kvstream.cache.base import PackedCache
from kvstream.data.texts import load_corpus
from kvstream.engine.prefill import forward_hidden
from kvstream.eval.allocator import AllocatorPeak
from kvstream.registry import PluginError
from kvstream.results.provenance import code_revision, short_revision

FP = CompressionConfig(cache="full")
TARGET_PPL = {4: 0.5, 3: 2.0, 2: 10.0}


@dataclass
class Strategy:
    label: str
    config: CompressionConfig
    nominal: float | None


def strategies(bits_list: list[int]) -> list[Strategy]:
    out = []
    for bits in bits_list:
        for rope in ("pre", "post"):
            cfg = CompressionConfig(key_bits_normal=bits, value_bits_normal=bits, key_rope=rope)
            out.append(Strategy(f"kvstream {rope}-RoPE", cfg, bits))
        out.append(
            Strategy(
                "kvstream + codebook",
                CompressionConfig(key_bits_normal=bits, value_bits_normal=bits, quantizer="codebook"),
                bits,
            )
        )
        out.append(
            Strategy(
                "KIVI-style (plugin)",
                CompressionConfig(cache="kivi", key_bits_normal=bits, value_bits_normal=bits, value_quant_groups=32),
                bits,
            )
        )
        if bits in (2, 4):
            out.append(
                Strategy(
                    "transformers QuantizedCache (quanto)",
                    CompressionConfig(cache="quanto", key_bits_normal=bits, value_bits_normal=bits),
                    bits,
                )
            )
    return out


def available(cfg: CompressionConfig, model) -> str | None:
    """None when the strategy can be built, else the reason (a plugin that is not installed)."""
    try:
        make_cache(model, cfg)
    except (PluginError, ValueError, ImportError) as exc:
        return str(exc).splitlines()[0]
    return None


def measure_quality(model, ids, strategies_: list[Strategy], chunk: int) -> list[dict]:
    rows = []
    base = streaming_perplexity(model, ids, make_cache(model, FP), chunk)
    rows.append(
        dict(
            strategy="full precision (fp32 DynamicCache)",
            rope="-",
            bits="32",
            ppl=base.perplexity,
            rel=0.0,
            bpe=32.0,
            note="",
        )
    )
    for s in strategies_:
        reason = available(s.config, model)
        if reason:
            rows.append(
                dict(
                    strategy=s.label,
                    rope=s.config.key_rope,
                    bits=f"{s.nominal:g}",
                    ppl=None,
                    rel=None,
                    bpe=None,
                    note=f"not run: {reason}",
                )
            )
            continue
        cache = make_cache(model, s.config)
        result = streaming_perplexity(model, ids, cache, chunk)
        report = cache.memory_report()
        rel = 100 * (result.perplexity / base.perplexity - 1)
        rows.append(
            dict(
                strategy=s.label,
                rope=s.config.key_rope if s.config.cache == "streaming" else "post",
                bits=f"{s.config.key_bits_normal}/{s.config.key_bits_sink_outlier}"
                if s.config.cache == "streaming"
                else f"{s.config.key_bits_normal}",
                ppl=result.perplexity,
                rel=rel,
                bpe=report["bits_per_element"],
                note="",
            )
        )
        print(f"  {s.label:40s} {rows[-1]['bits']:>5s} ppl {result.perplexity:.4f} ({rel:+.2f}%)", flush=True)
    return rows


def measure_memory(model, ids, configs: dict[str, CompressionConfig], chunk: int) -> list[dict]:
    rows = []
    for label, cfg in configs.items():
        reason = available(cfg, model)
        if reason:
            rows.append(dict(strategy=label, note=f"not run: {reason}"))
            continue
        cache = make_cache(model, cfg)
        with AllocatorPeak() as allocator:
            chunked_prefill(model, ids, cache, chunk)
        report = cache.memory_report()
        rows.append(
            dict(
                strategy=label,
                allocator=allocator.peak_bytes,
                peak=report["peak_stored_bytes"],
                stored=report["stored_bytes"],
                fp16=report["fp16_bytes"],
                bpe=report["bits_per_element"],
                ratio=report["peak_stored_bytes"] / report["fp16_bytes"],
                note="",
            )
        )
        print(
            f"  {label:40s} peak {report['peak_stored_bytes'] / 2**20:.1f} MiB, "
            f"allocator {allocator.peak_bytes / 2**20:.1f} MiB",
            flush=True,
        )
    return rows


END_KINDS = ("codes", "scales", "zero_points", "indices", "sinks", "full_precision_tail", "block_rope", "rotation")
"""Kinds of bytes shown apart in the end-of-generation table; the rest (position tables) under `other`."""

END_TARGETS = {"kvstream 4/8 + tail": 4.35, "preset bits-4.35": 4.35, "preset bits-3.3": 3.3, "preset bits-2.5": 2.5}


def end_configs() -> dict[str, CompressionConfig]:
    """The caches whose bits are measured after a generation: plain widths with and without the tail
    packing, the budget presets (which pack their tail), and 4/8 + tail and the 2.5- and 3.3-bit presets with their
    values packed per token (``tail_values: packed``, which ``bits-4.35`` already sets)."""
    tail = dict(tail_block=32, exact_storage="16bit")
    out = {}
    for bits in (4, 3, 2):
        out[f"kvstream {bits}/8"] = CompressionConfig(key_bits_normal=bits, value_bits_normal=bits)
        out[f"kvstream {bits}/8 + tail"] = CompressionConfig(key_bits_normal=bits, value_bits_normal=bits, **tail)
    for preset in BUDGET_PRESETS:
        out[f"preset {preset}"] = CompressionConfig.from_yaml(preset)
    out["kvstream 4/8 + tail, values packed per token"] = out["kvstream 4/8 + tail"].replace(tail_values="packed")
    for preset in LONG_PRESETS:
        out[f"preset {preset}, values packed per token"] = out[f"preset {preset}"].replace(tail_values="packed")
    return out


def measure_end_bits(model, ids, configs: dict[str, CompressionConfig], chunk: int, answer: int) -> list[dict]:
    """Effective bits and bytes by kind of each cache after prefilling ``ids`` and generating ``answer`` tokens."""
    rows = []
    for label, cfg in configs.items():
        cache = make_cache(model, cfg)
        chunked_prefill(model, ids, cache, chunk)
        token = ids[:, -1:]
        with torch.inference_mode():
            for _ in range(answer):
                hidden = forward_hidden(model, token, cache, cache.get_seq_length(), None)
                token = model.get_output_embeddings()(hidden[:, -1]).argmax(-1, keepdim=True)
        report = cache.memory_report()
        kinds = {k: 8 * v / report["elements"] for k, v in report["breakdown"].items()}
        rows.append(dict(strategy=label, bits=report["bits_per_element"], kinds=kinds))
        print(f"  {label:30s} {report['bits_per_element']:.3f} bits per element", flush=True)
    return rows


REFERENCE_PATH = "kvstream 4/8, reference path"
"""kvstream 4/8 with its fused kernels off (KVSTREAM_KERNELS=0): what the kernels buy, measured in the same run."""

SPEED_PRESETS = (
    "bits-2.5",
    "bits-3.3",
    "bits-4.35",
    "aggressive-2bit",
    "kvquant-like",
    "kivi-like",
    "conservative-8bit",
)
"""The quantizing presets of ``configs/`` timed beside kvstream 4/8 (``base`` is 4/8 itself and
``full-precision`` the 16-bit streaming path); above 8k only bits-2.5 and bits-3.3 run, to keep the
run within an hour on two cores."""

LONG_PRESETS = ("bits-2.5", "bits-3.3")
BUDGET_PRESETS = ("bits-4.35", *LONG_PRESETS)
"""The presets named for a bit budget, whose bits are measured after a generation."""


@dataclass
class Timing:
    prefill: float
    decode: float
    cache_bytes: int
    reader: str


def _decode_reader(cache) -> str:
    """What read the history in decode steps: kvstream's recorded reader, else the cache's own way."""
    if isinstance(cache, PackedCache):
        return cache.memory_report()["readers"].get("decode", "-")
    if isinstance(cache, DynamicCache) and not isinstance(cache, QuantizedCache):
        return "sdpa over the cache"
    return "restored copy"  # transformers' QuantizedCache hands attention a dequantized history


def time_once(model, ids, cfg: CompressionConfig, chunk: int, decode_tokens: int, kernels: bool = True) -> Timing:
    """Prefill seconds, decode seconds per token, bytes held after prefill and the decode reader, one fresh cache."""
    os.environ["KVSTREAM_KERNELS"] = "1" if kernels else "0"
    cache = make_cache(model, cfg)
    start = time.perf_counter()
    chunked_prefill(model, ids, cache, chunk)
    prefill = time.perf_counter() - start
    held = cache.memory_report()["stored_bytes"]
    token = ids[:, -1:]
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(decode_tokens):
            hidden = forward_hidden(model, token, cache, cache.get_seq_length(), None)
            token = model.get_output_embeddings()(hidden[:, -1]).argmax(-1, keepdim=True)
    return Timing(prefill, (time.perf_counter() - start) / decode_tokens, held, _decode_reader(cache))


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter, less the input embedding table when the
    output head is a matrix of its own (a step looks up one row of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    return total


def measure_speed(model, ids, configs: dict[str, CompressionConfig], chunk: int, decode_tokens: int, reps: int):
    """Prefill and decode times of every strategy at the context ``ids`` holds, interleaved over ``reps``, each
    strategy warmed up first on two chunks (kernel loading and first calls are not timed)."""
    usable = {k: v for k, v in configs.items() if available(v, model) is None}
    for label, cfg in usable.items():
        time_once(model, ids[:, : 2 * chunk], cfg, chunk, 2, kernels=label != REFERENCE_PATH)
    times: dict[str, list[Timing]] = {k: [] for k in usable}
    for rep in range(reps):
        for label, cfg in usable.items():  # interleaved, so load drifts hit every strategy alike
            times[label].append(time_once(model, ids, cfg, chunk, decode_tokens, kernels=label != REFERENCE_PATH))
            print(
                f"  {ids.shape[1]} tokens, rep {rep} {label:30s} prefill {times[label][-1].prefill:.2f}s "
                f"decode {times[label][-1].decode * 1e3:.1f}ms ({times[label][-1].reader})",
                flush=True,
            )
    os.environ["KVSTREAM_KERNELS"] = "1"
    weights = decode_weight_bytes(model)
    fp = times["full precision"]
    fp_prefill = statistics.median(t.prefill for t in fp)
    fp_decode = statistics.median(t.decode for t in fp)
    fp_read = weights + fp[-1].cache_bytes
    rows = []
    for label, samples in times.items():
        prefill = statistics.median(t.prefill for t in samples)
        decode = statistics.median(t.decode for t in samples)
        rows.append(
            dict(
                context=ids.shape[1],
                reps=reps,
                strategy=label,
                prefill=prefill,
                decode=decode,
                prefill_ratio=prefill / fp_prefill,
                decode_ratio=decode / fp_decode,
                bandwidth_ratio=(weights + samples[-1].cache_bytes) / fp_read,
                reader=samples[-1].reader,
            )
        )
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4096, help="perplexity text length")
    parser.add_argument("--long", type=int, default=8192, help="prefill length of the memory measurement")
    parser.add_argument("--speed-contexts", default="2048,4096,8192,16384", help="contexts of the speed section")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the speed runs up to 8192 tokens")
    parser.add_argument("--long-reps", type=int, default=1, help="repetitions of the speed runs above 8192 tokens")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--end-prompt", type=int, default=2000, help="prompt length of the end-of-generation bits")
    parser.add_argument("--answer", type=int, default=32, help="greedy tokens generated after that prompt")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--sections",
        default="quality,memory,bits,speed",
        help="which sections to measure; the others are kept as they stand in --out",
    )
    args = parser.parse_args()
    args.revision = short_revision(code_revision())  # the code this process imports, before anything runs
    torch.set_num_threads(args.threads)
    bits_list = [int(b) for b in args.bits.split(",")]

    model, tokenizer = kvstream.load_model(args.model)
    text = load_corpus("paul_graham")
    all_ids = tokenizer(text, return_tensors="pt").input_ids
    speed_contexts = [int(n) for n in args.speed_contexts.split(",")]
    need = max(args.tokens, args.long, *speed_contexts)
    if all_ids.shape[1] < need:
        sys.exit(f"benchmarks: the text has {all_ids.shape[1]} tokens, {need} needed")

    sections = [name.strip() for name in args.sections.split(",")]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"benchmarks: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    rendered = {}
    if "quality" in sections:
        print("quality", flush=True)
        quality = measure_quality(model, all_ids[:, : args.tokens], strategies(bits_list), args.chunk)
        rendered["quality"] = render_quality(args, quality)
    if "memory" in sections:
        print("memory", flush=True)
        mem_configs = {"full precision": FP}
        for bits in bits_list:
            mem_configs[f"kvstream {bits}/8"] = CompressionConfig(key_bits_normal=bits, value_bits_normal=bits)
        mem_configs["quanto 4-bit"] = CompressionConfig(cache="quanto", key_bits_normal=4, value_bits_normal=4)
        mem_configs["KIVI-style 4-bit"] = CompressionConfig(
            cache="kivi", key_bits_normal=4, value_bits_normal=4, value_quant_groups=32
        )
        memory = measure_memory(model, all_ids[:, : args.long], mem_configs, args.chunk)
        rendered["memory"] = render_memory(args, memory)
    if "bits" in sections:
        print("bits", flush=True)
        ids = all_ids[:, : args.end_prompt]
        rendered["bits"] = render_end_bits(args, measure_end_bits(model, ids, end_configs(), args.chunk, args.answer))
    if "speed" in sections:
        print("speed", flush=True)
        speed_configs = {
            "full precision": FP,
            "kvstream 4/8": CompressionConfig(key_bits_normal=4, value_bits_normal=4),
            "quanto 4-bit": CompressionConfig(cache="quanto", key_bits_normal=4, value_bits_normal=4),
        }
        speed = []
        for context in speed_contexts:
            reps = args.reps if context <= 8192 else args.long_reps
            configs = dict(speed_configs)
            for preset in SPEED_PRESETS if context <= 8192 else LONG_PRESETS:
                configs[f"preset {preset}"] = CompressionConfig.from_yaml(preset)
            if context <= 4096:  # the reference path is slow: shown where it is affordable
                configs[REFERENCE_PATH] = speed_configs["kvstream 4/8"]
            speed += measure_speed(model, all_ids[:, :context], configs, args.chunk, args.decode_tokens, reps)
        rendered["speed"] = render_speed(args, speed)
    write_report(args.out, rendered)


SECTIONS = {
    "quality": "## Perplexity",
    "memory": "## Peak cache",
    "bits": "## Effective bits after a generation",
    "speed": "## Speed",
}


def provenance(args) -> str:
    return (
        f"_Measured {dt.datetime.now():%Y-%m-%d %H:%M} at revision `{args.revision}` on {platform.machine()} with "
        f"{args.threads} CPU threads, torch {torch.__version__}, model `{args.model}` (fp32 weights), "
        f"Paul Graham essays, chunk size {args.chunk}; the full-precision cache in the same run._"
    )


def write_report(out: Path, rendered: dict[str, list[str]]) -> None:
    """Write the measured sections, keeping the others as they stand in ``out``."""
    kept: dict[str, str] = {}
    if out.exists():
        for chunk in out.read_text().split("\n## ")[1:]:
            for name, header in SECTIONS.items():
                if ("## " + chunk).startswith(header):
                    kept[name] = "## " + chunk.rstrip("\n")
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python benchmarks/core.py`). Each section says the run it comes from; "
        "within a section every figure, the full-precision baseline included, comes from that one run.",
        "",
        "Quality per bit (every strategy alone and combined, the budget presets, both bundled models, two "
        "texts, KL divergence and top-1 agreement) is in [benchmarks-quality.md](benchmarks-quality.md) "
        "(`benchmarks/quality.py`, the second step of `make bench`). Retrieval (RULER-style needles, "
        "variable tracking, frequent words) against full precision and the peers on the same samples, in "
        "accuracy and answer log-likelihood, is in [benchmarks-retrieval.md]"
        "(benchmarks-retrieval.md) (`benchmarks/retrieval.py`, the third step; resumable, it takes hours on "
        "two CPU cores).",
        "",
    ]
    for name in SECTIONS:
        if name in rendered:
            lines += ["\n".join(rendered[name]).rstrip("\n"), ""]
        elif name in kept:
            lines += [kept[name], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def render_quality(args, quality) -> list[str]:
    base_ppl = quality[0]["ppl"]
    out = [
        f"## Perplexity over {args.tokens} tokens (streamed chunk by chunk)",
        "",
        provenance(args),
        "",
        f"Full-precision perplexity: {base_ppl:.4f}. Bits are normal/high (sinks and outliers) for kvstream; "
        "effective bits count every byte held (codes, scales, zero-points, indices, sinks, full-precision tail).",
        "",
    ]
    rows = []
    for r in quality:
        target = ""
        if r["rel"] is not None and r["strategy"].startswith("kvstream") and r["bits"][0].isdigit():
            nominal = int(r["bits"].split("/")[0])
            if nominal in TARGET_PPL:
                target = f"<= +{TARGET_PPL[nominal]}%: {verdict(r['rel'] <= TARGET_PPL[nominal])}"
                if r["bpe"] is not None:
                    target += f"; bits <= {nominal + 0.5}: {verdict(r['bpe'] <= nominal + 0.5)}"
        rows.append(
            [
                r["strategy"],
                r["rope"],
                r["bits"],
                fmt(r["ppl"], ".4f"),
                fmt(r["rel"], "+.2f"),
                fmt(r["bpe"], ".2f"),
                target or r["note"],
            ]
        )
    return out + [table(["strategy", "keys", "bits", "perplexity", "increase %", "effective bits", "target"], rows)]


def render_memory(args, memory) -> list[str]:
    fp_allocator = next((r["allocator"] for r in memory if r["strategy"] == "full precision"), None)
    out = [
        f"## Peak cache bytes during a {args.long}-token prefill",
        "",
        provenance(args),
        "",
        "Cache peak: the most bytes the cache held at once, attention's working memory included (the tiles it "
        "dequantizes, scores, partial outputs), against an fp16 cache of the same tokens (target at 4 bits: at most "
        "0.32x). Allocator peak: the most memory the whole prefill had allocated at once (weights excluded, "
        "activations and every transient included), from torch.profiler's allocation events, and its ratio to the "
        "full-precision run's.",
        "",
    ]
    rows = []
    for r in memory:
        if r.get("note"):
            rows.append([r["strategy"], "-", "-", "-", "-", "-", r["note"]])
            continue
        target = f"<= 0.32x: {verdict(r['ratio'] <= 0.32)}" if r["strategy"] == "kvstream 4/8" else ""
        rows.append(
            [
                r["strategy"],
                f"{r['peak'] / 2**20:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['bpe']:.2f}",
                f"{r['allocator'] / 2**20:.1f}",
                f"{r['allocator'] / fp_allocator:.3f}" if fp_allocator else "-",
                target,
            ]
        )
    headers = ["strategy", "cache peak MiB", "/ fp16", "effective bits", "allocator peak MiB", "/ fp run", "target"]
    return out + [table(headers, rows)]


def render_end_bits(args, rows) -> list[str]:
    out = [
        "## Effective bits after a generation",
        "",
        provenance(args),
        "",
        f"A {args.end_prompt}-token prompt (not a multiple of the chunk) prefilled in chunks of {args.chunk}, then "
        f"{args.answer} greedy tokens; effective bits per element of the cache as it stands at the end, and where "
        "they go (bits per element by kind of bytes held; *tail* is what stays exact). *+ tail* packs the tail 32 "
        "tokens at a time and holds the rest at 16 bits (`tail_block: 32`, `exact_storage: 16bit`), as the "
        "budget presets do; *values packed per token* adds `tail_values: packed`, so that only keys stay exact.",
        "",
    ]
    headers = ["strategy", "bits", *[k.replace("full_precision_tail", "tail") for k in END_KINDS], "other", "target"]
    table_rows = []
    for r in rows:
        kinds = r["kinds"]
        other = sum(v for k, v in kinds.items() if k not in END_KINDS)
        target = ""
        base = r["strategy"].split(",")[0]  # a variant of a row with a target is held to it too
        if base in END_TARGETS:
            limit = END_TARGETS[base]
            target = f"<= {limit}: {verdict(r['bits'] <= limit)}"
        cells = [f"{kinds.get(k, 0.0):.3f}" for k in END_KINDS]
        table_rows.append([r["strategy"], f"{r['bits']:.3f}", *cells, f"{other:.3f}", target])
    return out + [table(headers, table_rows)]


def speed_target(r: dict, entries: dict[str, dict]) -> str:
    """The targets of kvstream 4/8 and the budget presets: prefill <= 1.05x at every length; decode <= 0.70x at
    8k and <= 0.55x at 16k, each preset within 1.10x of 4/8's decode; and 4/8 faster than quanto on both times."""
    label = r["strategy"]
    if label != "kvstream 4/8" and label.removeprefix("preset ") not in LONG_PRESETS:
        return ""
    parts = [f"prefill <= 1.05x: {verdict(r['prefill_ratio'] <= 1.05)}"]
    limit = {8192: 0.70, 16384: 0.55}.get(r["context"])
    if limit is not None:
        parts.append(f"decode <= {limit:.2f}x: {verdict(r['decode_ratio'] <= limit)}")
    base = entries.get("kvstream 4/8")
    if label != "kvstream 4/8" and base is not None:
        parts.append(f"decode within 1.10x of 4/8: {verdict(r['decode'] <= 1.10 * base['decode'])}")
    quanto = entries.get("quanto 4-bit")
    if label == "kvstream 4/8" and quanto is not None:
        beats = r["prefill"] < quanto["prefill"] and r["decode"] < quanto["decode"]
        parts.append(f"beats quanto: {verdict(beats)}")
    return "; ".join(parts)


def render_speed(args, speed) -> list[str]:
    out = [
        "## Speed from 2k to 16k tokens of context",
        "",
        provenance(args),
        "",
        f"Prefill in chunks of {args.chunk}, then {args.decode_tokens} greedy decode steps; every strategy warmed "
        "up first on two chunks, then the median of the interleaved repetitions (the reps column). The decode "
        "reader column names what read the packed history in the decode steps (`memory_report()['readers']`): "
        "the fused CPU kernel, or the PyTorch reference tiles; prefill reads tiles through torch's CPU flash "
        f"kernel. '{REFERENCE_PATH}' is kvstream 4/8 with the kernels off, up to 4k. The bandwidth limit is the "
        "ratio of the bytes one decode step must read (the weights it touches plus the cache as held after "
        "prefill) to full precision's: the decode ratio a reader that only streams its bytes would reach.",
        "",
    ]
    rows = []
    by_context: dict[int, dict[str, dict]] = {}
    for r in speed:
        by_context.setdefault(r["context"], {})[r["strategy"]] = r
    for context, entries in by_context.items():
        for r in entries.values():
            rows.append(
                [
                    str(context),
                    r["strategy"],
                    r["reader"],
                    str(r["reps"]),
                    f"{r['prefill']:.2f}",
                    f"{r['prefill_ratio']:.2f}x",
                    f"{r['decode'] * 1e3:.1f}",
                    f"{r['decode_ratio']:.2f}x",
                    f"{r['bandwidth_ratio']:.2f}x",
                    speed_target(r, entries),
                ]
            )
    headers = [
        "context",
        "strategy",
        "decode reader",
        "reps",
        "prefill s",
        "vs fp",
        "decode ms/token",
        "vs fp",
        "bandwidth limit",
        "target",
    ]
    return out + [table(headers, rows)]


if __name__ == "__main__":
    main()
