"""The retrieval benchmark driver (`benchmarks/retrieval.py`): its declared plan, its estimate and its page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_eval import WordTokenizer

from kvstream.config import CompressionConfig
from kvstream.peers import PeerError, PeerResult
from kvstream.testing import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import retrieval  # noqa: E402

FOUR_HOURS = 4 * 3600


def test_the_plan_covers_every_task_at_4k_8k_and_16k_on_qwen():
    everything = retrieval.PLAN + retrieval.EXTENDED
    assert {row.model for row in everything} == {retrieval.QWEN}
    for length, samples in ((4096, 20), (8192, 20), (16384, 10)):
        rows = [row for row in everything if row.length == length]
        assert {row.task for row in rows} == set(retrieval.TASKS), length
        assert {row.samples for row in rows} == {samples}, length  # one sample count per slot: one baseline
        for task in retrieval.TASKS:
            configs = {c for row in rows if row.task == task for c in row.configs}
            assert configs == set(retrieval.ORDER), (length, task)
    assert {row.configs for row in retrieval.PLAN} == {retrieval.CORE}
    assert {row.length for row in retrieval.PLAN} == {4096} and retrieval.LOSSY in retrieval.CORE
    assert set(retrieval.TASKS) >= {"niah_multikey_3", "vt", "fwe"}


def test_cells_run_screen_first_each_baseline_once_and_shorter_contexts_first():
    plan = retrieval.cells(retrieval.PLAN)
    assert len(plan) == len(retrieval.TASKS) * len(retrieval.CORE) == 16
    screen = plan[: len(retrieval.TASKS)]
    assert [c.task for c in screen] == list(retrieval.TASKS)
    assert all(c.label == retrieval.LOSSY and c.baseline for c in screen)
    rest = plan[len(retrieval.TASKS) :]
    assert not any(c.baseline or c.label == retrieval.LOSSY for c in rest)
    assert [(c.task, c.label) for c in rest[:3]] == [("niah_single", label) for label in retrieval.CORE[:3]]

    everything = retrieval.cells(retrieval.PLAN + retrieval.EXTENDED)
    assert len(everything) == 4 * 5 * 3 == 60  # every task, configuration and length once
    assert len({(*c.slot, c.label) for c in everything}) == len(everything)
    assert [c.length for c in everything] == sorted(c.length for c in everything)
    for length in (4096, 8192, 16384):
        at = [c for c in everything if c.length == length]
        assert [c.label for c in at[:4]] == [retrieval.LOSSY] * 4 and all(c.baseline for c in at[:4])
        assert sum(c.baseline for c in at) == 4
    assert everything[: len(plan)] == plan  # the default plan's cells first, in the same order
    assert [c.label for c in everything[len(plan) : len(plan) + 4]] == ["3/8 bits"] * 4


def test_the_estimate_counts_each_baseline_once_and_the_plan_fits_an_afternoon():
    assert 3 * 3600 < retrieval.estimate_seconds(retrieval.PLAN) < FOUR_HOURS
    row = retrieval.PlanRow(retrieval.QWEN, "passkey", 2048, 10, ("4/8 bits",))
    again = retrieval.PlanRow(retrieval.QWEN, "passkey", 2048, 10, ("3/8 bits",))
    assert retrieval.estimate_seconds([row]) == 2 * 10 * retrieval.SAMPLE_SECONDS[(retrieval.QWEN, 2048)]
    assert retrieval.estimate_seconds([row, again]) == 3 * 10 * retrieval.SAMPLE_SECONDS[(retrieval.QWEN, 2048)]


def test_lengths_without_stored_runs_are_scaled_from_the_nearest_measured_one():
    timing = retrieval.Timing({(retrieval.QWEN, 4096): 30.0, (retrieval.QWEN, 2048): 10.0}, "test")
    assert timing.per_sample(retrieval.QWEN, 4096) == 30.0
    h = retrieval.ATTENTION_LENGTH[retrieval.QWEN]
    want = 30.0 * 16384 * (1 + 16384 / h) / (4096 * (1 + 4096 / h))
    assert timing.per_sample(retrieval.QWEN, 16384) == pytest.approx(want)
    assert timing.per_sample(retrieval.QWEN, 1024) == pytest.approx(retrieval.scaled_seconds(10.0, 2048, 1024, h))
    assert 2 * 30.0 < timing.per_sample(retrieval.QWEN, 8192) < 3 * 30.0  # attention makes it more than linear
    assert "8192 tokens" in timing.describe([(retrieval.QWEN, 8192)]) and "(scaled from 4096)" in timing.describe(
        [(retrieval.QWEN, 8192)]
    )
    with pytest.raises(KeyError, match="no stored run"):
        timing.per_sample("unknown", 4096)


def test_a_missing_preset_is_named_in_one_line_and_its_rows_dropped(monkeypatch, capsys):
    monkeypatch.setattr(retrieval, "PRESETS", ("no-such-preset",))
    configs = retrieval.configurations()
    assert set(configs) == set(retrieval.WIDTHS)
    assert capsys.readouterr().out.count("\n") == 1
    plan = retrieval.select(retrieval.PLAN, configs, lambda row: True)
    assert [row.configs for row in plan] == [("4/8 bits", "2/8 bits")] * len(retrieval.PLAN)


def test_the_page_without_runs_shows_the_plan(tmp_path):
    page = retrieval.render(retrieval.collect(tmp_path, {}), retrieval.PLAN, retrieval.EXTENDED)
    minutes = retrieval.minutes(retrieval.estimate_seconds(retrieval.PLAN))
    assert f"**No runs are recorded yet for this plan** (estimated {minutes} min" in page
    assert "| 1 | qwen2.5-coder-0.5b | niah_single | 4096 | 20 | 2/8 bits + full precision | 23 | no |" in page
    assert "| 5 | qwen2.5-coder-0.5b | niah_single | 4096 | 20 | 4/8 bits | 11 | no |" in page
    assert "## Which cells separate caches" in page and "- no run recorded yet." in page
    assert "- Separating cells (full precision at 0.8 or more, 2/8 bits falling beyond its interval" in page


def tiny(bits: int) -> CompressionConfig:
    return CompressionConfig(chunk_size=32, value_quant_groups=16, key_bits_normal=bits, value_bits_normal=bits)


def test_runs_resume_and_the_page_renders_from_them(tmp_path, capsys):
    configs = {"4/8 bits": tiny(4), "2/8 bits": tiny(2)}
    plan = [retrieval.PlanRow("tiny", "passkey", 120, 2, ("4/8 bits", "2/8 bits"))]
    loads: list[str] = []

    def load(name: str):
        loads.append(name)
        return tiny_llama(max_position_embeddings=512), WordTokenizer()

    retrieval.run(plan, configs, tmp_path, load)
    out = capsys.readouterr().out
    assert out.count("tiny passkey 120") == 2 and out.index("2/8 bits") < out.index("4/8 bits")  # screen first
    retrieval.run(plan, configs, tmp_path, load)  # every run stored on the same key: nothing runs again
    assert "tiny passkey 120" not in capsys.readouterr().out and loads == ["tiny", "tiny"]
    assert len(list((tmp_path / "_baseline").iterdir())) == 1  # one baseline for both configurations

    labels = {config.config_hash(): label for label, config in configs.items()}
    frame = retrieval.collect(tmp_path, labels)
    assert sorted(set(frame["label"])) == ["2/8 bits", "4/8 bits"]
    assert set(frame["metric"]) == {"accuracy", "answer_logprob"} and set(frame["source"]) == {"kvstream"}
    page = retrieval.render(frame, retrieval.PLAN, retrieval.EXTENDED)
    revision = frame["revision"].iloc[0]
    assert f"**All rows come from one revision, `{revision}`.**" in page
    assert "## `tiny`" in page and "No runs are recorded yet" not in page
    row = next(line for line in page.splitlines() if line.startswith("| passkey | 120 | 4/8 bits |"))
    score = frame[(frame["label"] == "4/8 bits") & (frame["metric"] == "answer_logprob")].iloc[0]
    assert f"| {score.delta:+.3f} [{score.ci_low:+.3f}, {score.ci_high:+.3f}] |" in row  # the log-likelihood delta
    assert row.endswith(f"| met | `{revision}` |")  # a random model answers nothing either way: 0 samples apart
    assert "- 4/8 bits, accuracy within one sample of full precision: met on 1 of 1 rows; missed: none." in page
    budget = "holding at most 3.3 effective bits"
    assert f"- bits-3.3, accuracy equal to full precision, {budget}: no run recorded yet." in page
    which = page.split("## Which cells separate caches")[1].split("## Plan")[0]
    assert "- tiny passkey 120 (2 samples): not separating; full precision answers 0 of 2, below 0.8." in which
    assert retrieval.Timing.from_store(tmp_path).measured[("tiny", 120)] > 0  # timed by its stored runs


def record(label: str, metric: str, delta: float, low: float, high: float, fp: float = 1.0, **more) -> dict:
    base = dict(model="m", task="vt", length=4096, n=20, label=label, source="kvstream", metric=metric, fp=fp)
    base.update(quantized=fp + delta, delta=delta, ci_low=low, ci_high=high, lost=0, gained=0, bits=3.0)
    base.update(bits_min=3.0, bits_max=3.0, revision="abc", torch="2", started="s", finished="f", seconds=1.0)
    return {**base, **more}


@pytest.mark.parametrize(
    ("records", "separates", "why"),
    [
        ([record("2/8 bits", "accuracy", -0.3, -0.5, -0.1)], True, "2/8 bits falls: accuracy -0.30 [-0.50, -0.10]"),
        (
            [
                record("2/8 bits", "accuracy", -0.05, -0.15, 0.0),
                record("2/8 bits", "answer_logprob", -0.2, -0.3, -0.1, fp=-0.5),
            ],
            True,
            "answer log-likelihood -0.200 [-0.300, -0.100] nats/token",
        ),
        (
            [
                record("2/8 bits", "accuracy", -0.05, -0.15, 0.0),
                record("2/8 bits", "answer_logprob", -0.1, -0.3, 0.05, fp=-0.5),
            ],
            False,
            "2/8 bits does not fall measurably",
        ),
        ([record("2/8 bits", "accuracy", -0.3, -0.5, -0.1, fp=0.75)], False, "full precision answers 15 of 20"),
        ([record("4/8 bits", "accuracy", 0.0, 0.0, 0.0)], False, "no 2/8 bits run yet"),
    ],
)
def test_a_cell_separates_when_full_precision_passes_and_the_lossy_cache_falls(records, separates, why):
    got, reason = retrieval.separation(retrieval.pd.DataFrame(records))
    assert got is separates and why in reason


def test_separating_targets_and_peer_rows(tmp_path):
    peer = record("peer-q4", "accuracy", -0.1, -0.2, 0.0, source="peer")
    records = [
        record("2/8 bits", "accuracy", -0.3, -0.5, -0.1),
        record("4/8 bits", "accuracy", 0.0, -0.1, 0.1),
        record("4/8 bits", "answer_logprob", -0.01, -0.02, -0.001, fp=-0.4),
        record("bits-3.3", "accuracy", 0.0, 0.0, 0.0),
        peer,
    ]
    frame = retrieval.collect(tmp_path, {}, extra=records)
    lines = retrieval.separating_lines(frame)
    assert lines[0].endswith("at least 3: 1 (m vt 4096).")
    assert lines[1].endswith("met on 0 of 1; missed: m vt 4096.")  # 4/8 bits' log-likelihood falls
    assert lines[2].endswith("met on 1 of 1; missed: none.")
    page = retrieval.render(frame, retrieval.PLAN, retrieval.EXTENDED)
    row = next(line for line in page.splitlines() if line.startswith("| vt | 4096 | peer-q4 |"))
    assert row.endswith("| -0.10 [-0.20, +0.00] | 0 / 0 | - | - | - | `abc` |")  # no target for a peer's row
    assert page.index("| vt | 4096 | 4/8 bits |") < page.index("| vt | 4096 | 2/8 bits |") < page.index("peer-q4")


def test_the_peer_target_asks_for_a_kvstream_row_with_no_more_bits_and_no_lower_log_likelihood(tmp_path):
    ours = record("bits-3.3", "answer_logprob", -0.02, -0.03, -0.01, fp=-0.4, bits=3.2)
    beaten = record("quanto-4", "answer_logprob", -0.2, -0.3, -0.1, fp=-0.4, bits=5.0, source="peer")
    fewer_bits = record("kivi-2", "answer_logprob", -0.1, -0.2, 0.0, fp=-0.4, bits=3.0, source="peer")
    frame = retrieval.collect(tmp_path, {}, extra=[ours, beaten, fewer_bits])
    (line,) = retrieval.peer_target_lines(frame)
    assert line.endswith("met on 1 of 2 peer rows; missed: kivi-2 on m vt 4096.")  # only 3.2 bits above its 3.0
    assert retrieval.peer_target_lines(retrieval.collect(tmp_path, {}, extra=[ours]))[0].endswith("recorded yet.")
    unavailable = {("kvpress-snapkv-2.5", "m"): f"no {Path(retrieval.__file__).resolve().parent.parent}/.venv-x"}
    page = retrieval.render(frame, retrieval.PLAN, retrieval.EXTENDED, unavailable=unavailable)
    assert "- `kvpress-snapkv-2.5`: no .venv-x" in page  # paths inside the checkout named relatively
    assert "kvstream at equal or fewer bits at or above every peer" in page


@pytest.mark.parametrize(
    ("delta", "label", "bits", "expected"),
    [
        (-0.1, "bits-3.3", 3.2, "**missed**"),
        (-0.1, "3/8 bits", 3.6, "met"),
        (-0.1, "bits-2.5", 2.4, "met"),
        (0.0, "bits-2.5", 2.63, "**missed** (2.63 > 2.5 bits)"),  # equal accuracy, but more bits than the budget
        (-0.2, "bits-2.5", 2.63, "**missed**"),
    ],
)
def test_verdicts_follow_each_target(delta, label, bits, expected):
    row = type("Row", (), dict(delta=delta, n=10, label=label, metric="accuracy", bits=bits))()
    assert retrieval.verdict(row) == expected


def test_main_prints_the_cells_first_and_writes_the_page(tmp_path, monkeypatch, capsys):
    configs = {label: CompressionConfig(chunk_size=64 * (i + 1)) for i, label in enumerate(retrieval.ORDER)}
    monkeypatch.setattr(retrieval, "configurations", lambda: configs)
    planned: list[list] = []
    monkeypatch.setattr(retrieval, "run", lambda plan, *rest: planned.append(plan))
    out = tmp_path / "page.md"
    argv = ["retrieval.py", "--results", str(tmp_path / "runs"), "--out", str(out), "--peers", "none"]
    monkeypatch.setattr(sys, "argv", argv)
    retrieval.main()
    printed = capsys.readouterr().out.splitlines()
    cells = retrieval.cells(retrieval.PLAN)
    assert printed[0].startswith(f"{len(cells)} cells in run order, expected seconds on two CPU cores")
    assert printed[2].split()[:6] == ["1", retrieval.QWEN, "niah_single", "4096", "20", "2/8"]
    minutes = retrieval.minutes(retrieval.estimate_seconds(retrieval.PLAN))
    assert printed[len(cells) + 2].startswith(
        f"total: {retrieval.estimate_seconds(retrieval.PLAN):.0f} s ({minutes} min)"
    )
    assert planned == [list(retrieval.PLAN)] and "No runs are recorded yet" in out.read_text()


def test_plan_prints_every_cell_in_run_order_and_exits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(retrieval, "run", lambda *args: pytest.fail("--plan must not run anything"))
    monkeypatch.setattr(retrieval, "write_report", lambda *args: pytest.fail("--plan must not write the page"))
    argv = ["retrieval.py", "--plan", "--extended", "--results", str(tmp_path), "--tasks", "vt,fwe", "--peers", "none"]
    monkeypatch.setattr(sys, "argv", argv)
    retrieval.main()
    lines = capsys.readouterr().out.splitlines()
    lines = lines[lines.index(next(x for x in lines if " cells in run order" in x)) :]
    cells = retrieval.cells(
        retrieval.select(retrieval.PLAN + retrieval.EXTENDED, retrieval.ORDER, lambda r: r.task in ("vt", "fwe"))
    )
    assert lines[0].startswith(f"{len(cells)} cells in run order") and len(cells) == 2 * 5 * 3
    body = lines[2 : 2 + len(cells)]
    for i, (line, cell) in enumerate(zip(body, cells, strict=True), start=1):
        number, model, task, length, samples, *rest = line.split()
        assert (int(number), model, task, int(length), int(samples)) == (
            i,
            cell.model,
            cell.task,
            cell.length,
            cell.samples,
        )
        assert " ".join(rest[:-1]).startswith(cell.label) and float(rest[-1]) == pytest.approx(cell.seconds(), abs=1)
    total = sum(c.seconds(retrieval.Timing.from_store(tmp_path)) for c in cells)
    assert lines[2 + len(cells)].startswith(f"total: {total:.0f} s")


def test_target_lines_name_each_miss_with_its_reason():
    rows = [
        dict(model="m", task="passkey", length=2048, n=10, label="bits-2.5", delta=0.0, bits=2.63),
        dict(model="m", task="passkey", length=4096, n=10, label="bits-2.5", delta=-0.2, bits=2.7),
        dict(model="m", task="niah_single", length=4096, n=10, label="bits-2.5", delta=-0.1, bits=2.4),
    ]
    accuracy = retrieval.pd.DataFrame([{**row, "metric": "accuracy"} for row in rows])
    line = next(text for text in retrieval.target_lines(accuracy) if text.startswith("- bits-2.5,"))
    assert line.endswith("met on 1 of 3 rows; missed: m passkey 2048 (2.63 bits), m passkey 4096 (-2, 2.70 bits).")


# --------------------------------------------------------------------------- peers


def test_the_plan_with_peers_adds_each_peer_to_every_cell_after_its_configurations():
    peers = retrieval.with_baselines(["quanto-4", "llamacpp-q4_0", "kvpress-snapkv-2.5"])
    assert peers == ["quanto-4", "llamacpp-f16", "llamacpp-q4_0", "kvpress-snapkv-2.5"]  # llama.cpp's own baseline
    unavailable = {("kvpress-snapkv-2.5", retrieval.QWEN): "kvpress's own environment is missing"}
    plain = retrieval.cells(retrieval.PLAN)
    planned = retrieval.cells(retrieval.PLAN, peers, unavailable)
    assert len(planned) == len(plain) + len(retrieval.TASKS) * len(peers) == 16 + 16
    assert planned[: len(plain)] == plain  # kvstream's cells first, unchanged: the screen still runs first
    rest = planned[len(plain) :]
    assert [(c.task, c.label) for c in rest] == [(task, peer) for task in retrieval.TASKS for peer in peers]
    assert [c.kind for c in rest[:4]] == [retrieval.CACHE_PEER, *[retrieval.EXTERNAL] * 3]
    assert not any(c.baseline for c in rest)  # the baseline is measured once per slot, by the screen
    skipped = [c for c in rest if c.skipped]
    assert {c.label for c in skipped} == {"kvpress-snapkv-2.5"} and all(c.seconds() == 0 for c in skipped)
    per_sample = retrieval.SAMPLE_SECONDS[(retrieval.QWEN, 4096)] * 20
    assert rest[0].seconds() == per_sample and rest[1].seconds() == per_sample  # quanto-4, llamacpp-f16
    assert rest[2].seconds() == per_sample * retrieval.PEER_SAMPLE_FACTOR["llamacpp"]
    total = retrieval.estimate_seconds(retrieval.PLAN, peers=peers, unavailable=unavailable)
    assert total == retrieval.estimate_seconds(retrieval.PLAN) + 4 * per_sample * (1 + 1 + 3)

    extended = retrieval.cells(retrieval.PLAN + retrieval.EXTENDED, peers)
    assert len(extended) == 60 + 3 * len(retrieval.TASKS) * len(peers)  # once per slot, 3/8 bits' 4k rows included
    at_8k = [c for c in extended if c.length == 8192]
    assert [c.label for c in at_8k[:4]] == [retrieval.LOSSY] * 4 and at_8k[-1].label == "kvpress-snapkv-2.5"

    lines = retrieval.plan_lines(retrieval.PLAN, peers=peers, unavailable=unavailable)
    assert lines[0].startswith("32 cells in run order")
    assert "llamacpp-q4_0 (peer)" in lines[2 + 18]
    assert lines[2 + 19].endswith("0  skipped: kvpress's own environment is missing")
    assert "llamacpp-q4_0 x3" in lines[-1] and "kvpress-snapkv-2.5 x" not in lines[-1]


class FakePeer:
    """A peer implementing the `kvstream.peers.Peer` protocol: it answers the gold answer (``right``) or nothing,
    scores each answer token at ``logprob``, and fails once on the samples listed in ``fail_once``."""

    version = "fake 1"

    def __init__(self, name, tokenizer, *, right=True, logprob=-0.5, reason=None, fail_once=()):
        self.name, self.label, self.tokenizer = name, f"fake {name}", tokenizer
        self.right, self.logprob, self.reason = right, logprob, reason
        self.fail_once = set(fail_once)
        self.calls: list[list[int]] = []

    def unavailable(self):
        return self.reason

    def run(self, prompt_ids, answer_ids, max_new_tokens):
        self.calls.append(list(prompt_ids))
        if len(self.calls) in self.fail_once:
            self.fail_once.discard(len(self.calls))
            raise PeerError("the fake runtime stopped")
        text = self.tokenizer.decode(answer_ids) if self.right else "no idea"
        return PeerResult(
            text=text, answer_logprob=self.logprob * len(answer_ids), answer_tokens=len(answer_ids),
            bits_per_element=4.5, prompt_seconds=0.0, decode_seconds=0.0, bits_basis="format: q4_0 blocks",
            environment="fake runtime 1.0",
        )  # fmt: skip


def peer_bench(tmp_path, fail_once=()):
    """A tiny plan row with one kvstream configuration, and a peer set of fakes: llama.cpp's f16 and q4_0, and a
    kvpress press that cannot run here."""
    tokenizer = WordTokenizer()
    model = tiny_llama(max_position_embeddings=512)
    fakes = {
        "llamacpp-f16": FakePeer("llamacpp-f16", tokenizer, logprob=-0.5),
        "llamacpp-q4_0": FakePeer("llamacpp-q4_0", tokenizer, right=False, logprob=-1.5, fail_once=fail_once),
        "kvpress-snapkv-2.5": FakePeer("kvpress-snapkv-2.5", tokenizer, reason="kvpress's environment is missing"),
    }
    made: list[str] = []

    def make(name, model_name, threads=2):
        made.append(name)
        return fakes[name]

    peers = retrieval.PeerSet(retrieval.with_baselines(["llamacpp-q4_0", "kvpress-snapkv-2.5"]), make)
    plan = [retrieval.PlanRow("tiny", "passkey", 120, 2, ("2/8 bits",))]
    return plan, {"2/8 bits": tiny(2)}, (lambda name: (model, tokenizer)), peers, fakes


def test_an_unavailable_peer_is_a_skipped_row_with_its_reason(tmp_path, capsys):
    plan, configs, load, peers, fakes = peer_bench(tmp_path)
    retrieval.run(plan, configs, tmp_path, load, peers)
    retrieval.run(plan, configs, tmp_path, load, peers)
    out = capsys.readouterr().out
    assert out.count("kvpress's environment is missing") == 1  # printed once
    assert fakes["kvpress-snapkv-2.5"].calls == []
    frame = retrieval.collect(tmp_path, {tiny(2).config_hash(): "2/8 bits"}, extra=retrieval.peer_records(tmp_path))
    skipped = frame[frame["metric"] == retrieval.SKIPPED]
    assert list(skipped["label"]) == ["kvpress-snapkv-2.5"]
    assert list(skipped["note"]) == ["kvpress's environment is missing"]
    page = retrieval.render(frame, retrieval.PLAN, retrieval.EXTENDED)
    row = next(line for line in page.splitlines() if line.startswith("| passkey | 120 | kvpress-snapkv-2.5 |"))
    assert "skipped: kvpress's environment is missing" in row
    assert "- `kvpress-snapkv-2.5` skipped (tiny passkey 120): kvpress's environment is missing" in page


def test_external_peers_run_on_the_same_samples_resume_from_storage_and_pair_with_their_baseline(tmp_path, capsys):
    plan, configs, load, peers, fakes = peer_bench(tmp_path, fail_once={2})
    retrieval.run(plan, configs, tmp_path, load, peers)
    f16, q4 = fakes["llamacpp-f16"], fakes["llamacpp-q4_0"]
    assert len(f16.calls) == 2 and len(q4.calls) == 2  # q4_0 failed on its second sample
    assert "failed on passkey-120-001: the fake runtime stopped" in capsys.readouterr().out
    cell = retrieval.cells(plan, peers.names)[2]
    assert cell.label == "llamacpp-q4_0"
    stored = retrieval.read_peer_file(retrieval.peer_path(tmp_path, cell))
    assert stored["status"] == "partial" and len(stored["samples"]) == 1
    assert stored["key"]["peer"] == "llamacpp-q4_0" and stored["key"]["version"] == "fake 1"
    frame = retrieval.collect(tmp_path, {}, extra=retrieval.peer_records(tmp_path))
    assert "stopped after 1 of 2 samples" in frame[frame["label"] == "llamacpp-q4_0"]["note"].iloc[0]

    # the samples are kvstream's: the prompt ids its own harness fed the model
    task = retrieval.plan_eval(retrieval.EvalSpec("passkey", "tiny", options=plan[0].options()), load("tiny"))
    assert f16.calls == [list(s.meta["prompt_ids"]) for s in task.samples]

    retrieval.run(plan, configs, tmp_path, load, peers)  # resumes: only the sample that failed runs again
    assert len(f16.calls) == 2 and len(q4.calls) == 3 and q4.calls[-1] == f16.calls[1]
    retrieval.run(plan, configs, tmp_path, load, peers)  # every run stored on the same key: nothing runs
    assert len(f16.calls) == 2 and len(q4.calls) == 3
    q4.version = "fake 2"  # another version of the peer: its stored run no longer counts
    retrieval.run(plan, configs, tmp_path, load, peers)
    assert len(q4.calls) == 5 and len(f16.calls) == 2

    frame = retrieval.collect(tmp_path, {tiny(2).config_hash(): "2/8 bits"}, extra=retrieval.peer_records(tmp_path))
    q4_rows = frame[frame["label"] == "llamacpp-q4_0"].set_index("metric")
    assert q4_rows.loc["accuracy", "paired"] == "llamacpp-f16"
    assert (q4_rows.loc["accuracy", "fp"], q4_rows.loc["accuracy", "quantized"]) == (1.0, 0.0)
    assert (q4_rows.loc["accuracy", "lost"], q4_rows.loc["accuracy", "gained"]) == (2, 0)
    assert q4_rows.loc["answer_logprob", "delta"] == pytest.approx(-1.0)  # -1.5 vs -0.5 nats per answer token
    assert q4_rows.loc["accuracy", "bits"] == 4.5 and q4_rows.loc["accuracy", "basis"] == "format"
    f16_rows = frame[frame["label"] == "llamacpp-f16"].set_index("metric")
    assert f16_rows.loc["accuracy", "paired"] == retrieval.FULL_PRECISION  # the family's baseline: kvstream's
    kvstream_fp = frame[(frame["label"] == "2/8 bits") & (frame["metric"] == "answer_logprob")]["fp"].iloc[0]
    assert f16_rows.loc["answer_logprob", "fp"] == pytest.approx(kvstream_fp)

    page = retrieval.render(frame, retrieval.PLAN, retrieval.EXTENDED)
    row = next(line for line in page.splitlines() if line.startswith("| passkey | 120 | llamacpp-q4_0 |"))
    assert row.startswith("| passkey | 120 | llamacpp-q4_0 | 4.50 (4.50-4.50), format | 2 | 1.00 | 0.00 |")
    assert "| 2 / 0 | -1.000 [-1.000, -1.000] |" in row
    line = next(text for text in page.splitlines() if text.startswith("- llamacpp: paired sample by sample"))
    assert "`llamacpp-q4_0` with `llamacpp-f16`" in line and "`llamacpp-f16` with kvstream full precision" in line
    assert "ran in fake runtime 1.0" in line
    assert page.index("| passkey | 120 | 2/8 bits |") < page.index("| passkey | 120 | llamacpp-f16 |")
    assert retrieval.separation(frame[frame["task"] == "passkey"])[1].startswith("full precision answers 0 of 2")
