"""LongBench v1 and LongBench-E English tasks: official prompts, lengths, truncation and scoring.

Facts taken from LongBench (Bai et al. 2023, github THUDM/LongBench, folder ``LongBench/``):
the per-task prompt templates (``config/dataset2prompt.json``) and generation lengths
(``config/dataset2maxlen.json``), the middle truncation and the chat-template rule of ``pred.py``,
the metrics and length buckets of ``eval.py`` (see `kvstream.tasks.metrics`), the data format
(one JSONL file per task with ``input, context, answers, length, dataset, language, all_classes,
_id``) and the list of tasks LongBench-E covers.

How a sample's prompt is built (`build_prompt`), as in LongBench's ``pred.py``:

1. ``DATASET2PROMPT[task].format(context=..., input=...)``;
2. tokenized with the tokenizer's own special tokens; when longer than the input budget, only the
   first ``budget // 2`` and the last ``budget // 2`` tokens are kept, each half decoded back to
   text with special tokens skipped and the two texts concatenated;
3. unless the task is one of `NO_CHAT_TEMPLATE_TASKS`, and when the tokenizer has a chat
   template, the text becomes the single user message of ``apply_chat_template`` with the
   generation prompt added (the template supplies any BOS; no second one is added);
4. tokenized again: these ids are what the model prefills.

The input budget is ``TaskOptions.length`` when given (LongBench's ``max_length``). Otherwise it
is the model context (``tokenizer.model_max_length`` when sane, else 8192) minus the task's
generation length minus the tokens the chat template adds around the message, so that prompt and
answer fit the context.

Greedy decoding for ``DATASET2MAXLEN[task]`` new tokens is the engine's job (`RunContext.generate`).
samsum (and samsum_e) is generated as ``pred.py`` generates it (`generation_rules`): the newline
token is a second EOS and neither EOS nor newline may be the first token, so a model that would open
with a newline writes its first line instead of being scored on an empty one.

A LongBench-E sample's score is also given under its length bucket's metric (``qa_f1[4-8k]``, see
`kvstream.tasks.metrics.bucket_metric`): the run summary and ``kvstream report`` then carry each
bucket's mean and sample count, as ``eval.py --e`` reports them (empty buckets have no row).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstream.tasks.base import Row, RunContext, Sample, TaskDataMissing, TaskOptions
from kvstream.tasks.metrics import TASK_METRIC, base_task, bucket_metric, length_bucket, score_prediction

LONGBENCH_TASKS: tuple[str, ...] = (
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
)
"""The English (and code) tasks of LongBench v1."""

LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
"""The English tasks that LongBench-E has; their files and task names carry the suffix ``_e``."""

DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a "
        "question. Answer the question asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as "
        "concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\n'
        "Article: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\n'
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the "
        "answer and do not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the "
        "report.\n\n"
        "Report:\n"
        "{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or "
        "instruction. Answer the query in one or more sentences.\n\n"
        "Transcript:\n"
        "{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more "
        "sentences.\n\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n"
        "{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do "
        "not output any other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be "
        "duplicates. Please carefully read these paragraphs and determine how many unique "
        "paragraphs there are after removing duplicates. In other words, how many "
        "non-repeating paragraphs are there in total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The "
        "output format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
        "which paragraph the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer "
        'format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
"""LongBench's prompt template of each English task (verbatim, "asconcisely" included)."""

DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}
"""LongBench's generation length (new tokens) of each English task."""

NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
"""Tasks whose prompt is given to the model as raw text even when it is a chat model (LongBench)."""

NEWLINE_STOP_TASKS = frozenset({"samsum"})
"""Tasks ``pred.py`` generates with the newline token as a second EOS and ``min_length`` one past the
prompt (its guard against models that endlessly repeat "\\nDialogue"); for LongBench-E too."""

DEFAULT_CONTEXT = 8192
"""Model context assumed when the tokenizer does not state a sane ``model_max_length``."""

_MAX_SANE_CONTEXT = 10_000_000

_DESCRIPTIONS: dict[str, str] = {
    "narrativeqa": "single-document QA over books and movie scripts",
    "qasper": "single-document QA over NLP papers",
    "multifieldqa_en": "single-document QA over documents from several fields",
    "hotpotqa": "multi-document (multi-hop) QA over Wikipedia passages",
    "2wikimqa": "multi-document (multi-hop) QA over Wikipedia passages",
    "musique": "multi-document (multi-hop) QA over Wikipedia passages",
    "gov_report": "summarization of government reports",
    "qmsum": "query-based summarization of meeting transcripts",
    "multi_news": "multi-document summarization of news",
    "trec": "few-shot question classification",
    "triviaqa": "few-shot reading-comprehension QA",
    "samsum": "few-shot dialogue summarization",
    "passage_count": "count the distinct paragraphs among shuffled duplicates",
    "passage_retrieval_en": "find which of 30 paragraphs an abstract comes from",
    "lcc": "code completion of the next line in a long file",
    "repobench-p": "repository-level code completion of the next line",
}


def default_data_dir() -> Path:
    """Where LongBench JSONL files live by default: the kvstream data store's ``longbench`` folder.

    Falls back to ``$KVSTREAM_HOME/data/longbench`` (``~/.cache/kvstream/data/longbench``) when the
    data-store module cannot be imported.
    """
    try:
        from kvstream.data.store import data_dir
    except ImportError:
        home = Path(os.environ.get("KVSTREAM_HOME", Path.home() / ".cache" / "kvstream"))
        return home / "data" / "longbench"
    return Path(data_dir()) / "longbench"


def _candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    if data_dir is None:
        root = default_data_dir()
        return [root, root / "data"]
    root = Path(data_dir)
    return [root, root / "data", root / "longbench", root / "longbench" / "data"]


def find_data_file(task_name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ``<task>.jsonl`` file of a task, or `TaskDataMissing` naming the download to run.

    ``data_dir`` may be the folder of LongBench files itself, a store root holding a ``longbench``
    folder, or either with the ``data/`` folder that LongBench's ``data.zip`` unpacks to.
    """
    filename = f"{task_name}.jsonl"
    candidates = _candidate_dirs(data_dir)
    for folder in candidates:
        path = folder / filename
        if path.is_file():
            return path
    looked = ", ".join(str(folder) for folder in candidates)
    raise TaskDataMissing(
        f"LongBench data for task {task_name!r} not found ({filename} in {looked}); "
        "run `kvstream download longbench` first (it needs access to the Hugging Face Hub, "
        "dataset THUDM/LongBench)"
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, in file order (blank lines skipped)."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records


def select_records(records: list[dict[str, Any]], count: int | None, seed: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """Which records to evaluate, as ``(index in file, record)`` pairs in file order.

    All of them when ``count`` is None or not smaller than the file. Otherwise the first ``count``
    records when ``seed`` is 0 (the default), or ``count`` records drawn with ``random.Random(seed)``
    for any other seed; both are deterministic, so a quantized run and its full-precision baseline
    see the same samples.
    """
    indexed = list(enumerate(records))
    if count is None or count >= len(indexed):
        return indexed
    if count < 0:
        raise ValueError(f"sample count must be >= 0, got {count}")
    if seed == 0:
        return indexed[:count]
    chosen = sorted(random.Random(seed).sample(range(len(indexed)), count))
    return [indexed[i] for i in chosen]


def format_prompt(task_name: str, record: dict[str, Any]) -> str:
    """LongBench's prompt of one record: the task template filled with its context and input."""
    template = DATASET2PROMPT[base_task(task_name)]
    return template.format(context=record.get("context") or "", input=record.get("input") or "")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can format chat messages."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def uses_chat_template(task_name: str, tokenizer: Any) -> bool:
    """LongBench's rule: chat-format the prompt unless the task is few-shot or code, if the model can."""
    return base_task(task_name) not in NO_CHAT_TEMPLATE_TASKS and has_chat_template(tokenizer)


def apply_chat(tokenizer: Any, text: str) -> str:
    """``text`` as the single user message of the tokenizer's chat template, generation prompt added."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def chat_overhead(tokenizer: Any) -> int:
    """Tokens the chat template adds around a user message (0 without a chat template)."""
    if not has_chat_template(tokenizer):
        return 0
    return len(tokenizer.encode(apply_chat(tokenizer, ""), add_special_tokens=False))


def model_context(tokenizer: Any) -> int:
    """The model context in tokens: ``tokenizer.model_max_length`` when sane, else `DEFAULT_CONTEXT`."""
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and not isinstance(length, bool) and 0 < length <= _MAX_SANE_CONTEXT:
        return length
    return DEFAULT_CONTEXT


def input_budget(task_name: str, options: TaskOptions, tokenizer: Any) -> int:
    """Most prompt tokens before the middle is cut: ``options.length``, or what the context leaves.

    Without ``options.length``: model context - generation length - chat-template overhead (when
    the task uses the chat template).
    """
    if options.length is not None:
        budget = options.length
    else:
        task = base_task(task_name)
        budget = model_context(tokenizer) - DATASET2MAXLEN[task]
        if uses_chat_template(task, tokenizer):
            budget -= chat_overhead(tokenizer)
    if budget < 2:
        raise ValueError(f"LongBench input budget must be at least 2 tokens, got {budget}")
    return budget


def middle_truncate_ids(ids: list[int], budget: int) -> list[int]:
    """``ids`` unchanged when at most ``budget`` long, else its first and last ``budget // 2`` ids."""
    if budget < 2:
        raise ValueError(f"budget must be at least 2 tokens, got {budget}")
    if len(ids) <= budget:
        return list(ids)
    half = budget // 2
    return list(ids[:half]) + list(ids[len(ids) - half :])


def newline_token_id(tokenizer: Any) -> int:
    """The stop token ``pred.py`` adds for samsum: the last id of ``"\\n"`` encoded without special tokens."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def generation_rules(task_name: str, tokenizer: Any) -> dict[str, Any]:
    """The keyword arguments of `RunContext.generate` that LongBench's ``pred.py`` sets for a task.

    samsum: stop at the tokenizer's EOS or at the newline token, neither allowed as the first new
    token (``eos_token_id=[eos, newline]`` with ``min_length=context_length + 1``). Others: none.
    """
    if base_task(task_name) not in NEWLINE_STOP_TASKS:
        return {}
    stops = {newline_token_id(tokenizer)}
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        stops.add(eos)
    return {"eos_token_ids": stops, "min_new_tokens": 1}


@dataclass
class BuiltPrompt:
    """A LongBench prompt ready to prefill."""

    text: str
    """The final prompt text (truncated and chat-formatted as the task requires)."""
    ids: list[int]
    """Its token ids: what the model prefills."""
    raw_tokens: int
    """Tokens of the template-filled prompt before truncation (special tokens included)."""
    truncated: bool
    chat_template: bool


def build_prompt(task_name: str, record: dict[str, Any], tokenizer: Any, budget: int) -> BuiltPrompt:
    """LongBench's prompt of one record under an input budget (see the module docstring for the steps).

    Truncation works as LongBench's does: on token ids, then back to text (each kept half decoded
    with special tokens skipped), so the final ids come from re-tokenizing that text and may differ
    from the kept ids by a few tokens at the seam.
    """
    text = format_prompt(task_name, record)
    ids = list(tokenizer.encode(text))
    raw_tokens = len(ids)
    truncated = raw_tokens > budget
    if truncated:
        half = budget // 2
        text = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[raw_tokens - half :], skip_special_tokens=True
        )
    chat = uses_chat_template(task_name, tokenizer)
    if chat:
        text = apply_chat(tokenizer, text)
        final_ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        final_ids = list(tokenizer.encode(text))
    return BuiltPrompt(text=text, ids=final_ids, raw_tokens=raw_tokens, truncated=truncated, chat_template=chat)


class LongBenchTask:
    """A LongBench v1 (or LongBench-E, name ``<task>_e``) English task: official prompt, metric and length."""

    def __init__(self, name: str) -> None:
        task = base_task(name)
        if name != task and task not in LONGBENCH_E_TASKS:
            raise KeyError(f"LongBench-E has no task {task!r}")
        self.name = name
        self.task = task
        """The LongBench v1 task behind the name (``hotpotqa`` for ``hotpotqa_e``)."""
        self.longbench_e = name != task
        self.metric = TASK_METRIC[task]
        self.per_sample_metric = self.metric
        self.max_new_tokens = DATASET2MAXLEN[task]
        prefix = "LongBench-E" if self.longbench_e else "LongBench"
        buckets = ", scored per length bucket (0-4k, 4-8k, 8k+)" if self.longbench_e else ""
        self.description = f"{prefix} {task}: {_DESCRIPTIONS[task]} ({self.metric}, 0-100{buckets})"
        self.__doc__ = self.description

    def __repr__(self) -> str:
        return f"LongBenchTask({self.name!r})"

    def samples(self, options: TaskOptions, tokenizer: Any) -> list[Sample]:
        """Read ``<name>.jsonl``, pick the samples (see `select_records`) and build their prompts."""
        path = find_data_file(self.name, options.data_dir)
        chosen = select_records(read_jsonl(path), options.samples, options.seed)
        budget = input_budget(self.name, options, tokenizer)
        samples = []
        for index, record in chosen:
            prompt = build_prompt(self.name, record, tokenizer, budget)
            length = record.get("length")
            answers = record.get("answers") or []
            if isinstance(answers, str):
                answers = [answers]
            meta = {
                "task": self.name,
                "index": index,
                "length": length,
                "bucket": length_bucket(length) if isinstance(length, int | float) else None,
                "all_classes": record.get("all_classes"),
                "max_new_tokens": self.max_new_tokens,
                "budget": budget,
                "raw_tokens": prompt.raw_tokens,
                "truncated": prompt.truncated,
                "chat_template": prompt.chat_template,
                "prompt_ids": prompt.ids,
            }
            sample_id = str(record.get("_id") or f"{self.name}-{index}")
            samples.append(Sample(id=sample_id, prompt=prompt.text, answers=list(answers), meta=meta))
        return samples

    def run(self, ctx: RunContext, sample: Sample) -> list[Row]:
        """Generate the answer greedily (with `generation_rules`) and score it: a row of the task's metric, 0-100.

        ``extra`` holds the prediction, the gold answers (JSON), the prompt size, whether it was
        truncated, the sample's ``length`` and its LongBench-E ``bucket``. A LongBench-E task adds
        the same score under the bucket's metric (``qa_f1[0-4k]``), so summaries group by bucket.
        """
        ids = sample.meta.get("prompt_ids")
        if ids is None:
            if sample.meta.get("chat_template"):
                ids = ctx.tokenizer.encode(sample.prompt, add_special_tokens=False)
            else:
                ids = ctx.tokenizer.encode(sample.prompt)
        ids = list(ids)
        max_new_tokens = int(sample.meta.get("max_new_tokens", self.max_new_tokens))
        prediction = ctx.generate(ids, max_new_tokens, **generation_rules(self.task, ctx.tokenizer))
        value = score_prediction(self.task, prediction, sample.answers, sample.meta.get("all_classes"))
        extra = {
            "task": self.name,
            "prediction": prediction,
            "answers": json.dumps(sample.answers, ensure_ascii=False),
            "prompt_tokens": len(ids),
            "max_new_tokens": max_new_tokens,
            "truncated": bool(sample.meta.get("truncated", False)),
            "length": sample.meta.get("length"),
            "bucket": sample.meta.get("bucket"),
        }
        rows = [Row(metric=self.metric, value=value, sample=sample.id, extra=extra)]
        if self.longbench_e and extra["bucket"] is not None:
            by_bucket = {"bucket": extra["bucket"], "length": extra["length"]}
            rows.append(
                Row(metric=bucket_metric(self.metric, extra["bucket"]), value=value, sample=sample.id, extra=by_bucket)
            )
        return rows


narrativeqa = LongBenchTask("narrativeqa")
qasper = LongBenchTask("qasper")
multifieldqa_en = LongBenchTask("multifieldqa_en")
hotpotqa = LongBenchTask("hotpotqa")
twowikimqa = LongBenchTask("2wikimqa")
musique = LongBenchTask("musique")
gov_report = LongBenchTask("gov_report")
qmsum = LongBenchTask("qmsum")
multi_news = LongBenchTask("multi_news")
trec = LongBenchTask("trec")
triviaqa = LongBenchTask("triviaqa")
samsum = LongBenchTask("samsum")
passage_count = LongBenchTask("passage_count")
passage_retrieval_en = LongBenchTask("passage_retrieval_en")
lcc = LongBenchTask("lcc")
repobench_p = LongBenchTask("repobench-p")

qasper_e = LongBenchTask("qasper_e")
multifieldqa_en_e = LongBenchTask("multifieldqa_en_e")
hotpotqa_e = LongBenchTask("hotpotqa_e")
twowikimqa_e = LongBenchTask("2wikimqa_e")
gov_report_e = LongBenchTask("gov_report_e")
multi_news_e = LongBenchTask("multi_news_e")
trec_e = LongBenchTask("trec_e")
triviaqa_e = LongBenchTask("triviaqa_e")
samsum_e = LongBenchTask("samsum_e")
passage_count_e = LongBenchTask("passage_count_e")
passage_retrieval_en_e = LongBenchTask("passage_retrieval_en_e")
lcc_e = LongBenchTask("lcc_e")
repobench_p_e = LongBenchTask("repobench-p_e")


def attribute_name(task_name: str) -> str:
    """The module attribute holding a task: '-' becomes '_', a leading "2" becomes "two"."""
    name = task_name.replace("-", "_")
    return "two" + name[1:] if name.startswith("2") else name


TASKS: dict[str, LongBenchTask] = {
    name: globals()[attribute_name(name)] for name in (*LONGBENCH_TASKS, *(f"{task}_e" for task in LONGBENCH_E_TASKS))
}
"""Every LongBench task object by its registered name (16 LongBench v1 + 13 LongBench-E)."""
