"""kvbench.tasks: offline RULER-style task generators, prompt splitting, scorers and loaders.

The harness uses only what is exported here.
"""

from kvbench.tasks.datasets.lengths import dataset_samples, sample_prompt
from kvbench.tasks.datasets.loaders import load_hf_samples, load_jsonl_samples
from kvbench.tasks.errors import TaskError
from kvbench.tasks.generated.perplexity import token_split
from kvbench.tasks.metrics.scoring import LOWER_IS_BETTER, METRICS, postprocess
from kvbench.tasks.prompting import PromptParts, split_prompt
from kvbench.tasks.registry import (
    GENERATOR_VERSION,
    TASK_SETS,
    TASKS,
    TaskSpec,
    check_task,
    generate_samples,
    get_task,
    is_dataset_task,
    list_dataset_tasks,
    list_tasks,
    locate_dataset,
    row_metrics,
    score,
    score_metric,
)
from kvbench.tasks.sample import Sample

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
    "check_task",
    "dataset_samples",
    "generate_samples",
    "get_task",
    "is_dataset_task",
    "list_dataset_tasks",
    "list_tasks",
    "locate_dataset",
    "sample_prompt",
    "load_hf_samples",
    "load_jsonl_samples",
    "postprocess",
    "row_metrics",
    "score",
    "score_metric",
    "split_prompt",
    "token_split",
]
