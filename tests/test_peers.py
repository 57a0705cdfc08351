"""Peers (kvstream.peers): the registry, the JSON-lines protocol with a fake worker, and the real adapters.

The adapters' own tests skip with the peer's reason when it is not installed here (`make peers`
installs llama-cpp-python into .venv and kvpress into .venv-kvpress).
"""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap

import pytest

from kvstream.peers import (
    CACHE_PEERS,
    CachePeer,
    Peer,
    PeerError,
    PeerResult,
    PeerUnavailable,
    adapter_names,
    make_peer,
    peer_names,
)
from kvstream.peers.base import kv_bits_per_element, log_softmax_at
from kvstream.peers.jsonlines import WorkerProcess
from kvstream.peers.kvpress_worker import READY_FAILED, serve
from kvstream.peers.llamacpp import FORMAT_BITS, LlamaCppPeer
from kvstream.peers.presses import KvpressPeer, close_workers, keep_for_bits

# --------------------------------------------------------------------------- registry and accounting


def test_default_peers_are_listed_in_table_order():
    assert adapter_names() == [
        "llamacpp-f16",
        "llamacpp-q8_0",
        "llamacpp-q4_0",
        "kvpress-snapkv-4.5",
        "kvpress-snapkv-2.5",
        "kvpress-expected-attention-4.5",
        "kvpress-expected-attention-2.5",
    ]
    assert peer_names() == adapter_names() + ["quanto-4", "quanto-2", "kivi-4", "kivi-2"]


def test_make_peer_builds_each_kind():
    q4 = make_peer("llamacpp-q4_0", "smollm2-135m", threads=2)
    assert isinstance(q4, LlamaCppPeer) and isinstance(q4, Peer)
    assert (q4.name, q4.kv_type, q4.threads, q4.n_batch) == ("llamacpp-q4_0", "q4_0", 2, 256)
    snap = make_peer("kvpress-snapkv-2.5")
    assert isinstance(snap, KvpressPeer) and isinstance(snap, Peer)
    assert (snap.press, snap.bits, snap.name) == ("snapkv", 2.5, "kvpress-snapkv-2.5")
    assert snap.compression_ratio == pytest.approx(1 - 2.5 / 16)
    other = make_peer("kvpress-expected-attention-3.3")
    assert (other.press, other.bits) == ("expected-attention", 3.3)
    assert make_peer("kvpress-none").compression_ratio == 0.0
    assert make_peer("kivi-2") is CACHE_PEERS["kivi-2"]
    for bad in ("llamacpp-q3_k", "kvpress-snapkv-x", "kvpress-unknown-4", "zip"):
        with pytest.raises(ValueError):
            make_peer(bad)


def test_bits_mapping_and_accounting():
    assert keep_for_bits(4.5) == 4.5 / 16 and keep_for_bits(16) == 1.0
    with pytest.raises(ValueError):
        keep_for_bits(0)
    assert FORMAT_BITS["q4_0"] == 18 * 8 / 32 and FORMAT_BITS["q8_0"] == 34 * 8 / 32 and FORMAT_BITS["f16"] == 16
    # 30 layers x 3 KV heads x 64 x 2 elements per token, 100 tokens in fp16: 16 bits
    assert kv_bits_per_element(30 * 3 * 64 * 2 * 100 * 2, layers=30, kv_heads=3, head_dim=64, tokens=100) == 16.0
    logits = [0.5, -1.0, 2.0]
    expected = logits[2] - math.log(sum(math.exp(x) for x in logits))
    assert log_softmax_at(logits, 2) == pytest.approx(expected, abs=1e-12)


def test_cache_peers_configure_registered_caches():
    for peer in CACHE_PEERS.values():
        config = peer.config()
        assert (config.cache, config.key_bits_normal, config.value_bits_normal) == (peer.cache, peer.bits, peer.bits)
    missing = CachePeer("nope-2", "nope", "no-such-cache", 2, install="pip install nothing")
    assert missing.unavailable() == "the 'no-such-cache' cache is not registered (pip install nothing)"
    needs = CachePeer("full-2", "full", "full", 2, requires="no_such_module_here", install="pip install it")
    assert needs.unavailable() == "no_such_module_here is not installed (pip install it)"


def test_peer_result_round_trips_as_json():
    result = PeerResult("12345", -1.5, 3, 4.5, 1.0, 0.5, "format: q4_0", "here", (1, 2))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["generated_ids"] == [1, 2] and data["bits_per_element"] == 4.5
    assert PeerResult(**{**data, "generated_ids": tuple(data["generated_ids"])}) == result


def test_llamacpp_peer_says_why_it_cannot_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    peer = LlamaCppPeer("q4_0")
    reason = peer.unavailable()
    assert reason is not None and reason.startswith("llama-cpp-python is not installed (make peers")
    with pytest.raises(PeerUnavailable, match="llama-cpp-python is not installed"):
        peer.run([1, 2, 3], [4], 2)


def test_kvpress_peer_says_why_it_cannot_run(tmp_path):
    peer = KvpressPeer("snapkv", 4.5, python=tmp_path / "no-env" / "bin" / "python")
    reason = peer.unavailable()
    assert reason is not None and reason.startswith("kvpress's own environment is missing: no ")
    assert "make peers" in reason
    with pytest.raises(PeerUnavailable, match="environment is missing"):
        peer.run([1, 2, 3], [4], 2)


# --------------------------------------------------------------------------- the JSON-lines protocol


def test_serve_answers_each_request_and_keeps_going_after_errors():
    def boom(args):
        raise RuntimeError("no\nmodel")

    requests = "\n".join(
        [
            json.dumps({"id": 1, "op": "echo", "args": {"x": 1}}),
            "not json",
            json.dumps({"id": 2, "op": "boom"}),
            json.dumps({"id": 3, "op": "missing"}),
            "",
            json.dumps({"id": 4, "op": "echo", "args": {"x": 2}}),
            json.dumps({"id": 5, "op": "quit"}),
            json.dumps({"id": 6, "op": "echo"}),
        ]
    )
    out = io.StringIO()
    code = serve({"echo": lambda a: {"seen": a}, "boom": boom}, lambda: {"lib": "1.0"}, io.StringIO(requests), out)
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0
    assert replies[0] == {"ready": True, "versions": {"lib": "1.0"}, "pid": replies[0]["pid"]}
    assert replies[1] == {"id": 1, "ok": True, "result": {"seen": {"x": 1}}}
    assert replies[2]["id"] is None and replies[2]["error"].startswith("unreadable request")
    assert replies[3] == {"id": 2, "ok": False, "error": "RuntimeError: no model"}
    assert replies[4]["id"] == 3 and "unknown op 'missing'" in replies[4]["error"]
    assert replies[5] == {"id": 4, "ok": True, "result": {"seen": {"x": 2}}}
    assert replies[6] == {"id": 5, "ok": True, "result": {}}
    assert len(replies) == 7  # nothing after quit


def test_serve_reports_a_failed_start():
    def hello():
        raise ImportError("No module named 'kvpress'")

    out = io.StringIO()
    assert serve({}, hello, io.StringIO(""), out) == READY_FAILED
    assert json.loads(out.getvalue()) == {"ready": False, "error": "ImportError: No module named 'kvpress'"}


FAKE_WORKER = """
import json, os, sys
from kvstream.peers.kvpress_worker import protocol_stdout, serve

mode = os.environ.get("FAKE_MODE", "")

def hello():
    if mode == "no-kvpress":
        raise ImportError("No module named 'kvpress'")
    return {"kvpress": "0.0-fake", "transformers": "5.2.0", "torch": "fake"}

def load(args):
    assert os.path.isdir(args["model"])
    return {"layers": 2, "kv_heads": 1, "head_dim": 4, "dtype": "float32", "threads": args["threads"]}

def run(args):
    if mode == "crash":
        print("worker is going down", file=sys.stderr, flush=True)
        os._exit(7)
    if mode == "garbage":
        out.write("this is not json\\n")
        out.flush()
    if args["press"] == "fail":
        raise ValueError("press refused")
    prompt, answer = args["prompt_ids"], args["answer_ids"]
    tokens = len(prompt) + args["max_new_tokens"] - 1
    held_tokens = tokens // 2
    return {
        "text": "ok " + args["press"], "generated_ids": list(range(args["max_new_tokens"])),
        "answer_logprob": -0.5 * len(answer), "answer_tokens": len(answer),
        "prompt_seconds": 0.25, "decode_seconds": 0.125, "tokens_seen": tokens, "context_tokens": len(prompt) - 1,
        "kept_context_tokens": [held_tokens - 1] * 2, "held_tokens": [held_tokens] * 2,
        "held_elements": 2 * 2 * 1 * 4 * held_tokens, "held_bytes": 4 * 2 * 2 * 1 * 4 * held_tokens,
        "ratio": args["compression_ratio"],
    }

out = protocol_stdout()
print("a library talking on stdout")  # goes to stderr, not into the protocol
sys.exit(serve({"load": load, "run": run}, hello, sys.stdin, out))
"""


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """A fake kvpress worker speaking the real protocol, and a model folder for it."""
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(FAKE_WORKER))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    yield [sys.executable, str(script)], model
    close_workers()


def test_kvpress_peer_through_a_fake_worker(fake_worker):
    command, model = fake_worker
    peer = KvpressPeer("snapkv", 4.5, model, command=command, threads=1)
    assert peer.unavailable() is None
    assert peer.versions()["transformers"] == "5.2.0"
    result = peer.run(list(range(11)), [5, 6, 7], max_new_tokens=5)
    assert (result.text, result.answer_logprob, result.answer_tokens) == ("ok snapkv", -1.5, 3)
    assert (result.prompt_seconds, result.decode_seconds, result.generated_ids) == (0.25, 0.125, (0, 1, 2, 3, 4))
    # 15 tokens seen, 7 held per layer: 7/15 of 16 bits counted at fp16; the fp32 the fake held is twice that
    assert result.bits_per_element == pytest.approx(16 * 7 / 15)
    assert result.bits_basis.startswith("measured: 7-7 of 15 tokens held per layer (6-6 of 10 prompt tokens kept)")
    assert "held float32: 14.93 bits" in result.bits_basis
    assert "kvpress 0.0-fake, transformers 5.2.0" in result.environment and "own environment" in result.environment
    # a second peer on the same command shares the worker
    other = KvpressPeer("expected-attention", 2.5, model, command=command, threads=1)
    assert other.run([1, 2, 3], [4], 2).text == "ok expected-attention"


def test_fake_worker_errors_become_peer_errors(fake_worker):
    command, model = fake_worker
    peer = KvpressPeer("snapkv", 4.5, model, command=command, threads=1)
    peer.press = "fail"  # the worker refuses this press; the worker stays up
    with pytest.raises(PeerError, match="failed on 'run': ValueError: press refused"):
        peer.run([1, 2, 3], [4], 2)
    peer.press = "snapkv"
    assert peer.run([1, 2, 3], [4], 2).text == "ok snapkv"


def test_fake_worker_that_cannot_import_kvpress_is_unavailable(fake_worker, monkeypatch):
    command, model = fake_worker
    monkeypatch.setenv("FAKE_MODE", "no-kvpress")
    peer = KvpressPeer("snapkv", 4.5, model, command=command, threads=3)
    reason = peer.unavailable()
    assert reason is not None and "did not start: ImportError: No module named 'kvpress'" in reason
    assert peer.unavailable() == reason  # remembered, not retried
    with pytest.raises(PeerUnavailable):
        peer.run([1, 2, 3], [4], 2)


def test_fake_worker_that_dies_is_reported_with_its_stderr(fake_worker, monkeypatch):
    command, model = fake_worker
    monkeypatch.setenv("FAKE_MODE", "crash")
    peer = KvpressPeer("snapkv", 4.5, model, command=command, threads=4)
    with pytest.raises(PeerError, match=r"ended before writing its reply to 'run' \(exit code 7\).*going down"):
        peer.run([1, 2, 3], [4], 2)


def test_worker_process_refuses_garbage_and_times_out(fake_worker, monkeypatch):
    command, model = fake_worker
    monkeypatch.setenv("FAKE_MODE", "garbage")
    with WorkerProcess(command, name="fake") as worker:
        assert worker.versions["kvpress"] == "0.0-fake"
        with pytest.raises(PeerError, match="not a JSON object instead of its reply to 'run': 'this is not json'"):
            worker.call("run", press="x", prompt_ids=[1], answer_ids=[1], max_new_tokens=1, compression_ratio=0)
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    worker = WorkerProcess(sleeper, name="sleeper", start_timeout=0.5)
    with pytest.raises(PeerError, match="sleeper wrote no ready line within 0.5 s"):
        worker.start()
    assert not worker.running


# --------------------------------------------------------------------------- the real adapters


PROMPT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 6
    + "The pass key is 71432. Remember it. 71432 is the pass key. "
    + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 6
    + "What is the pass key? The pass key is"
)
ANSWER = " 71432"


@pytest.fixture(scope="module")
def passkey_ids(smollm2):
    _, tokenizer = smollm2
    return tokenizer(PROMPT).input_ids, tokenizer(ANSWER).input_ids


def transformers_answer_logprob(model, prompt_ids, answer_ids) -> float:
    import torch

    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].double()
    rows = torch.log_softmax(logits, dim=-1)
    return float(rows.gather(-1, torch.tensor(answer_ids).unsqueeze(-1)).sum())


@pytest.fixture(scope="module")
def llamacpp_peers():
    peers = {kv: LlamaCppPeer(kv, "smollm2-135m", threads=2) for kv in ("f16", "q8_0", "q4_0")}
    reason = peers["f16"].unavailable()
    if reason:
        pytest.skip(reason)
    yield peers
    for peer in peers.values():
        peer.close()


@pytest.mark.slow
def test_llamacpp_f16_scores_the_answer_as_transformers_does(llamacpp_peers, smollm2, passkey_ids):
    """llama.cpp f16 against transformers on the model converted from the same GGUF.

    The two differ by more than the KV cache: llama.cpp multiplies with the Q4_1 weights directly
    (activations rounded to 8 bits for the dot products) where transformers runs the dequantized
    fp32 weights. On this prompt (323 tokens, a 6-token answer) they differ by 0.007 nats; over 11
    passkey prompts in Paul Graham essays (320 and 2048 tokens) by up to 0.58 nats over 6 answer
    tokens, i.e. about 0.1 per token. That is the tolerance, so that another CPU's kernels pass;
    a misaligned answer (scored one position off) costs tens of nats.
    """
    model, _ = smollm2
    prompt_ids, answer_ids = passkey_ids
    reference = transformers_answer_logprob(model, prompt_ids, answer_ids)
    result = llamacpp_peers["f16"].run(prompt_ids, answer_ids, max_new_tokens=8)
    assert result.answer_tokens == len(answer_ids)
    assert abs(result.answer_logprob - reference) <= 0.1 * len(answer_ids), (result.answer_logprob, reference)
    assert result.text.strip().startswith("71432")
    assert 16.0 <= result.bits_per_element < 16.1 and result.bits_basis.startswith("measured:")
    assert "llama-cpp-python" in result.environment and "flash attention" in result.environment


@pytest.mark.slow
def test_llamacpp_quantized_kv_bits_and_restored_state(llamacpp_peers, passkey_ids):
    prompt_ids, answer_ids = passkey_ids
    for kv, bits in (("q8_0", 8.5), ("q4_0", 4.5)):
        peer = llamacpp_peers[kv]
        result = peer.run(prompt_ids, answer_ids, max_new_tokens=8)
        # the serialized cells add a few bytes of positions and row headers to the block format
        assert bits <= result.bits_per_element < bits + 0.1, (kv, result.bits_per_element)
        assert f"format alone is {bits:g} bits" in result.bits_basis
        assert math.isfinite(result.answer_logprob) and result.answer_logprob < 0
        # scoring the answer leaves nothing behind: a different answer gives the same generation,
        # and the same run twice gives the same numbers
        other = peer.run(prompt_ids, [answer_ids[-1], answer_ids[0]], max_new_tokens=8)
        assert other.generated_ids == result.generated_ids
        again = peer.run(prompt_ids, answer_ids, max_new_tokens=8)
        assert again.answer_logprob == pytest.approx(result.answer_logprob, abs=1e-4)
        assert again.generated_ids == result.generated_ids


@pytest.fixture
def kvpress_none():
    peer = KvpressPeer("none", None, "smollm2-135m", threads=2)
    reason = peer.unavailable()
    if reason:
        pytest.skip(reason)
    yield peer
    close_workers()


@pytest.mark.slow
def test_kvpress_without_a_press_matches_transformers(kvpress_none, smollm2, passkey_ids):
    """kvpress's environment (transformers 5.2) on the same converted weights as kvstream (5.24).

    Measured: 4e-5 nats apart on a 2048-token passkey prompt; 1e-3 leaves room for other CPUs.
    """
    peer = kvpress_none
    model, _ = smollm2
    prompt_ids, answer_ids = passkey_ids
    reference = transformers_answer_logprob(model, prompt_ids, answer_ids)
    full = peer.run(prompt_ids, answer_ids, max_new_tokens=8)
    snap = KvpressPeer("snapkv", 4.5, "smollm2-135m", threads=2).run(prompt_ids, answer_ids, max_new_tokens=8)
    assert full.answer_logprob == pytest.approx(reference, abs=1e-3)
    assert full.bits_per_element == pytest.approx(16.0)
    assert "transformers 5.2.0" in full.environment
    # 4.5/16 of the compressed prompt kept; the question token and the generated ones come on top
    assert 4.5 <= snap.bits_per_element < 5.0, snap.bits_basis
    assert math.isfinite(snap.answer_logprob)
