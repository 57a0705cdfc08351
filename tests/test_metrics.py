"""The LongBench metrics, pinned with hand-worked cases (LongBench: Bai et al. 2023, THUDM/LongBench)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest

from kvstream.tasks.metrics import (
    FIRST_LINE_TASKS,
    METRICS,
    TASK_METRIC,
    base_task,
    bucket_metric,
    classification_score,
    code_sim_score,
    count_score,
    first_line,
    lcs_length,
    length_bucket,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    score_prediction,
    task_score,
    token_f1,
)

ENGLISH_TASKS = [
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
]


# normalize_answer and token F1


def test_normalize_lowercases_strips_punctuation_articles_and_spaces():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day\n keeps THE doctor away.") == "apple day keeps doctor away"


def test_normalize_keeps_articles_inside_words():
    assert normalize_answer("Theater and another anthem") == "theater and another anthem"


def test_normalize_removes_punctuation_before_articles():
    # "a-b" loses its hyphen first and becomes the single word "ab"; "(the)" becomes the article "the".
    assert normalize_answer("a-b (the) end") == "ab end"


def test_qa_f1_hand_worked():
    # prediction tokens [cat, sat]; gold tokens [cat, sat, down]; overlap 2
    # precision 2/2, recall 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert qa_f1_score("The cat sat", "a cat sat down") == pytest.approx(0.8)


def test_qa_f1_counts_tokens_as_multisets():
    # [cat, cat] vs [cat]: overlap 1, precision 1/2, recall 1, F1 = 2/3
    assert qa_f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1(["a", "b", "b"], ["b", "b", "c", "d"]) == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))


def test_qa_f1_no_overlap_and_empty():
    assert qa_f1_score("dog", "cat") == 0.0
    assert qa_f1_score("", "cat") == 0.0
    assert qa_f1_score("The", "a") == 0.0  # both normalize to nothing


def test_qa_f1_exact_match_after_normalization():
    assert qa_f1_score("The Eiffel Tower.", "eiffel tower") == 1.0


# ROUGE-L


def test_lcs_length():
    assert lcs_length(list("abcd"), list("acde")) == 3
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("xyz"), list("zyx")) == 1
    assert lcs_length(["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "is", "on", "the", "mat"]) == 5


def test_rouge_l_single_sentence_distinct_words():
    # LCS of [a b c d] and [a c d e] is [a c d]: 3 words out of 4 on each side -> P = R = 3/4
    assert rouge_l_score("a b c d", "a c d e") == pytest.approx(0.75, abs=1e-7)


def test_rouge_l_counts_distinct_words_like_longbench():
    # LCS "the cat on the mat" has 5 tokens but 4 distinct words; each side has 5 distinct words.
    # LongBench's rouge package gives 4/5 (the textbook LCS F1 would be 5/6).
    assert rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_l_summary_level_union_over_sentences():
    # prediction sentences [a b] and [c d]; reference sentence [a c d]
    # LCS words: {a} and {c, d} -> union 3; m = 3 reference words, n = 4 prediction words
    # R = 1, P = 3/4, F = 2 * 0.75 / 1.75 = 6/7
    assert rouge_l_score("a b. c d", "a c d") == pytest.approx(6 / 7, abs=1e-7)


def test_rouge_l_is_case_and_punctuation_sensitive():
    # "Cat" differs from "cat"; "sat," differs from "sat": only "the" is common (P = R = 1/3)
    assert rouge_l_score("the Cat sat,", "the cat sat") == pytest.approx(1 / 3, abs=1e-7)


def test_rouge_l_identical_is_one_up_to_the_epsilon():
    assert rouge_l_score("a short summary. with two sentences", "a short summary. with two sentences") == (
        pytest.approx(1.0, abs=1e-7)
    )
    assert rouge_l_score("same", "same") < 1.0  # the 1e-8 in the denominator, as in LongBench


def test_rouge_l_empty_is_zero():
    assert rouge_l_score("", "the cat") == 0.0
    assert rouge_l_score("...", "the cat") == 0.0
    assert rouge_l_score("the cat", "") == 0.0


# classification (trec)

TREC_CLASSES = ["Number", "Location", "Other entity", "entity", "Animal"]


def test_classification_exact_class():
    assert classification_score("Number", "Number", TREC_CLASSES) == 1.0


def test_classification_splits_credit_between_matched_classes():
    assert classification_score("Number or Location", "Number", TREC_CLASSES) == 0.5


def test_classification_gold_not_matched():
    assert classification_score("Animal", "Number", TREC_CLASSES) == 0.0
    assert classification_score("no idea", "Number", TREC_CLASSES) == 0.0


def test_classification_drops_classes_inside_the_gold_name():
    # "entity" also matches but is a proper substring of the gold "Other entity": dropped -> 1/1
    assert classification_score("Other entity", "Other entity", TREC_CLASSES) == 1.0
    # with another gold, "entity" is a real competitor: matches Other entity, entity -> 0 for Number
    assert classification_score("Other entity", "Number", TREC_CLASSES) == 0.0


def test_classification_keeps_longbench_removal_quirk():
    # matches in order: ab, a, b, x. "a" is dropped (inside gold "ab"); LongBench's loop then skips
    # "b", which stays although it is inside "ab" too -> candidates ab, b, x -> 1/3 (not 1/2).
    assert classification_score("ab x", "ab", ["ab", "a", "b", "x"]) == pytest.approx(1 / 3)


def test_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("Number", "Number", None)


# retrieval and count


def test_retrieval_score():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("The answer is Paragraph 3 and Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("Paragraph 30", "Paragraph 3") == 0.0
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_score("3, 3, 7", "Paragraph 3") == pytest.approx(2 / 3)


def test_retrieval_needs_paragraph_in_gold():
    with pytest.raises(ValueError, match="Paragraph"):
        retrieval_score("3", "the third one")


def test_count_score():
    assert count_score("7", "7") == 1.0
    assert count_score("There are 7 unique paragraphs out of 12", "7") == 0.5
    assert count_score("none", "7") == 0.0
    assert count_score("07", "7") == 0.0  # digit strings are compared, as in LongBench
    assert count_score("7", 7) == 1.0


# code similarity


def test_code_sim_skips_fences_and_comments():
    assert code_sim_score("```python\nx = 1\n```", "x = 1") == 1.0
    assert code_sim_score("\n\n# the next line\nreturn a + b", "return a + b") == 1.0
    # a line *containing* '//' or '#' anywhere is skipped too (LongBench's reference rule)
    assert code_sim_score("foo(x); // call\nbar(y);", "bar(y);") == 1.0
    assert code_sim_score("print('#')\nprint(1)", "print(1)") == 1.0


def test_code_sim_only_the_first_code_line_counts():
    assert code_sim_score("x = 1\ny = 2", "y = 2") == pytest.approx(0.6)  # "x = 1" vs "y = 2": 3 of 5 chars


def test_code_sim_fuzzy_ratio_rounded_to_a_percent():
    # difflib matching blocks: "abc" of "abcd" / "abce" -> 2 * 3 / 8 = 0.75
    assert code_sim_score("abcd", "abce") == 0.75
    # 2 * 2 / 6 = 66.67% -> 67% -> 0.67
    assert code_sim_score("abc", "abd") == 0.67


def test_code_sim_without_code_line_scores_empty_string():
    assert code_sim_score("# only a comment", "x = 1") == 0.0
    assert code_sim_score("# only a comment", "") == 1.0  # fuzzywuzzy: equal strings score 100 before any check


def test_code_sim_is_difflib_not_edit_distance():
    # The gold line has 200+ characters, so difflib's autojunk heuristic drops its frequent characters
    # (spaces, letters) from matching: LongBench's fuzzywuzzy gives 41 where an edit-distance ratio gives 81.
    prediction = (
        "        return self._session.request(method, url, params=params, data=data, headers=headers, "
        "cookies=cookies, files=files, auth=auth, timeout=timeout, allow_redirects=allow_redirects, proxies=proxies)"
    )
    gold = (
        "        return self.session.request(method=method, url=url, params=params, data=data, "
        "headers=self._merge_headers(headers), cookies=cookies, files=files, auth=auth or self.auth, "
        "timeout=timeout or self.timeout, allow_redirects=True)"
    )
    assert code_sim_score(prediction, gold) == 0.41


# score_prediction


def test_every_english_task_has_a_metric():
    assert sorted(TASK_METRIC) == sorted(ENGLISH_TASKS)
    assert set(TASK_METRIC.values()) == set(METRICS)
    assert TASK_METRIC["narrativeqa"] == "qa_f1"
    assert TASK_METRIC["triviaqa"] == "qa_f1"
    assert TASK_METRIC["samsum"] == "rouge_l"
    assert TASK_METRIC["gov_report"] == "rouge_l"
    assert TASK_METRIC["trec"] == "classification"
    assert TASK_METRIC["passage_retrieval_en"] == "retrieval"
    assert TASK_METRIC["passage_count"] == "count"
    assert TASK_METRIC["lcc"] == TASK_METRIC["repobench-p"] == "code_sim"
    assert frozenset({"trec", "triviaqa", "samsum", "lsht"}) == FIRST_LINE_TASKS


def test_score_is_0_to_100_and_max_over_answers():
    assert score_prediction("hotpotqa", "Paris", ["London", "Paris"]) == 100.0
    assert score_prediction("hotpotqa", "Paris, France", ["Paris"]) == pytest.approx(200 / 3)
    assert score_prediction("narrativeqa", "The cat sat", ["dog", "a cat sat down"]) == pytest.approx(80.0)
    assert score_prediction("hotpotqa", "anything", []) == 0.0


def test_first_line_rule_for_trec():
    prediction = "Number\nLocation"
    assert score_prediction("trec", prediction, ["Number"], TREC_CLASSES) == 100.0
    # without the first-line rule both classes would match and the sample would score 50
    assert classification_score(prediction, "Number", TREC_CLASSES) == 0.5


def test_first_line_rule_for_triviaqa_and_samsum_only():
    assert score_prediction("triviaqa", "\nParis\nLondon is big", ["Paris"]) == 100.0
    assert score_prediction("samsum", "a b c d\nmore text", ["a c d e"]) == pytest.approx(75.0, abs=1e-5)
    # hotpotqa scores the whole prediction: [paris, london] vs [paris] -> F1 2/3
    assert score_prediction("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(200 / 3)
    assert first_line("\n\nfirst\nsecond") == "first"


def test_score_prediction_other_metrics():
    assert score_prediction("passage_retrieval_en", "Paragraph 3", ["Paragraph 3"]) == 100.0
    assert score_prediction("passage_count", "7 or 8", ["7"]) == 50.0
    assert score_prediction("lcc", "# comment\nx = 1", ["x = 1"]) == 100.0
    assert score_prediction("gov_report", "a b c d", ["a c d e"]) == pytest.approx(75.0, abs=1e-5)


def test_longbench_e_names_use_the_base_metric():
    assert base_task("hotpotqa_e") == "hotpotqa"
    assert base_task("repobench-p_e") == "repobench-p"
    assert base_task("multifieldqa_en") == "multifieldqa_en"
    assert score_prediction("trec_e", "Number\nAnimal", ["Number"], TREC_CLASSES) == 100.0
    with pytest.raises(KeyError):
        score_prediction("no_such_task", "x", ["x"])


def test_aggregates():
    assert task_score([100.0, 50.0, 0.0]) == 50.0
    assert math.isnan(task_score([]))
    assert length_bucket(0) == "0-4k"
    assert length_bucket(3999) == "0-4k"
    assert length_bucket(4000) == "4-8k"
    assert length_bucket(7999) == "4-8k"
    assert length_bucket(8000) == "8k+"
    assert bucket_metric("qa_f1", "8k+") == "qa_f1[8k+]"


# cross-checks against the packages LongBench's metrics.py calls (test-only dependencies, pinned in `dev`)

CODE_PAIRS = [
    ("        if not os.path.exists(path):", "        if os.path.isdir(path) and not os.listdir(path):"),
    ("    def forward(self, x):", "    def forward(self, hidden_states, attention_mask=None):"),
    (
        "        self.conv1 = nn.Conv2d(3, 64, kernel_size=3)",
        "        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)",
    ),
    ("            result.append(item)", "            results.extend(items)"),
    (
        "return new ArrayList<>(map.values());",
        "        return Collections.unmodifiableList(new ArrayList<String>(this.values));",
    ),
    ("public void setName(String name) {", "    public void setName(final String newName) {"),
    ("for (int i = 0; i < n; i++) {", "for (int j = 0; j < count; ++j) {"),
    ("x = np.zeros((n, m))", "x = np.ones((m, n), dtype=np.float32)"),
    ("import torch", "import torch"),
    ("", "import torch"),
    (
        "        return self._session.request(method, url, params=params, data=data, headers=headers, "
        "cookies=cookies, files=files, auth=auth, timeout=timeout, allow_redirects=allow_redirects, proxies=proxies)",
        "        return self.session.request(method=method, url=url, params=params, data=data, "
        "headers=self._merge_headers(headers), cookies=cookies, files=files, auth=auth or self.auth, "
        "timeout=timeout or self.timeout, allow_redirects=True)",
    ),
]

SUMMARIES = [
    (
        "Amanda baked cookies and will bring Jerry some tomorrow.",
        "Amanda baked cookies and will bring Jerry some tomorrow.",
    ),
    ("Amanda will bring Jerry cookies tomorrow.", "Amanda baked cookies and will bring Jerry some tomorrow."),
    (
        "Olivia and Olivier are voting for liberals. They think the election is close.",
        "Olivia and Olivier are voting for liberals in this election.",
    ),
    (
        "The report finds that DOD did not fully assess the costs. GAO recommends that DOD update its estimates. "
        "DOD concurred with the recommendation",
        "GAO found that DOD has not assessed the full costs of the program. GAO recommends that DOD update its "
        "cost estimates and report them to Congress. DOD concurred.",
    ),
    ("Tim is late again\nhe missed the bus", "Tim missed the bus and is late again."),
    ("   ", "Kim has to finish the project by Friday."),
    ("...", "Kim has to finish the project by Friday."),
    ("Kim, Kim, Kim. Kim! Kim?", "Kim has to finish the project by Friday. Kim is stressed."),
]


def _fuzzywuzzy() -> Any:
    """``fuzzywuzzy.fuzz``, imported without its warning about the missing python-Levenshtein."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    return fuzz


def _official_code_sim(prediction: str, gold: str) -> float:
    """LongBench's code_sim_score, from its definition: first line without '`', '#', '//' after
    leading newlines, then fuzzywuzzy's ratio / 100."""
    fuzz = _fuzzywuzzy()
    lines = prediction.lstrip("\n").split("\n")
    code = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz.ratio(code, gold) / 100


def _official_rouge(prediction: str, gold: str) -> float:
    """LongBench's rouge_score: the ``rouge`` package's ROUGE-L F of one pair, 0 when it raises."""
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"]
    except Exception:  # LongBench's bare except: empty and all-dot texts score 0
        return 0.0


def test_reference_fuzzywuzzy_runs_as_in_longbench():
    """LongBench's requirements install fuzzywuzzy without python-Levenshtein: its ratio is difflib's."""
    import difflib

    assert _fuzzywuzzy().SequenceMatcher is difflib.SequenceMatcher, (
        "uninstall python-Levenshtein to compare with LongBench"
    )


@pytest.mark.parametrize(("prediction", "gold"), CODE_PAIRS)
def test_code_sim_matches_fuzzywuzzy(prediction, gold):
    assert code_sim_score(prediction, gold) == _official_code_sim(prediction, gold)
    fenced = f"\n```python\n# next line\n{prediction}\n```"
    assert code_sim_score(fenced, gold) == _official_code_sim(fenced, gold)
    for task in ("lcc", "repobench-p_e"):
        assert score_prediction(task, fenced, [gold, "pass"]) == pytest.approx(
            100 * max(_official_code_sim(fenced, gold), _official_code_sim(fenced, "pass"))
        )


@pytest.mark.parametrize(("prediction", "gold"), SUMMARIES)
def test_rouge_l_matches_the_rouge_package(prediction, gold):
    assert rouge_l_score(prediction, gold) == pytest.approx(_official_rouge(prediction, gold), abs=1e-12)
    assert score_prediction("gov_report", prediction, [gold]) == pytest.approx(100 * _official_rouge(prediction, gold))
    # samsum: LongBench's eval.py scores the first line (after leading newlines) only
    first = prediction.lstrip("\n").split("\n")[0]
    assert score_prediction("samsum", "\n" + prediction, [gold]) == pytest.approx(100 * _official_rouge(first, gold))
