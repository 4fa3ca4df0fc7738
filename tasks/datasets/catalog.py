"""The standard long-context data sets as kvbench tasks: names, where their data is looked for, their prompts.

A data-set task is `DATASET:SUBSET` (`ruler:niah_single_1`, `longbench:hotpotqa`, `longbench_e:hotpotqa`,
`infinitebench:kv_retrieval`, `needle:essays`, `kvpress:NAME`, `scbench:kv`) or a data set without subsets
(`longbench_v2`, `aime25`, `math500`). Its records are read, in this order, from:

1. `--data DATASET=PATH`: a file in the data set's schema, or a directory laid out as `kvbench data fetch` writes;
2. kvbench's data directory `$KVBENCH_CACHE_DIR/data/DATASET/` (default `~/.cache/kvbench/data/`), where
   `kvbench data fetch` writes its local copy;
3. the user's Hugging Face cache through `datasets`, offline (`HF_DATASETS_OFFLINE`, `HF_HUB_OFFLINE`): nothing is
   downloaded at run time.

Schemas (one JSON object per line; `data.json` as a JSON list for LongBench-v2) and files:

| data set | hub id (config, split) | file in a directory | fields |
|---|---|---|---|
| ruler | `simonjegou/ruler` (length, test; kvpress rows with `task`) | `TASK/validation.jsonl` or `TASK.jsonl` | `index, input, outputs, length[, answer_prefix]` |
| longbench | `THUDM/LongBench` (SUBSET, test) | `SUBSET.jsonl` | `input, context, answers, length, dataset, language, all_classes, _id` |
| longbench_e | `THUDM/LongBench` (SUBSET_e, test) | `SUBSET_e.jsonl` | as longbench |
| longbench_v2 | `THUDM/LongBench-v2` (-, train) | `data.json` or `data.jsonl` | `_id, domain, sub_domain, difficulty, length, question, choice_A..D, answer, context` |
| infinitebench | `xinrongzhang2022/InfiniteBench` (-, TASK) | `TASK.jsonl` | `id, context, input, answer, options` |
| needle | `alessiodevoto/paul_graham_essays` (-, test) | `essays.jsonl` | `context, needle, question, answer_prefix, max_new_tokens` |
| kvpress | none (any kvpress data set saved as rows) | `NAME.jsonl` | `context, question, answer_prefix, answer, max_new_tokens[, task]` |
| scbench | `microsoft/SCBench` (scbench_TASK, test) | `scbench_TASK.jsonl` | `id, context, multi_turns: [{input, answer}, ...]` |
| aime25 | `math-ai/aime25` (-, test); kvpress's `alessiodevoto/aime25` | `aime25.jsonl` | `problem, answer[, id]` or kvpress rows |
| math500 | `HuggingFaceH4/MATH-500` (-, test); kvpress's `alessiodevoto/math500` | `math500.jsonl` | `problem, answer[, solution, subject, level, unique_id]` or kvpress rows |

Prompts: LongBench's `config/dataset2prompt.json` templates and `dataset2maxlen.json` lengths; LongBench-v2's
`prompts/0shot.txt`; InfiniteBench's `src/prompt.py` templates for open models (`yarn_mistral_templates`) and
`eval_utils.py` generation lengths; RULER's inputs split with kvpress's patterns (`loaders.split_ruler_input`).
Each template is cut at its `{context}`: what comes before it and the context are prefilled (and compressed), the
rest is the question. Metrics: tasks/metrics/longbench.py, infinitebench.py, math_answer.py, scoring.py (RULER).

SCBench (shared contexts, several turns each): `scbench_kv`, `scbench_prefix_suffix` and `scbench_qa_eng` of
microsoft/MInference `scbench/eval_utils.py` (English, with clear metrics; the others are not supported). Each turn
is one question of its row's context, one sample each (`turn` numbers them within the row, `context_id` is the
row's), so the context is prefilled and compressed once per (method, budget) and every turn is answered from that
same compressed cache, restored between turns, query-agnostic. Prompt: the task's `multiturn_templates` entry cut
at its `{context}` (the context part is `multiturn_templates_scdq`'s; the rest, `\\n\\n{input}` or
`\\n\\nQuestion: {question}\\nAnswer:`, is the question); generation lengths `DATA_NAME_TO_MAX_NEW_TOKENS` (150, 150,
40). This is SCBench's multi-request mode (`--same_context_different_query`), not its default multi-turn mode: there
turn k's prompt also holds the earlier turns' questions and their reference answers (the golden `pre_ans`, as
assistant turns) in one growing conversation; here no turn sees another. Metrics:
tasks/metrics/scbench.py.

AIME25 and MATH500 (long generation: a short problem, a long reasoning answer) are laid out as kvpress lays them
(NVIDIA/kvpress `notebooks/kvpress_decoding_aime25.ipynb` and `evaluation/evaluate_decoding.py` pass `" "` as the
context and the problem as the question): the context is a single space, so nothing of the problem is compressed at
prefill, and the question is the problem, a line break and `BOXED_INSTRUCTION` (the DeepSeekMath / DeepSeek-R1
model cards' math prompt; kvpress's notebook and `evaluate_decoding.py` pass the bare problem, relying on a
reasoning model to box its answer unasked; a kvpress row whose question already asks for `\\boxed` gets no second
instruction). The generation allowance is kvpress's: 32000 tokens for AIME25 (`evaluate_decoding.py`,
`kvzap/evaluate_aime.py`) and 4096 for MATH500 (`--max_new_tokens 4096` in `evaluation/evaluate.sh` of its
decoding-evaluation branch, where math500 was added); a kvpress row's own `max_new_tokens` wins.
Under a length cap (`--lengths`, or the model's window) the allowance shrinks to what the cap leaves after the
prompt (`metadata["max_new_tokens_from"]` keeps the original); the problem is never cut. Each problem is its own
unit (its own context id), decoded like a separate kvpress run. Metric: `math_boxed` (tasks/metrics/math_answer.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvbench.tasks.datasets.loaders import (  # LongBench's dataset2maxlen.json lives there
    LONGBENCH_MAX_NEW_TOKENS,
    RULER_DEFAULTS,
    read_jsonl,
    split_ruler_input,
    task_family,
)
from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics.longbench import FIRST_LINE_SUBSETS
from kvbench.tasks.metrics.math_answer import BOXED_INSTRUCTION
from kvbench.tasks.sample import Sample

# LongBench config/dataset2prompt.json (the 16 English subsets, then the 5 Chinese ones).
LONGBENCH_PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
}
# The Chinese subsets (LongBench's `language` "zh"; none is in LongBench-E).
LONGBENCH_ZH_SUBSETS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
# LongBench eval.py dataset2metric.
LONGBENCH_METRICS: dict[str, str] = {
    **dict.fromkeys(
        ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"), "longbench_qa_f1"
    ),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "longbench_rouge"),
    "multifieldqa_zh": "longbench_qa_f1_zh",
    **dict.fromkeys(("dureader", "vcsum"), "longbench_rouge_zh"),
    "trec": "longbench_classification",
    "lsht": "longbench_classification",
    "passage_retrieval_en": "longbench_retrieval",
    "passage_retrieval_zh": "longbench_retrieval_zh",
    "passage_count": "longbench_count",
    "lcc": "longbench_code_sim",
    "repobench-p": "longbench_code_sim",
}
# pred.py: these are run without the chat template (few-shot and code completion).
LONGBENCH_NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# LongBench-E covers these subsets (`SUBSET_e` configs).
LONGBENCH_E_SUBSETS = (
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

LONGBENCH_V2_PROMPT = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
LONGBENCH_V2_MAX_NEW_TOKENS = 128

# InfiniteBench src/prompt.py yarn_mistral_templates (open models) and eval_utils.py's generation lengths.
INFINITEBENCH_PROMPTS: dict[str, str] = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe pass key is",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is",
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\nAnswer:",
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:",
    "code_run": "There is a function called {func} in the following Python code.\n\n{context}\n\nPlease compute the exact value of {func_call}. The value of {func_call} is",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:",
    "longdialogue_qa_eng": 'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", and you should try to guess who that character is.\n\n{context}\n\nThe name that has been replaced with $$MASK$$ is likely',
}
INFINITEBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
    "longdialogue_qa_eng": 40,
}
INFINITEBENCH_METRICS: dict[str, str] = {
    "passkey": "infbench_first_int",
    "number_string": "infbench_first_int",
    "kv_retrieval": "infbench_kv_retrieval",
    "longbook_sum_eng": "infbench_rouge_lsum",
    "longbook_choice_eng": "infbench_choice",
    "longbook_qa_eng": "infbench_qa_f1",
    "longbook_qa_chn": "infbench_qa_f1_zh",
    "math_calc": "infbench_math_calc",
    "code_run": "infbench_code_run",
    "code_debug": "infbench_code_debug",
    "longdialogue_qa_eng": "infbench_dialogue",
}
RULER_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
NEEDLE_SUBSETS = ("essays",)
# SCBench (microsoft/MInference scbench/eval_utils.py): the context part of each task's template (scdq), the rest of
# its multi-turn template (the question), DATA_NAME_TO_MAX_NEW_TOKENS, and compute_scores.py's scorer.
SCBENCH_TASKS: dict[str, tuple[str, str, int, str]] = {
    "kv": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}",
        "\n\n{input}",
        150,
        "scbench_retrieval",
    ),
    "prefix_suffix": ("{context}", "\n\n{input}", 150, "scbench_retrieval"),
    "qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}",
        "\n\nQuestion: {input}\nAnswer:",
        40,
        "scbench_qa",
    ),
}
# kvpress's generation allowances for its decoding data sets (see the module docstring).
MATH_MAX_NEW_TOKENS: dict[str, int] = {"aime25": 32000, "math500": 4096}
# The context kvpress gives a math problem: one space (the problem is the question).
MATH_CONTEXT = " "


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    hub_id: str | None
    subsets: tuple[str, ...] | None  # None: the task takes no subset (longbench_v2) or any name (kvpress)
    # Several questions share one context: prefilled and compressed once per cell (kvpress rows).
    shared_contexts: bool = False
    # False: the task is the data set's name alone (`longbench_v2`, `aime25`), never `NAME:SUBSET`.
    takes_subset: bool = True
    # Other hub copies looked for in the Hugging Face cache after `hub_id` (kvpress's own copies, its schema).
    other_hub_ids: tuple[str, ...] = ()

    def hub_config(self, subset: str | None, length: int | None) -> tuple[str | None, str] | None:
        """(config, split) of the hub copy, None where there is none."""
        if self.hub_id is None:
            return None
        if self.name == "ruler":
            return (str(length), "test") if length else None
        if self.name == "longbench":
            return subset, "test"
        if self.name == "longbench_e":
            return f"{subset}_e", "test"
        if self.name == "longbench_v2":
            return None, "train"
        if self.name == "infinitebench":
            return None, subset or ""
        if self.name == "scbench":
            return f"scbench_{subset}", "test"
        return None, "test"

    def files(self, subset: str | None) -> tuple[str, ...]:
        """Where the records lie inside a directory (`--data NAME=DIR` or kvbench's data directory)."""
        if self.name == "ruler":
            return (f"{subset}/validation.jsonl", f"{subset}.jsonl")
        if self.name == "longbench_e":
            return (f"{subset}_e.jsonl",)
        if self.name == "longbench_v2":
            return ("data.json", "data.jsonl")
        if not self.takes_subset:
            return (f"{self.name}.jsonl",)
        if self.name == "needle":
            return (f"{subset}.jsonl",)
        if self.name == "scbench":
            return (f"scbench_{subset}.jsonl",)
        return (f"{subset}.jsonl",)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ruler", "RULER, generated by NVIDIA/RULER (JSONL) or kvpress's copy", "simonjegou/ruler", RULER_TASKS
        ),
        DatasetSpec(
            "longbench", "LongBench v1, English and Chinese subsets", "THUDM/LongBench", tuple(LONGBENCH_PROMPTS)
        ),
        DatasetSpec("longbench_e", "LongBench-E (length-balanced)", "THUDM/LongBench", LONGBENCH_E_SUBSETS),
        DatasetSpec("longbench_v2", "LongBench-v2 multiple choice", "THUDM/LongBench-v2", None, takes_subset=False),
        DatasetSpec(
            "infinitebench",
            "InfiniteBench, English tasks and longbook_qa_chn",
            "xinrongzhang2022/InfiniteBench",
            tuple(INFINITEBENCH_PROMPTS),
        ),
        DatasetSpec(
            "needle",
            "needle in a haystack over essays, depth x length",
            "alessiodevoto/paul_graham_essays",
            NEEDLE_SUBSETS,
        ),
        DatasetSpec("kvpress", "kvpress-style rows; rows sharing a context are compressed once", None, None, True),
        DatasetSpec(
            "scbench",
            "SCBench shared contexts, one row per turn, the context compressed once",
            "microsoft/SCBench",
            tuple(SCBENCH_TASKS),
            True,
        ),
        DatasetSpec(
            "aime25",
            "AIME 2025 I & II, long generation, last \\boxed{} answer",
            "math-ai/aime25",
            None,
            takes_subset=False,
            other_hub_ids=("alessiodevoto/aime25",),
        ),
        DatasetSpec(
            "math500",
            "MATH-500, long generation, last \\boxed{} answer",
            "HuggingFaceH4/MATH-500",
            None,
            takes_subset=False,
            other_hub_ids=("alessiodevoto/math500",),
        ),
    )
}


def is_dataset_task(name: str) -> bool:
    return ":" in name or name in DATASETS


def parse_task(name: str) -> tuple[DatasetSpec, str | None]:
    """(data set, subset) of a data-set task name; a TaskError naming the valid choices otherwise."""
    dataset, _, subset = name.partition(":")
    if dataset not in DATASETS:
        raise TaskError(f"unknown data set {dataset!r} in task {name!r}; data sets: {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    if not spec.takes_subset:
        if subset:
            raise TaskError(f"{dataset} takes no subset: use --tasks {dataset}")
        return spec, None
    if not subset:
        raise TaskError(f"{dataset} needs a subset, e.g. {dataset}:{(spec.subsets or ('NAME',))[0]}")
    if spec.subsets is not None and subset not in spec.subsets:
        raise TaskError(f"unknown {dataset} subset {subset!r}; subsets: {', '.join(spec.subsets)}")
    return spec, subset


def data_home() -> Path:
    """kvbench's local copies of data sets (what `kvbench data fetch` writes)."""
    return Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench")) / "data"


def parse_data_paths(items: Iterable[str]) -> dict[str, Path]:
    """`--data NAME=PATH` values: the path must exist (a file in the schema or a directory)."""
    paths: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TaskError(f"--data {item!r} must be NAME=PATH, e.g. longbench=/data/longbench")
        if name not in DATASETS:
            raise TaskError(f"--data {item!r}: unknown data set {name!r}; data sets: {', '.join(DATASETS)}")
        if not Path(path).exists():
            raise TaskError(f"--data {name}={path}: no such file or directory")
        paths[name] = Path(path)
    return paths


@dataclass(frozen=True)
class Located:
    """Where a data-set task's records were found: a file, or a hub id in the local HF cache."""

    where: str
    path: Path | None = None
    hub: tuple[str, str | None, str] | None = None


def _offline_datasets():
    """`datasets`, told to read only its local cache. Only `datasets`' own switch is set (a hub model loaded later
    in the same process may still download); set after import too, in case it was imported with the network on."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        return None
    datasets.config.HF_HUB_OFFLINE = True
    return datasets


@lru_cache(maxsize=4)  # the check before the model loads and the run read the same rows once
def _hub_rows(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]] | None:
    datasets = _offline_datasets()
    if datasets is None:
        return None
    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception:  # noqa: BLE001 - any failure offline means: not in the local cache
        return None
    return [dict(row) for row in rows]


def locate(
    task: str, data: Mapping[str, Path], length: int | None = None, hub: bool = True
) -> tuple[Located | None, list[str]]:
    """Where `task`'s records are, and every place looked (for the one-line error when none has them)."""
    spec, subset = parse_task(task)
    looked: list[str] = []
    directories = []
    if spec.name in data:
        given = data[spec.name]
        if given.is_file():
            return Located(str(given), path=given), looked
        directories.append(given)
    directories.append(data_home() / spec.name)
    for directory in directories:
        for name in spec.files(subset):
            candidate = directory / name
            looked.append(str(candidate))
            if candidate.is_file():
                return Located(str(candidate), path=candidate), looked
    config_split = spec.hub_config(subset, length) if hub else None
    if spec.hub_id is not None and config_split is not None:
        config, split = config_split
        for hub_id in (spec.hub_id, *spec.other_hub_ids):
            looked.append(f"the Hugging Face cache ({hub_id}{f' {config}' if config else ''}, split {split})")
            if _hub_rows(hub_id, config, split) is not None:
                return Located(looked[-1], hub=(hub_id, config, split)), looked
    return None, looked


def missing_message(task: str, looked: list[str]) -> str:
    name = task.partition(":")[0]
    return (
        f"data set {task} not found; looked in {'; '.join(looked)}. Pass --data {name}=PATH, or run "
        f"`kvbench data fetch {task}` on a machine with network"
    )


def read_records(located: Located) -> list[dict[str, Any]]:
    if located.hub is not None:
        rows = _hub_rows(*located.hub)
        if rows is None:
            raise TaskError(f"{located.where} could not be read")
        return rows
    assert located.path is not None
    path = located.path
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise TaskError(f"{path}: not valid JSON") from None
        if not isinstance(records, list):
            raise TaskError(f"{path}: expected a JSON list of records")
        return records
    return list(read_jsonl(path))


def _cut_template(template: str, context: str, **fields: str) -> tuple[str, str]:
    """(template up to and including the context, the rest) with the fields filled in."""
    before, marker, after = template.partition("{context}")
    if not marker:
        raise TaskError("template has no {context}")
    for name, value in fields.items():
        before = before.replace("{" + name + "}", value)
        after = after.replace("{" + name + "}", value)
    return before + context, after


def _field(record: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in record:
        raise TaskError(f"{where}: record has no field {name!r}")
    return record[name]


def _longbench(spec: DatasetSpec, subset: str, record: Mapping[str, Any], index: int, where: str) -> Sample:
    context, question = _cut_template(
        LONGBENCH_PROMPTS[subset], str(_field(record, "context", where)), input=str(_field(record, "input", where))
    )
    options: dict[str, Any] = {"first_line": subset in FIRST_LINE_SUBSETS}
    if LONGBENCH_METRICS[subset] == "longbench_classification":
        options["all_classes"] = list(record.get("all_classes") or [])
    answers = _field(record, "answers", where)
    return Sample(
        task=f"{spec.name}:{subset}",
        sample_id=index,
        context=context,
        question=question,
        answer_prefix="",
        references=[str(a) for a in (answers if isinstance(answers, list) else [answers])],
        max_new_tokens=LONGBENCH_MAX_NEW_TOKENS[subset],
        metric=LONGBENCH_METRICS[subset],
        metadata={
            "metric_options": options,
            "chat_template": subset not in LONGBENCH_NO_CHAT_TEMPLATE,
            "source_id": record.get("_id"),
            "source_length": record.get("length"),
        },
    )


def _longbench_v2(record: Mapping[str, Any], index: int, where: str) -> Sample:
    prompt = LONGBENCH_V2_PROMPT.replace("$Q$", str(_field(record, "question", where)).strip())
    for letter in "ABCD":
        prompt = prompt.replace(f"$C_{letter}$", str(_field(record, f"choice_{letter}", where)).strip())
    before, _, after = prompt.partition("$DOC$")
    return Sample(
        task="longbench_v2",
        sample_id=index,
        context=before + str(_field(record, "context", where)).strip(),
        question=after,
        answer_prefix="",
        references=[str(_field(record, "answer", where))],
        max_new_tokens=LONGBENCH_V2_MAX_NEW_TOKENS,
        metric="longbench_v2_choice",
        metadata={
            "source_id": record.get("_id"),
            "difficulty": record.get("difficulty"),
            "length_class": record.get("length"),
            "domain": record.get("domain"),
        },
    )


def _infinitebench(subset: str, record: Mapping[str, Any], index: int, where: str) -> Sample:
    answer = _field(record, "answer", where)
    answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    options = [str(o) for o in record.get("options") or []]
    text = str(record.get("input", ""))
    fields = {"input": text, "question": text}
    if subset in ("longbook_choice_eng", "code_debug"):
        if len(options) != 4:
            raise TaskError(f"{where}: {subset} records need four options")
        fields.update({f"OPTION_{letter}": option for letter, option in zip("ABCD", options)})
        if answers[0] not in options:
            raise TaskError(f"{where}: answer {answers[0]!r} is not one of the options")
        answers = [answers[0], "ABCD"[options.index(answers[0])]]
    if subset == "code_run":
        calls = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", text)
        if not calls:
            raise TaskError(f"{where}: code_run input names no func_N(x) call")
        fields.update({"func_call": calls[0], "func": calls[0].split("(")[0]})
    context, question = _cut_template(INFINITEBENCH_PROMPTS[subset], str(_field(record, "context", where)), **fields)
    return Sample(
        task=f"infinitebench:{subset}",
        sample_id=index,
        context=context,
        question=question,
        answer_prefix="",
        references=answers,
        max_new_tokens=INFINITEBENCH_MAX_NEW_TOKENS[subset],
        metric=INFINITEBENCH_METRICS[subset],
        metadata={"source_id": record.get("id")},
    )


def _ruler(subset: str, record: Mapping[str, Any], index: int, where: str) -> Sample:
    family = task_family(subset)
    if "input" in record:
        _, context, question, prefix = split_ruler_input(str(record["input"]), family)
        answer_prefix = prefix if prefix is not None else str(record.get("answer_prefix", ""))
        references = _field(record, "outputs", where)
    else:  # kvpress's copy: already split
        context, question = str(_field(record, "context", where)), str(_field(record, "question", where))
        answer_prefix = str(record.get("answer_prefix", ""))
        references = _field(record, "answer", where)
    max_new_tokens, metric = RULER_DEFAULTS[family or "niah"]
    return Sample(
        task=f"ruler:{subset}",
        sample_id=int(record.get("index", index)),
        context=context,
        question=question,
        answer_prefix=answer_prefix,
        references=[str(r) for r in (references if isinstance(references, list) else [references])],
        max_new_tokens=max_new_tokens,
        metric=metric,
        metadata={"source_length": record.get("length")},
    )


def _kvpress(subset: str, record: Mapping[str, Any], index: int, where: str) -> Sample:
    answer = _field(record, "answer", where)
    max_new = record.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise TaskError(f"{where}: kvpress rows need a positive integer max_new_tokens")
    return Sample(
        task=f"kvpress:{subset}",
        sample_id=index,
        context=str(_field(record, "context", where)),
        question=str(_field(record, "question", where)),
        answer_prefix=str(record.get("answer_prefix") or ""),
        references=[str(a) for a in (answer if isinstance(answer, list) else [answer])],
        max_new_tokens=max_new,
        metric="string_match_part",
        metadata={"source_task": record.get("task")},
    )


def _math(name: str, record: Mapping[str, Any], index: int, where: str) -> Sample:
    """An AIME25 / MATH500 record in the hub schema (`problem, answer`) or kvpress's (`context, question,
    answer_prefix, answer, max_new_tokens`), laid out as the module docstring says."""
    if "problem" in record:
        context, problem, answer_prefix = MATH_CONTEXT, str(record["problem"]), ""
        max_new = MATH_MAX_NEW_TOKENS[name]
    elif "question" in record:
        context, problem = str(_field(record, "context", where)), str(record["question"])
        answer_prefix = str(record.get("answer_prefix") or "")
        max_new = record.get("max_new_tokens", MATH_MAX_NEW_TOKENS[name])
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise TaskError(f"{where}: max_new_tokens must be a positive integer, got {max_new!r}")
    else:
        raise TaskError(f"{where}: record has neither 'problem' ({name}'s hub schema) nor 'question' (kvpress rows)")
    question = problem if "\\boxed" in problem else f"{problem}\n{BOXED_INSTRUCTION}"
    answer = _field(record, "answer", where)
    return Sample(
        task=name,
        sample_id=index,
        context=context,
        question=question,
        answer_prefix=answer_prefix,
        references=[str(a) for a in (answer if isinstance(answer, list) else [answer])],
        max_new_tokens=max_new,
        metric="math_boxed",
        metadata={
            "long_generation": True,
            "source_id": record.get("id", record.get("unique_id")),
            **{key: record[key] for key in ("subject", "level") if key in record},
        },
    )


def _scbench(subset: str, record: Mapping[str, Any], index: int, first_id: int, where: str) -> list[Sample]:
    """One sample per turn of an SCBench row (`context`, `multi_turns: [{input, answer}]`), numbered from
    `first_id`; every turn shares the row's context text (so its context id)."""
    context_template, question_template, max_new, metric = SCBENCH_TASKS[subset]
    context = context_template.replace("{context}", str(_field(record, "context", where)))
    turns = _field(record, "multi_turns", where)
    if not isinstance(turns, list) or not turns:
        raise TaskError(f"{where}: multi_turns must be a non-empty list of {{input, answer}} turns")
    samples = []
    for turn_index, turn in enumerate(turns):
        at = f"{where} turn {turn_index}"
        if not isinstance(turn, dict):
            raise TaskError(f"{at}: expected an object with input and answer")
        answer = _field(turn, "answer", at)
        samples.append(
            Sample(
                task=f"scbench:{subset}",
                sample_id=first_id + turn_index,
                context=context,
                question=question_template.replace("{input}", str(_field(turn, "input", at))),
                answer_prefix="",
                references=[str(a) for a in (answer if isinstance(answer, list) else [answer])],
                max_new_tokens=max_new,
                metric=metric,
                metadata={"source_id": record.get("id", index), "turn": turn_index},
            )
        )
    return samples


def records_to_samples(task: str, records: list[dict[str, Any]], where: str) -> list[Sample]:
    """The records of a data set as samples, each with its context id (equal contexts share one)."""
    spec, subset = parse_task(task)
    if spec.name == "ruler" and records and "task" in records[0] and "input" not in records[0]:
        records = [r for r in records if r.get("task") == subset]  # kvpress's copy holds every task
    samples: list[Sample] = []
    context_ids: dict[Any, int] = {}
    for index, record in enumerate(records):
        at = f"{where} record {index}"
        if not isinstance(record, dict):
            raise TaskError(f"{at}: expected a JSON object")
        if spec.name in ("longbench", "longbench_e"):
            built = [_longbench(spec, subset or "", record, index, at)]
        elif spec.name == "longbench_v2":
            built = [_longbench_v2(record, index, at)]
        elif spec.name == "infinitebench":
            built = [_infinitebench(subset or "", record, index, at)]
        elif spec.name == "ruler":
            built = [_ruler(subset or "", record, index, at)]
        elif spec.name == "kvpress":
            built = [_kvpress(subset or "", record, index, at)]
        elif spec.name in MATH_MAX_NEW_TOKENS:
            built = [_math(spec.name, record, index, at)]
        elif spec.name == "scbench":
            built = _scbench(subset or "", record, index, len(samples), at)
        else:
            raise TaskError(f"{task}: records are built by the needle grid, not read one by one")
        for sample in built:
            # a math problem is its whole prompt: the shared one-space context is no reason to group problems
            shared = sample.context if spec.name not in MATH_MAX_NEW_TOKENS else (sample.context, index)
            context_id = context_ids.setdefault(shared, len(context_ids))
            sample.metadata.update({"dataset": spec.name, "source": where, "context_id": context_id})
            samples.append(sample)
    return samples
