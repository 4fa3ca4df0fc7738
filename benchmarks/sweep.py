"""Sweep engine vs per-cell loop: what "prefill once, compress many" saves.

Runs the same (method, budget) cells on the same samples twice in one process: once through kvbench's sweep
engine (one prefill per sample, every cell compressed from it) and once the way peer harnesses run, a fresh
prefill for every cell. Prints both wall times, the ratio, and checks the two produced the same answers.

    python benchmarks/sweep.py [--methods snapkv,pyramidkv,streaming_llm,knorm] [--budgets 0.1,0.25,0.5]
                               [--task passkey] [--length 2048] [--samples 2]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

from kvbench.harness.measure import timed
from kvbench.harness.models import load_model
from kvbench.harness.pipeline import iter_context_cells, observe, run_cell
from kvbench.methods import get_method
from kvbench.tasks import generate_samples, split_prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--methods", default="snapkv,pyramidkv,streaming_llm,knorm")
    parser.add_argument("--budgets", default="0.1,0.25,0.5")
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    cells = [(get_method(m), float(b)) for m in args.methods.split(",") for b in args.budgets.split(",")]
    samples = generate_samples(args.task, loaded.tokenizer, args.length, args.samples)
    prompts = [split_prompt(loaded.tokenizer, s.context, s.question, s.answer_prefix) for s in samples]
    print(f"model {args.model} | device {loaded.device} | {args.task}@{args.length} | {len(samples)} samples")
    print(f"{len(cells)} cells per sample: {args.methods} x {args.budgets}")

    engine_outputs, loop_outputs = [], []
    with timed(loaded.device) as engine:
        for sample, parts in zip(samples, prompts):
            for _, _, result in iter_context_cells(
                loaded, parts.context_ids, parts.question_ids, cells, sample.max_new_tokens
            ):
                engine_outputs.append(result.output)
    with timed(loaded.device) as loop:
        for sample, parts in zip(samples, prompts):
            for method, budget in cells:
                observed = observe(loaded, parts.context_ids, method.needs())
                result = run_cell(loaded, observed, method, budget, parts.question_ids, sample.max_new_tokens)
                loop_outputs.append(result.output)
    print(f"sweep engine (one prefill per sample): {engine.seconds:.1f} s")
    print(f"per-cell loop (one prefill per cell):  {loop.seconds:.1f} s")
    print(f"speedup: {loop.seconds / engine.seconds:.2f}x | same outputs: {engine_outputs == loop_outputs}")
    return 0 if engine_outputs == loop_outputs else 1


if __name__ == "__main__":
    sys.exit(main())
