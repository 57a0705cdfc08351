"""The LongBench v1 metrics, written from their published definitions.

Definitions follow LongBench (Bai et al. 2023, "LongBench: A Bilingual, Multitask Benchmark for
Long Context Understanding", github THUDM/LongBench: ``LongBench/metrics.py`` and
``LongBench/eval.py``), including the details that move numbers:

- token F1 is computed on `normalize_answer` tokens, counted as multisets;
- ROUGE-L is the summary-level score of the ``rouge`` package that LongBench calls (see
  `rouge_l_score`), not the textbook sentence-level LCS F1;
- code similarity is ``fuzzywuzzy``'s ratio as LongBench installs it, difflib based (`fuzzy_ratio`);
- for trec, triviaqa, samsum and lsht only the first line of the prediction is scored;
- a sample's score is the maximum over its gold answers;
- LongBench-E groups samples by their ``length`` field into 0-4k, 4-8k and 8k+ (`length_bucket`).

Scale: every ``*_score`` function scores one (prediction, gold answer) pair in [0, 1].
`score_prediction` returns one sample's score in [0, 100] (the max over gold answers, times 100),
so the plain mean of per-sample scores (`task_score`) is the number LongBench tables print.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "FIRST_LINE_TASKS",
    "LENGTH_BUCKETS",
    "METRICS",
    "TASK_METRIC",
    "base_task",
    "bucket_metric",
    "classification_score",
    "code_sim_score",
    "count_score",
    "first_line",
    "fuzzy_ratio",
    "lcs_length",
    "length_bucket",
    "normalize_answer",
    "qa_f1_score",
    "retrieval_score",
    "rouge_l_score",
    "score_prediction",
    "task_score",
    "token_f1",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The steps run in LongBench's order: lower, punctuation, articles, whitespace. Articles are
    whole words only ("theater" keeps its "the").
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    no_articles = _ARTICLES.sub(" ", no_punct)
    return " ".join(no_articles.split())


def token_f1(prediction_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """F1 of two token multisets (a token counts as often as it occurs in both); 0 with no overlap."""
    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 between the normalized prediction and gold answer (QA tasks and triviaqa), in [0, 1]."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def _lcs_word_set(reference: Sequence[str], hypothesis: Sequence[str]) -> set[str]:
    """The distinct words of one LCS of ``reference`` and ``hypothesis``.

    When several LCSs exist, the one chosen is the one the ``rouge`` package reconstructs: walking
    back from the end, a mismatch steps back in the reference only when that keeps a strictly
    longer LCS, otherwise it steps back in the hypothesis.
    """
    n, m = len(reference), len(hypothesis)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        ref_word = reference[i - 1]
        prev, cur = table[i - 1], table[i]
        for j in range(1, m + 1):
            if ref_word == hypothesis[j - 1]:
                cur[j] = prev[j - 1] + 1
            else:
                cur[j] = max(prev[j], cur[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i -= 1
            j -= 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _rouge_sentences(text: str) -> list[list[str]]:
    """Split as the ``rouge`` package does: on '.', whitespace-collapsed, then on single spaces.

    A non-empty piece that is only whitespace becomes the one-word sentence ``[""]``, as there.
    """
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def rouge_l_score(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure as LongBench computes it for gov_report, qmsum, multi_news and samsum, in [0, 1].

    LongBench calls ``Rouge().get_scores(...)["rouge-l"]["f"]`` of the ``rouge`` PyPI package, whose
    ROUGE-L is summary level and set based. This function reproduces that definition:

    1. both texts are cut into sentences at every '.', and each sentence into whitespace words
       (case and punctuation are kept: "Cat" and "cat," are different words);
    2. ``m`` and ``n`` are the numbers of *distinct* words of the reference and the prediction;
    3. for every (reference sentence, prediction sentence) pair one LCS is taken, and ``L`` is the
       number of distinct words in the union of all these LCSs;
    4. recall ``L/m``, precision ``L/n``, F = 2PR / (P + R + 1e-8).

    So a repeated word counts once: "the cat sat on the mat" against "the cat is on the mat" scores
    0.8, not the textbook LCS F1 of 5/6. A prediction or reference with no sentence (empty, or only
    dots) scores 0, as LongBench's exception handler makes it. One difference: the ``rouge``
    package reconstructs the LCS recursively and raises (so LongBench scores 0) for sentences near
    1000 words; this implementation has no such limit.
    """
    hypothesis = _rouge_sentences(prediction)
    references = _rouge_sentences(reference)
    if not hypothesis or not references:
        return 0.0
    m = len({word for sentence in references for word in sentence})
    n = len({word for sentence in hypothesis for word in sentence})
    union: set[str] = set()
    for ref_sentence in references:
        for hyp_sentence in hypothesis:
            union |= _lcs_word_set(ref_sentence, hyp_sentence)
    recall = len(union) / m
    precision = len(union) / n
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None) -> float:
    """Class-name matching for trec (and lsht), in [0, 1], as LongBench defines it.

    The candidate list holds every class name of ``all_classes`` that occurs as a substring of the
    prediction (in ``all_classes`` order). A candidate that is a proper substring of the gold
    class name is then dropped, with LongBench's reference quirk kept: its loop removes items from
    the list it is walking, so the candidate right after a dropped one is never examined. The
    score is ``1 / len(candidates)`` when the gold class is a candidate, else 0.
    """
    if all_classes is None:
        raise ValueError("classification_score needs the task's all_classes")
    candidates = [name for name in all_classes if name in prediction]
    position = 0
    while position < len(candidates):
        term = candidates[position]
        position += 1
        if term in ground_truth and term != ground_truth:
            candidates.remove(term)
    if ground_truth in candidates:
        return 1.0 / len(candidates)
    return 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """passage_retrieval_en, in [0, 1]: the share of the numbers in the prediction equal to the gold id.

    The gold id is the first ``Paragraph (\\d+)`` match in the ground truth; numbers are compared
    as digit strings ("03" is not "3"). A prediction without numbers scores 0.
    """
    match = _PARAGRAPH.search(ground_truth)
    if match is None:
        raise ValueError(f"retrieval ground truth has no 'Paragraph N': {ground_truth!r}")
    return _share_equal(prediction, match.group(1))


def count_score(prediction: str, ground_truth: str) -> float:
    """passage_count, in [0, 1]: the share of the numbers in the prediction equal to the answer."""
    return _share_equal(prediction, str(ground_truth))


def fuzzy_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` as LongBench runs it, in whole percent (0-100).

    LongBench's requirements install ``fuzzywuzzy`` without ``python-Levenshtein``, so its ratio is
    difflib's: ``SequenceMatcher(None, a, b).ratio()`` (matching blocks, with the autojunk heuristic
    for a ``b`` of 200+ characters), times 100, rounded with Python's ``round``. Equal strings score
    100 and otherwise an empty string scores 0, checked in that order as fuzzywuzzy does. This is
    not an edit-distance ratio: on long lines the two can differ by tens of points.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """lcc and repobench-p, in [0, 1]: fuzzy ratio of the first code line of the prediction to the gold line.

    After leading newlines are stripped, the first line containing none of '`', '#' and '//'
    (anywhere in the line, as in LongBench's reference code) is compared; with no such line the
    empty string is. The ratio is `fuzzy_ratio` (LongBench's ``fuzz.ratio``) / 100.
    """
    lines = prediction.lstrip("\n").split("\n")
    code = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzzy_ratio(code, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}
"""Metric name -> scoring function of one (prediction, gold answer) pair, in [0, 1]."""

TASK_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
"""Each English LongBench v1 task -> the name (a key of `METRICS`) of its metric."""

FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Tasks whose prediction is cut to its first line before scoring (LongBench eval.py)."""


def base_task(task_name: str) -> str:
    """The LongBench v1 task behind a name: ``hotpotqa_e`` (LongBench-E) -> ``hotpotqa``."""
    if task_name in TASK_METRIC:
        return task_name
    if task_name.endswith("_e") and task_name[:-2] in TASK_METRIC:
        return task_name[:-2]
    known = ", ".join(TASK_METRIC)
    raise KeyError(f"unknown LongBench task {task_name!r} (English tasks: {known}; add _e for LongBench-E)")


def first_line(prediction: str) -> str:
    """The first line of a prediction after leading newlines are stripped."""
    return prediction.lstrip("\n").split("\n")[0]


def score_prediction(
    task_name: str,
    prediction: str,
    answers: Iterable[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """One sample's LongBench score in [0, 100] (0-100 per sample, as LongBench tables print it).

    Applies the task's metric (`TASK_METRIC`) after LongBench's first-line rule (`FIRST_LINE_TASKS`),
    takes the maximum over the gold ``answers`` (0 when there is none) and multiplies by 100.
    ``task_name`` may carry the LongBench-E suffix ``_e``.
    """
    task = base_task(task_name)
    metric = METRICS[TASK_METRIC[task]]
    if task in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    best = 0.0
    for gold in answers:
        if metric is classification_score:
            value = classification_score(prediction, gold, all_classes)
        else:
            value = metric(prediction, gold)
        best = max(best, value)
    return 100.0 * best


def task_score(sample_scores: Iterable[float]) -> float:
    """A task's LongBench score: the mean of per-sample scores that are already in [0, 100].

    LongBench rounds this to two decimals for its tables; no rounding happens here. NaN when empty.
    """
    values = list(sample_scores)
    return sum(values) / len(values) if values else math.nan


LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")
"""LongBench-E length intervals, by the sample's ``length`` field (words for English data)."""


def length_bucket(length: float) -> str:
    """LongBench-E bucket of a sample: under 4000 -> "0-4k", under 8000 -> "4-8k", else "8k+" (eval.py --e)."""
    if length < 4000:
        return LENGTH_BUCKETS[0]
    if length < 8000:
        return LENGTH_BUCKETS[1]
    return LENGTH_BUCKETS[2]


def bucket_metric(metric: str, bucket: str) -> str:
    """The name under which a LongBench-E sample's score is repeated for its bucket: ``qa_f1[0-4k]``."""
    return f"{metric}[{bucket}]"
