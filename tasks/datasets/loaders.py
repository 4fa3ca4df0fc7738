"""Samples from a user's own files: RULER JSONL, LongBench JSONL, kvpress-style rows, HF datasets.

RULER files hold one `input` string per sample; it is split into context / question /
answer prefix with kvpress's patterns (tasks.md §13). The question starts at the *last*
match of the task's question pattern, because vt and cwe few-shot examples repeat it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvbench.tasks.errors import TaskError
from kvbench.tasks.sample import Sample

QUESTION_PATTERNS: dict[str, str] = {
    "niah": r"What (?:is|are all) the special magic",
    "vt": r"Question: Find all variables that are assigned the value",
    "cwe": r"Question: What are the 10 most common words in the above list\?",
    "fwe": r"Question: Do not provide any explanation\.",
    "qa": r"Answer the question based on the given documents\.",
}
ANSWER_PATTERNS: dict[str, str] = {"niah": r"The special magic"}
DEFAULT_ANSWER_PATTERN = r"Answer:"

# RULER's generation lengths and metrics per task family (tasks.md §2).
RULER_DEFAULTS: dict[str, tuple[int, str]] = {
    "niah": (128, "string_match_all"),
    "vt": (30, "string_match_all"),
    "cwe": (120, "string_match_all"),
    "fwe": (50, "string_match_all"),
    "qa": (32, "string_match_part"),
}
# LongBench's config/dataset2maxlen.json.
LONGBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}
FORMATS = ("ruler", "longbench", "kvpress")


def task_family(task: str) -> str | None:
    """`niah`, `vt`, `cwe`, `fwe` or `qa` for a RULER task name, None otherwise."""
    family = task.split("_")[0]
    return family if family in QUESTION_PATTERNS else None


def split_ruler_input(text: str, family: str | None = None) -> tuple[str, str, str, str | None]:
    """(family, context, question, answer prefix or None when the input does not contain it).

    Without a family, the pattern matching latest in the text decides. Spaces before the
    answer prefix belong to it, as in kvbench's own samples (` The special magic ...`).
    """
    families = [family] if family else list(QUESTION_PATTERNS)
    best: tuple[int, str] | None = None
    for name in families:
        matches = list(re.finditer(QUESTION_PATTERNS[name], text))
        if matches and (best is None or matches[-1].start() > best[0]):
            best = (matches[-1].start(), name)
    if best is None:
        raise TaskError(f"no RULER question pattern found (families tried: {', '.join(families)})")
    start, name = best
    answer = re.compile(ANSWER_PATTERNS.get(name, DEFAULT_ANSWER_PATTERN)).search(text, start)
    if answer is None:
        return name, text[:start], text[start:], None
    cut = answer.start()
    while cut > start and text[cut - 1] == " ":
        cut -= 1
    return name, text[:start], text[start:cut], text[cut:]


def _text(record: dict[str, Any], name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise TaskError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _references(record: dict[str, Any], *fields: str) -> list[str]:
    for name in fields:
        if name in record:
            value = record[name]
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    raise KeyError(fields[0])


def _ruler_sample(record: dict[str, Any], index: int, task: str | None) -> dict[str, Any]:
    family, context, question, answer_prefix = split_ruler_input(
        _text(record, "input"), task_family(task) if task else None
    )
    max_new_tokens, metric = RULER_DEFAULTS[family]
    return {
        "task": task or record.get("task") or family,
        "sample_id": int(record.get("index", index)),
        "context": context,
        "question": question,
        "answer_prefix": answer_prefix if answer_prefix is not None else record.get("answer_prefix", ""),
        "references": _references(record, "outputs", "answer", "answers"),
        "max_new_tokens": int(record.get("max_new_tokens", max_new_tokens)),
        "metric": metric,
        "metadata": {"source_length": record["length"]} if "length" in record else {},
    }


def _longbench_sample(record: dict[str, Any], index: int, task: str | None) -> dict[str, Any]:
    dataset = record.get("dataset")
    return {
        "task": task or dataset or "longbench",
        "sample_id": index,
        "context": _text(record, "context"),
        "question": _text(record, "input"),
        "answer_prefix": "",
        "references": _references(record, "answers"),
        "max_new_tokens": LONGBENCH_MAX_NEW_TOKENS.get(dataset or ""),
        "metric": "string_match_part",
        "metadata": {key: record[key] for key in ("_id", "length", "dataset") if key in record},
    }


def _kvpress_sample(record: dict[str, Any], index: int, task: str | None) -> dict[str, Any]:
    name = task or record.get("task") or "kvpress"
    max_new_tokens, metric = RULER_DEFAULTS.get(task_family(name) or "", (None, "string_match_all"))
    return {
        "task": name,
        "sample_id": index,
        "context": _text(record, "context"),
        "question": _text(record, "question"),
        "answer_prefix": record.get("answer_prefix", ""),
        "references": _references(record, "answer", "answers", "outputs"),
        "max_new_tokens": record.get("max_new_tokens", max_new_tokens),
        "metric": metric,
        "metadata": {},
    }


_CONVERTERS = {"ruler": _ruler_sample, "longbench": _longbench_sample, "kvpress": _kvpress_sample}


def records_to_samples(
    records: Iterable[dict[str, Any]],
    format: str,
    source: str,
    task: str | None = None,
    max_new_tokens: int | None = None,
    metric: str | None = None,
) -> list[Sample]:
    """Convert raw rows; `max_new_tokens` and `metric` override what the format implies."""
    if format not in _CONVERTERS:
        raise TaskError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    samples = []
    for index, record in enumerate(records):
        try:
            fields = _CONVERTERS[format](record, index, task)
        except KeyError as missing:
            raise TaskError(f"{source}: record {index} has no field {missing} (format {format!r})") from None
        except TaskError as error:
            raise TaskError(f"{source}: record {index}: {error}") from None
        fields["max_new_tokens"] = max_new_tokens or fields["max_new_tokens"]
        if fields["max_new_tokens"] is None:
            raise TaskError(f"{source}: record {index}: unknown generation length; pass max_new_tokens")
        fields["metric"] = metric or fields["metric"]
        fields["metadata"] = {"source": source, "format": format, **fields["metadata"]}
        samples.append(Sample(**fields))
    return samples


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """The records of a JSONL file, one JSON object per non-blank line; a bad line is one TaskError naming it."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise TaskError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{number}: expected a JSON object per line")
            yield record


def load_jsonl_samples(
    path: str | os.PathLike[str],
    format: str = "ruler",
    task: str | None = None,
    max_new_tokens: int | None = None,
    metric: str | None = None,
) -> list[Sample]:
    """Samples from a JSONL file in RULER (`input`, `outputs`), LongBench (`context`, `input`,
    `answers`) or kvpress (`context`, `question`, `answer_prefix`, `answer`) format."""
    file = Path(path)
    if not file.is_file():
        raise TaskError(f"no such file: {file}")
    return records_to_samples(read_jsonl(file), format, str(file), task, max_new_tokens, metric)


def load_hf_samples(
    path: str,
    name: str | None = None,
    split: str = "test",
    format: str = "kvpress",
    task: str | None = None,
    max_new_tokens: int | None = None,
    metric: str | None = None,
) -> list[Sample]:
    """Samples from a Hugging Face dataset already on disk or in the local cache (no download here).

    kvpress's RULER (`simonjegou/ruler`) uses the kvpress format, THUDM/LongBench the LongBench one.
    """
    try:
        import datasets
    except ImportError:
        raise TaskError("loading Hugging Face datasets needs the datasets package: pip install datasets") from None
    rows = datasets.load_dataset(path, name, split=split)
    return records_to_samples((dict(row) for row in rows), format, f"{path}:{split}", task, max_new_tokens, metric)
