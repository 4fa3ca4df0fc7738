"""kvbench.tasks: offline RULER-style task generators, prompt splitting, scorers and loaders.

The harness uses only what is exported here.
"""

from kvbench.tasks.errors import TaskError
from kvbench.tasks.loaders import load_hf_samples, load_jsonl_samples
from kvbench.tasks.perplexity import token_split
from kvbench.tasks.prompting import PromptParts, split_prompt
from kvbench.tasks.registry import (
    GENERATOR_VERSION,
    TASK_SETS,
    TASKS,
    TaskSpec,
    generate_samples,
    get_task,
    list_tasks,
    row_metrics,
    score,
    score_metric,
)
from kvbench.tasks.sample import Sample
from kvbench.tasks.scoring import LOWER_IS_BETTER, METRICS, postprocess

__all__ = [
    "GENERATOR_VERSION",
    "LOWER_IS_BETTER",
    "METRICS",
    "TASKS",
    "TASK_SETS",
    "PromptParts",
    "Sample",
    "TaskError",
    "TaskSpec",
    "generate_samples",
    "get_task",
    "list_tasks",
    "load_hf_samples",
    "load_jsonl_samples",
    "postprocess",
    "row_metrics",
    "score",
    "score_metric",
    "split_prompt",
    "token_split",
]
