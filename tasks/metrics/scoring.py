"""Per-sample scorers (tasks.md §11): each returns a value in [0, 1]; the harness reports ×100.

Post-processing follows RULER: generations often end in stray control characters (EOS
remnants, tabs), which would otherwise glue a correct answer to garbage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics import infinitebench as infbench
from kvbench.tasks.metrics import longbench
from kvbench.tasks.metrics.chain import chain_operations, chain_steps
from kvbench.tasks.metrics.math_answer import math_boxed
from kvbench.tasks.metrics.quality import bertscore_f1, rouge1, rouge2, rougeL
from kvbench.tasks.metrics.scbench import scbench_qa, scbench_retrieval

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess(text: str) -> str:
    """Strip, turn every control character into a newline, strip again (§11.1).

    Public so the harness can count null (empty) predictions on the same text it scores.
    """
    return _CONTROL_CHARS.sub("\n", text.strip()).strip()


def _require(references: Sequence[str]) -> None:
    if not references:
        raise TaskError("cannot score a sample without references")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found (case-insensitive substring): partial credit for multi-value needles."""
    _require(references)
    text = postprocess(prediction).lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if any reference is found: QA references are alternative phrasings of one answer."""
    _require(references)
    text = postprocess(prediction).lower()
    return float(any(ref.lower() in text for ref in references))


def passkey_exact(prediction: str, references: Sequence[str]) -> float:
    """Fraction of keys present as whole numbers, so `123456` does not count for key `12345`."""
    _require(references)
    text = postprocess(prediction)
    found = sum(re.search(rf"\b{re.escape(ref)}\b", text) is not None for ref in references)
    return found / len(references)


def perplexity(prediction: str, references: Sequence[str]) -> float:
    """Perplexity comes from the model's log-probabilities of the reference, never from generated text."""
    raise TaskError("perplexity is scored from the model's log-probabilities (the harness does it), not from text")


# Metrics where a lower value is better; every other metric is a score where higher is better.
LOWER_IS_BETTER = frozenset({"perplexity"})

# The data sets' own metrics (tasks/metrics/longbench.py, infinitebench.py, math_answer.py, scbench.py): called with the sample's
# `metadata["metric_options"]` as keywords (e.g. LongBench's `first_line` rule and trec's `all_classes`).
BENCHMARK_METRICS: dict[str, Callable[..., float]] = {
    "longbench_qa_f1": longbench.longbench_qa_f1,
    "longbench_rouge": longbench.longbench_rouge,
    "longbench_qa_f1_zh": longbench.longbench_qa_f1_zh,
    "longbench_rouge_zh": longbench.longbench_rouge_zh,
    "longbench_retrieval_zh": longbench.longbench_retrieval_zh,
    "longbench_classification": longbench.longbench_classification,
    "longbench_retrieval": longbench.longbench_retrieval,
    "longbench_count": longbench.longbench_count,
    "longbench_code_sim": longbench.longbench_code_sim,
    "longbench_v2_choice": longbench.longbench_v2_choice,
    "needle_rougeL": longbench.needle_rouge_l,
    "infbench_first_int": infbench.infbench_first_int,
    "infbench_kv_retrieval": infbench.infbench_kv_retrieval,
    "infbench_dialogue": infbench.infbench_dialogue,
    "infbench_choice": infbench.infbench_choice,
    "infbench_code_debug": infbench.infbench_code_debug,
    "infbench_qa_f1": infbench.infbench_qa_f1,
    "infbench_qa_f1_zh": infbench.infbench_qa_f1_zh,
    "infbench_rouge_lsum": infbench.infbench_rouge_lsum,
    "infbench_code_run": infbench.infbench_code_run,
    "infbench_math_calc": infbench.infbench_math_calc,
    "infbench_math_find": infbench.infbench_math_find,
    "math_boxed": math_boxed,
    "scbench_retrieval": scbench_retrieval,
    "scbench_qa": scbench_qa,
}

METRICS: dict[str, Callable[..., float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "passkey_exact": passkey_exact,
    "rouge1": rouge1,
    "rouge2": rouge2,
    "rougeL": rougeL,
    "bertscore_f1": bertscore_f1,
    "perplexity": perplexity,
    "chain_steps": chain_steps,
    "chain_operations": chain_operations,
    **BENCHMARK_METRICS,
}
