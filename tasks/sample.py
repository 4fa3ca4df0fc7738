"""The unit of work every task produces and the harness consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics.scoring import METRICS


@dataclass(frozen=True)
class Sample:
    """One prompt, split the way the pipeline runs it, with what a correct answer contains.

    The split (context, question, answer_prefix) follows tasks.md §13: only `context` is
    prefilled and compressed; `question` and `answer_prefix` are fed afterwards. `metadata`
    carries everything needed to regenerate or audit the sample (seed, depths, hashes,
    measured token length), so a results row can always be traced back to its data.
    """

    task: str
    sample_id: int
    context: str
    question: str
    answer_prefix: str
    references: list[str]
    max_new_tokens: int
    metric: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TaskError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy (the cache and the result store keep samples as JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        """Rebuild a sample written by `to_dict`; unknown keys mean a foreign or newer file."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - {"metadata"})
        if unknown or missing:
            raise TaskError(f"not a kvbench sample: unexpected keys {unknown}, missing keys {missing}")
        return cls(**data)
