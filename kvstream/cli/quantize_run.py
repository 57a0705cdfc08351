"""``kvstream quantize-run [PROMPT]``: stream one prompt into the quantized cache and generate from it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.columns import Columns
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kvstream.cli.checks import check_config_for_model, check_positions, check_strategies
from kvstream.cli.config_fields import build_config, show_config, with_config_fields
from kvstream.cli.console import ProgressBars, human_bytes, out
from kvstream.cli.errors import CliError, handle_errors
from kvstream.cli.options import BitsOpt, ConfigOpt, ModelOptions, with_option_groups
from kvstream.config import CompressionConfig

EPILOG = (
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream quantize-run --compare-fp[/cyan]   (the demonstration: a passkey prompt of 4 chunks)\n"
    '  [cyan]kvstream quantize-run "What is 2+2?"[/cyan]\n'
    "  [cyan]kvstream quantize-run --file book.txt --bits 2/8 -n 128[/cyan]\n"
    "  [cyan]cat notes.md | kvstream quantize-run - --compare-fp[/cyan]\n"
    '  [cyan]kvstream quantize-run "Hello" --raw --chunk-size 64 --key-rope post[/cyan]\n'
    "\n"
    "The prompt is cut into --chunk-size chunks, each quantized into the cache as it arrives; "
    "generation then reads and extends the same cache. Without a prompt, a built-in passkey prompt "
    "of four chunks shows the compression and whether the answer survives it."
)

DEMO_CHUNKS = 4
"""The demonstration prompt spans this many chunks, so most of it is packed before generation starts."""


@dataclass
class RunStats:
    """One prompt run through one cache: the generated text and what it cost."""

    label: str
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    memory: dict[str, Any]
    outliers: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def read_prompt(prompt: str | None, file: Path | None) -> str | None:
    """The prompt from the argument, ``-`` (stdin) or ``--file``, at most one source; None for the demonstration."""
    if prompt is not None and file is not None:
        raise CliError("give the prompt either as an argument or with --file, not both")
    if file is not None:
        if str(file) == "-":
            text = sys.stdin.read()
        elif not file.is_file():
            raise CliError(f"--file: {file} does not exist or is not a file (check the path)")
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
    elif prompt == "-":
        text = sys.stdin.read()
    elif prompt is None:
        return None
    else:
        text = prompt
    if not text.strip():
        raise CliError("empty prompt: give some text as PROMPT, --file FILE or on stdin")
    return text


def demo_prompt(tokenizer: Any, chunk_size: int, context: int, max_new_tokens: int) -> tuple[list[int], str]:
    """Token ids of a passkey prompt `DEMO_CHUNKS` chunks long (shorter if the context asks), and its pass key."""
    from kvstream.registry import registry
    from kvstream.tasks.base import TaskOptions
    from kvstream.tasks.synthetic import LENGTH_TOLERANCE

    # the task meets a length within a tolerance: aim just past the last chunk, and short of the context's end
    length = int((1 + LENGTH_TOLERANCE) * DEMO_CHUNKS * chunk_size)
    if context:
        length = min(length, int((1 - LENGTH_TOLERANCE) * (context - max_new_tokens)))
    [sample] = registry("tasks").get("passkey").samples(TaskOptions(samples=1, length=length), tokenizer)
    return list(sample.meta["prompt_ids"]), sample.answers[0]


def encode_prompt(tokenizer: Any, prompt: str, raw: bool) -> list[int]:
    """Token ids of ``prompt``: the chat template's user message (generation prompt added) unless ``raw``."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            found.add(source)
        elif isinstance(source, (list, tuple)):
            found.update(int(i) for i in source)
    return found


def check_length(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    from kvstream.engine import model_geometry

    context = model_geometry(model).max_positions
    if not context:
        return
    if prompt_tokens > context:
        raise CliError(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context} "
            "(max_position_embeddings): shorten the prompt or use a model with a longer context"
        )
    if prompt_tokens + max_new_tokens > context:
        raise CliError(
            f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens: lower --max-new-tokens to {context - prompt_tokens} or shorten the prompt"
        )


def run_once(
    label: str,
    model: Any,
    tokenizer: Any,
    ids: list[int],
    config: CompressionConfig,
    max_new_tokens: int,
    bars: ProgressBars,
) -> RunStats:
    """Chunked prefill of ``ids`` into the cache ``config`` names, then greedy decoding, timed after a
    `kvstream.eval.runner.warm_up` of the same cache, so the speed shown excludes its one-time costs."""
    import torch

    from kvstream import engine
    from kvstream.eval.runner import warm_up

    warm_up(model, tokenizer, config)
    cache = engine.make_cache(model, config)
    input_ids = torch.tensor([ids], dtype=torch.long)
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def prefill_done() -> None:
        marks["prefill"] = time.perf_counter()
        bars.remove(f"{label}: prefill")
        bars.update(f"{label}: decoding", 0, None)

    decode_label = f"{label}: decoding"
    generated = engine.greedy_generate(
        model,
        input_ids,
        cache,
        max_new_tokens,
        config.chunk_size,
        eos_token_ids=eos_ids(model, tokenizer),
        progress=bars.counter(f"{label}: prefill"),
        on_prefill_done=prefill_done,
    )
    end = time.perf_counter()
    bars.remove(decode_label)
    prefill_end = marks.get("prefill", end)
    new_ids = generated[0].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    snapshot = getattr(cache, "outlier_snapshot", None)
    return RunStats(
        label=label,
        text=text,
        prompt_tokens=len(ids),
        new_tokens=len(new_ids),
        prefill_seconds=prefill_end - start,
        decode_seconds=end - prefill_end,
        memory=dict(cache.memory_report()),
        outliers=snapshot() if callable(snapshot) else {},
    )


def outlier_table(outliers: dict[int, dict[str, float]], rows_per_block: int = 10) -> Table:
    """Per-layer outlier shares, folded into side-by-side blocks of ``rows_per_block`` layers."""
    layers = sorted(outliers)
    blocks = max(1, -(-len(layers) // rows_per_block))
    table = Table(title="Outliers per layer (% kept at high precision)", box=None)
    for _ in range(blocks):
        table.add_column("layer", justify="right", style="dim")
        table.add_column("key %", justify="right")
        table.add_column("value %", justify="right")
    height = -(-len(layers) // blocks) if layers else 0
    for r in range(height):
        cells: list[str] = []
        for b in range(blocks):
            i = b * height + r
            if i < len(layers):
                stats = outliers[layers[i]]
                cells += [
                    str(layers[i]),
                    f"{100 * stats.get('key_outlier_ratio', 0.0):.1f}",
                    f"{100 * stats.get('value_outlier_ratio', 0.0):.1f}",
                ]
            else:
                cells += ["", "", ""]
        table.add_row(*cells)
    return table


def figures_table(runs: list[RunStats]) -> Table:
    table = Table(title="Cache and speed", header_style="bold")
    table.add_column("")
    for run in runs:
        table.add_column(run.label, justify="right")

    def row(name: str, fn: Any) -> None:
        table.add_row(name, *[fn(r) for r in runs])

    row("prompt / new tokens", lambda r: f"{r.prompt_tokens} / {r.new_tokens}")
    row("effective bits per element", lambda r: f"{r.memory.get('bits_per_element', float('nan')):.2f}")
    row("cache bytes", lambda r: human_bytes(r.memory.get("stored_bytes")))
    row("same cache in fp16", lambda r: human_bytes(r.memory.get("fp16_bytes")))
    row("ratio to fp16", lambda r: f"{r.memory.get('ratio_to_fp16', float('nan')):.3f}")
    row("peak cache bytes", lambda r: human_bytes(r.memory.get("peak_stored_bytes")))
    if any(len(r.memory.get("by_device") or {}) > 1 for r in runs):
        row(
            "cache bytes per device",
            lambda r: ", ".join(f"{d} {human_bytes(b)}" for d, b in r.memory["by_device"].items()),
        )
    row("prefill tokens/s", lambda r: f"{r.prefill_tps:,.1f}")
    row("decode tokens/s", lambda r: "n/a" if r.decode_tps != r.decode_tps else f"{r.decode_tps:,.1f}")
    return table


@handle_errors
@with_option_groups
@with_config_fields
def quantize_run_command(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="The prompt text, or - to read it from stdin \\[default: a built-in passkey prompt of 4 chunks].",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the prompt from this text file (- for stdin).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")] = 64,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as is, without the chat template.")] = False,
    compare_fp: Annotated[
        bool, typer.Option("--compare-fp", help="Also run the full-precision cache and show both side by side.")
    ] = False,
    *,
    model: ModelOptions,
    config: ConfigOpt = None,
    bits: BitsOpt = None,
    field_values: dict[str, str] | None = None,
) -> None:
    """Stream a prompt through chunked prefill into the quantized cache, then generate greedily."""
    effective = build_config(config, bits, field_values)
    model.check()
    text = read_prompt(prompt, file)
    console = out()
    show_config(effective, config, console=console)
    check_strategies(effective)
    check_positions(model.model, max_new_tokens, "--max-new-tokens")
    bundle_model, tokenizer = model.load()
    check_config_for_model(effective, bundle_model)
    if text is None:
        from kvstream.engine import model_geometry

        context = model_geometry(bundle_model).max_positions
        ids, answer = demo_prompt(tokenizer, effective.chunk_size, context, max_new_tokens)
        console.print(
            Text(
                f"demonstration: a {len(ids)}-token passkey prompt ({len(ids) // effective.chunk_size} full chunks of "
                f"{effective.chunk_size}) hiding the pass key {answer}; give a PROMPT or --file FILE to use your own",
                style="dim",
            ),
            soft_wrap=True,
        )
    else:
        ids = encode_prompt(tokenizer, text, raw)
    if not ids:
        raise CliError("empty prompt: it encodes to no tokens; give some text")
    check_length(bundle_model, len(ids), max_new_tokens)

    quant_label = "full precision" if effective.cache == "full" else f"{effective.cache} cache"
    runs: list[RunStats] = []
    with ProgressBars() as bars:
        runs.append(run_once(quant_label, bundle_model, tokenizer, ids, effective, max_new_tokens, bars))
        if compare_fp and effective.cache != "full":
            fp_config = effective.replace(cache="full")
            runs.append(run_once("full precision", bundle_model, tokenizer, ids, fp_config, max_new_tokens, bars))

    panels = [Panel(Text(r.text or "(nothing generated)"), title=r.label, expand=True) for r in runs]
    console.print(Columns(panels, equal=True, expand=True) if len(panels) > 1 else panels[0])
    if runs[0].outliers:
        console.print(outlier_table(runs[0].outliers))
    console.print(figures_table(runs))
    if effective.cache != "full" and not _packed(runs[0].memory):
        console.print(
            Text(
                f"note: the {len(ids)}-token prompt and answer fit within one chunk ({effective.chunk_size} tokens), "
                "so nothing was packed yet and everything sits in the full-precision tail; "
                f"try --chunk-size {max(1, len(ids) // 4)} to see quantization on a short prompt",
                style="yellow",
            ),
            soft_wrap=True,
        )


def _packed(memory: dict[str, Any]) -> bool:
    """Whether the cache holds any packed (quantized) block, from its memory breakdown."""
    breakdown = memory.get("breakdown") or {}
    return any(kind != "full_precision_tail" and kind != "positions" and n for kind, n in breakdown.items())
