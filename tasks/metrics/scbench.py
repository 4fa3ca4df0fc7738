"""SCBench's per-turn scores, as microsoft/MInference `scbench/compute_scores.py` defines them for the tasks kvbench
supports (kvbench's code; the ground truth per turn as `scbench/eval_utils.py` `get_ground_truth` builds it):

- **scbench_kv**, **scbench_prefix_suffix** (`kv_retrieval` there, `get_score_one_kv_retrieval`): 1 if the turn's
  answer string occurs in the prediction, case-sensitive, anywhere (no word split, unlike InfiniteBench's own
  kv_retrieval), else 0.
- **scbench_qa_eng** (`longdialogue_qa_eng` there, `get_score_one_longdialogue_qa_eng` with the ground truth
  `[answer]`): the prediction stripped and upper-cased; 1 if any reference, upper-cased, occurs in it, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbench.tasks.errors import TaskError


def _require(references: Sequence[str]) -> None:
    if not references:
        raise TaskError("cannot score a sample without references")


def scbench_retrieval(prediction: str, references: Sequence[str], **_) -> float:
    """scbench_kv, scbench_prefix_suffix: the answer, verbatim, inside the prediction."""
    _require(references)
    return float(any(str(reference) in prediction for reference in references))


def scbench_qa(prediction: str, references: Sequence[str], **_) -> float:
    """scbench_qa_eng: any reference inside the prediction, both upper-cased (the prediction stripped first)."""
    _require(references)
    text = prediction.strip().upper()
    return float(any(str(reference).upper() in text for reference in references))
