"""kvbench's generated tasks as lm-eval tasks: one YAML over one local JSONL per (task, length), offline.

Samples are fitted to one model's tokenizer, so each doc carries its prompt already rendered the way
`kvbench run` renders it (chat template included) and, in `kvbench_context`, the part that is compressed:
`KVBenchLM` splits there, and any other lm-eval model simply reads the whole prompt. Run the exported tasks
without lm-eval's `--apply_chat_template` (the template is already applied) through
`TaskManager(include_path=DIR, include_defaults=False)`. Scores come from kvbench's own scorers (x100, as in
kvbench's result rows); perplexity tasks become loglikelihood requests of the reference after the context.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbench.tasks.errors import TaskError
from kvbench.tasks.generated.perplexity import token_split
from kvbench.tasks.metrics.scoring import LOWER_IS_BETTER, METRICS
from kvbench.tasks.prompting import split_prompt
from kvbench.tasks.registry import row_metrics
from kvbench.tasks.sample import Sample

CONTEXT_FIELD = "kvbench_context"
UTILS_FILE = "utils.py"
# lm-eval resolves `!function utils.process_results` to a file next to the YAML.
UTILS_SOURCE = (
    '"""process_results for the tasks kvbench exported here (kvbench.tasks.lm_eval_export)."""\n\n'
    "from kvbench.tasks.lm_eval_export import process_results  # noqa: F401\n"
)


def task_name(task: str, length: int) -> str:
    """lm-eval name of an exported task; prefixed so it never shadows lm-eval's own RULER tasks."""
    return f"kvbench_{task}_{length}"


def _doc(sample: Sample, tokenizer: Any, length: int) -> dict[str, Any]:
    depths = sample.metadata.get("depths") or []
    doc: dict[str, Any] = {
        "task": sample.task,
        "sample_id": sample.sample_id,
        "length": length,
        "metrics": row_metrics(sample),
        "references": list(sample.references),
        "target": sample.references[0],
        "depth": float(depths[0]) if depths else None,
    }
    if sample.metric == "perplexity":
        _, continuation_ids = token_split(tokenizer, sample)
        doc.update(
            prompt=split_prompt(tokenizer, sample.context, "", "").context_text,
            scored_tokens=len(continuation_ids),
        )
        doc[CONTEXT_FIELD] = doc["prompt"]
        return doc
    parts = split_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    doc["prompt"] = parts.context_text + parts.question_text
    doc[CONTEXT_FIELD] = parts.context_text
    return doc


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _yaml(name: str, data_file: Path, sample: Sample) -> str:
    """The task's YAML; `!function` needs a literal tag, so it is written as text (JSON strings are YAML)."""
    metrics = row_metrics(sample)
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_quoted(str(data_file))}",
        "test_split: test",
        "doc_to_text: prompt",
        "doc_to_target: target",
        'target_delimiter: ""',
    ]
    if sample.metric == "perplexity":
        lines.append("output_type: loglikelihood")
    else:
        lines += [
            "output_type: generate_until",
            "generation_kwargs:",
            "  until: []",
            f"  max_gen_toks: {sample.max_new_tokens}",
            "  do_sample: false",
        ]
    lines.append("process_results: !function utils.process_results")
    lines.append("metric_list:")
    for metric in metrics:
        better = "false" if metric in LOWER_IS_BETTER else "true"
        lines += [f"  - metric: {metric}", "    aggregation: mean", f"    higher_is_better: {better}"]
    lines += ["metadata:", f"  version: {_quoted(sample.metadata.get('generator_version', ''))}"]
    return "\n".join(lines) + "\n"


def export_task(samples: Sequence[Sample], tokenizer: Any, length: int, out_dir: str | os.PathLike[str]) -> str:
    """Write one task's samples as `<name>.jsonl` + `<name>.yaml` (+ the shared `utils.py`); return its name."""
    if not samples:
        raise TaskError("nothing to export: no samples")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = task_name(samples[0].task, length)
    data_file = out / f"{name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(_doc(sample, tokenizer, length), ensure_ascii=False) + "\n")
    (out / f"{name}.yaml").write_text(_yaml(name, data_file, samples[0]), encoding="utf-8")
    (out / UTILS_FILE).write_text(UTILS_SOURCE, encoding="utf-8")
    return name


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """lm-eval's per-doc hook: kvbench's scorers on the generation (x100), or perplexity from the loglikelihood."""
    if doc["metrics"] == ["perplexity"]:
        loglikelihood, _ = results[0]
        return {"perplexity": round(math.exp(-loglikelihood / doc["scored_tokens"]), 4)}
    output = results[0]
    return {metric: round(100 * METRICS[metric](output, doc["references"]), 2) for metric in doc["metrics"]}
