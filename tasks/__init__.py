"""kvbench.tasks: offline RULER-style task generators, prompt splitting, scorers and loaders.

The harness uses only what is exported here.
"""

from kvbench.tasks.errors import TaskError
from kvbench.tasks.loaders import load_hf_samples, load_jsonl_samples
from kvbench.tasks.prompting import PromptParts, split_prompt
from kvbench.tasks.registry import (
    GENERATOR_VERSION,
    TASK_SETS,
    TASKS,
    TaskSpec,
    generate_samples,
    get_task,
    list_tasks,
    score,
)
from kvbench.tasks.sample import Sample
from kvbench.tasks.scoring import METRICS, postprocess

__all__ = [
    "GENERATOR_VERSION",
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
    "score",
    "split_prompt",
]
