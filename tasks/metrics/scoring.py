"""Per-sample scorers (tasks.md §11): each returns a value in [0, 1]; the harness reports ×100.

Post-processing follows RULER: generations often end in stray control characters (EOS
remnants, tabs), which would otherwise glue a correct answer to garbage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics.chain import chain_operations, chain_steps
from kvbench.tasks.metrics.quality import bertscore_f1, rouge1, rouge2, rougeL

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

METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
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
}
