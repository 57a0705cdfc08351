"""NVIDIA kvpress behind a JSON-lines pipe, run in kvpress's own virtual environment.

kvpress pins an older transformers than kvstream does, so it runs in its own environment
(``make peers`` builds ``.venv-kvpress``) and kvstream talks to this worker through stdin and
stdout, one JSON object per line (``python -m kvstream.peers.kvpress_worker``). Beyond the
standard library this module imports only torch, transformers and kvpress, and those only when
the worker starts; the protocol loop (:func:`serve`) needs none of them, so it is tested with fake
handlers.

Protocol:

- the worker's first line is ``{"ready": true, "versions": {...}}``, or ``{"ready": false,
  "error": "..."}`` followed by exit code 3 when its libraries do not import;
- each request is ``{"id": N, "op": NAME, "args": {...}}`` and gets exactly one reply, ``{"id": N,
  "ok": true, "result": {...}}`` or ``{"id": N, "ok": false, "error": "one line"}``; a failing
  request does not end the worker;
- ``{"op": "quit"}`` (or the end of stdin) ends it with exit code 0.

Anything a library prints goes to stderr: the protocol's stdout is a duplicate taken before it
could be written to.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

READY_FAILED = 3
"""Exit code of a worker whose libraries did not import (after its one ``ready: false`` line)."""

PRESSES = {
    "snapkv": "SnapKVPress",
    "expected-attention": "ExpectedAttentionPress",
    "streaming-llm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
}
"""Press names this worker accepts -> kvpress class; ``none`` runs without a press."""

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def protocol_stdout() -> TextIO:
    """A line-buffered duplicate of stdout for the protocol; stdout itself (fd 1) now writes to stderr."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def serve(handlers: dict[str, Handler], hello: Callable[[], dict[str, Any]], stdin: TextIO, stdout: TextIO) -> int:
    """Answer requests from ``stdin`` on ``stdout`` until ``quit`` or end of input; the exit code.

    ``hello`` runs first and gives the ready line's ``versions``; if it raises, the error is the
    ready line's and the loop does not start.
    """

    def send(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    try:
        versions = hello()
    except Exception as error:  # an import error of any kind: say it once, in the protocol
        send({"ready": False, "error": _one_line(error)})
        return READY_FAILED
    send({"ready": True, "versions": versions, "pid": os.getpid()})
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request must be a JSON object")
        except ValueError as error:
            send({"id": None, "ok": False, "error": f"unreadable request: {_one_line(error)}"})
            continue
        op, rid = request.get("op"), request.get("id")
        if op == "quit":
            send({"id": rid, "ok": True, "result": {}})
            return 0
        handler = handlers.get(op)
        if handler is None:
            send({"id": rid, "ok": False, "error": f"unknown op {op!r} (known: quit, {', '.join(sorted(handlers))})"})
            continue
        try:
            result = handler(request.get("args") or {})
        except Exception as error:  # report any failure of one request and keep serving
            traceback.print_exc(file=sys.stderr)
            send({"id": rid, "ok": False, "error": _one_line(error)})
            continue
        send({"id": rid, "ok": True, "result": result})
    return 0


# --------------------------------------------------------------------------- kvpress


class KvpressWorker:
    """One model loaded once; each ``run`` prefills with a press, scores the answer and generates greedily."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_path: str | None = None

    def hello(self) -> dict[str, Any]:
        from importlib.metadata import version

        import kvpress  # noqa: F401  (imports torch and transformers too; fails here if anything is missing)
        import torch
        import transformers

        return {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": version("kvpress"),
            "executable": sys.executable,
        }

    def load(self, args: dict[str, Any]) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        threads = int(args.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        path = str(args["model"])
        dtype = getattr(torch, str(args.get("dtype") or "float32"))
        if self.model_path != path or self.model.dtype != dtype:
            start = time.perf_counter()
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model_path = path
            seconds = time.perf_counter() - start
        else:
            seconds = 0.0
        config = self.model.config
        return {
            "model": type(self.model).__name__,
            "layers": int(config.num_hidden_layers),
            "kv_heads": int(config.num_key_value_heads),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "load_seconds": seconds,
        }

    def make_press(self, name: str, compression_ratio: float, options: dict[str, Any]) -> Any:
        if name == "none":
            return None
        import kvpress

        if name not in PRESSES:
            raise ValueError(f"unknown press {name!r} (known: none, {', '.join(sorted(PRESSES))})")
        return getattr(kvpress, PRESSES[name])(compression_ratio=compression_ratio, **options)

    def run(self, args: dict[str, Any]) -> dict[str, Any]:
        import torch
        from transformers import DynamicCache

        if self.model is None:
            raise RuntimeError("no model loaded (send 'load' first)")
        prompt = [int(t) for t in args["prompt_ids"]]
        answer = [int(t) for t in args["answer_ids"]]
        max_new = int(args["max_new_tokens"])
        question = max(1, int(args.get("question_tokens") or 1))
        if len(prompt) <= question:
            raise ValueError(f"the prompt needs more than {question} tokens (the question fed after compression)")
        ratio = float(args.get("compression_ratio") or 0.0)
        press = self.make_press(str(args["press"]), ratio, args.get("options") or {})
        model, device = self.model, self.model.device
        context, asked = prompt[:-question], prompt[-question:]
        n = len(prompt)

        def tensor(ids: list[int]) -> torch.Tensor:
            return torch.tensor([ids], dtype=torch.long, device=device)

        def positions(start: int, count: int) -> torch.Tensor:
            return torch.arange(start, start + count, device=device).unsqueeze(0)

        cache = DynamicCache()
        with torch.inference_mode():
            start = time.perf_counter()
            # As kvpress's own pipeline does: the context through the model body with the press
            # hooked on every attention layer, then the question through the compressed cache.
            if press is None:
                model.model(input_ids=tensor(context), past_key_values=cache)
            else:
                with press(model):
                    model.model(input_ids=tensor(context), past_key_values=cache)
            kept_context = [layer.keys.shape[-2] for layer in cache.layers]
            out = model(
                input_ids=tensor(asked), past_key_values=cache, position_ids=positions(len(context), question),
                logits_to_keep=1,
            )  # fmt: skip
            first = out.logits[0, -1].float()
            prompt_seconds = time.perf_counter() - start

            lengths = [layer.keys.shape[-2] for layer in cache.layers]
            logprob = float(torch.log_softmax(first, dim=-1)[answer[0]])
            if len(answer) > 1:
                forced = positions(n, len(answer) - 1)
                out = model(input_ids=tensor(answer[:-1]), past_key_values=cache, position_ids=forced)
                rows = torch.log_softmax(out.logits[0].float(), dim=-1)
                logprob += float(rows.gather(-1, torch.tensor(answer[1:], device=device).unsqueeze(-1)).sum())
            for layer, length in zip(cache.layers, lengths, strict=True):
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]

            eos = model.generation_config.eos_token_id
            stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
            start = time.perf_counter()
            generated = [int(first.argmax())]
            while len(generated) < max_new and generated[-1] not in stops:
                out = model(
                    input_ids=tensor(generated[-1:]), past_key_values=cache,
                    position_ids=positions(n + len(generated) - 1, 1),
                )  # fmt: skip
                generated.append(int(out.logits[0, -1].argmax()))
            decode_seconds = time.perf_counter() - start

        held = [layer.keys.shape[-2] for layer in cache.layers]
        held_elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
        held_bytes = sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers
        )
        return {
            "text": self.tokenizer.decode(generated, skip_special_tokens=True),
            "generated_ids": generated,
            "answer_logprob": logprob,
            "answer_tokens": len(answer),
            "prompt_seconds": prompt_seconds,
            "decode_seconds": decode_seconds,
            "tokens_seen": n + len(generated) - 1,
            "context_tokens": len(context),
            "kept_context_tokens": kept_context,
            "held_tokens": held,
            "held_elements": held_elements,
            "held_bytes": held_bytes,
        }


def main() -> int:
    out = protocol_stdout()
    worker = KvpressWorker()
    return serve({"load": worker.load, "run": worker.run}, worker.hello, sys.stdin, out)


if __name__ == "__main__":
    sys.exit(main())
