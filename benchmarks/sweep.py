"""Sweep engine vs per-cell loop: what "prefill once, compress many" saves.

Runs the same (method, budget) cells on the same samples three times in one process: through kvbench's sweep
engine (one prefill per sample, every cell compressed from it) decoding the cells of a sample together in
batches of --batch-size (default: all of them in one batch), through the same engine decoding each cell alone
(batch size 1, the reference path), and the way peer harnesses run, a fresh prefill for every cell decoded
alone. Prints the three wall times, the loop's ratio to each engine run, and checks that all three produced
the same answers. Not a test: numbers depend on the machine.

    python benchmarks/sweep.py [--methods snapkv,pyramidkv,streaming_llm,knorm] [--budgets 0.1,0.25,0.5]
                               [--task passkey] [--length 2048] [--samples 2] [--batch-size N]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

from kvbench.harness.engine.measure import timed
from kvbench.harness.engine.pipeline import iter_context_cells, observe, run_cell
from kvbench.harness.models.loading import load_model
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
    parser.add_argument("--batch-size", type=int, default=0, help="cells decoded together (0: all of a sample's)")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    cells = [(get_method(m), float(b)) for m in args.methods.split(",") for b in args.budgets.split(",")]
    samples = generate_samples(args.task, loaded.tokenizer, args.length, args.samples)
    prompts = [split_prompt(loaded.tokenizer, s.context, s.question, s.answer_prefix) for s in samples]
    print(f"model {args.model} | device {loaded.device} | {args.task}@{args.length} | {len(samples)} samples")
    print(f"{len(cells)} cells per sample: {args.methods} x {args.budgets}")

    batch_size = args.batch_size or len(cells)

    def engine_run(size: int) -> tuple[float, list[str]]:
        outputs = []
        with timed(loaded.device) as watch:
            for sample, parts in zip(samples, prompts):
                for _, _, result in iter_context_cells(
                    loaded, parts.context_ids, parts.question_ids, cells, sample.max_new_tokens, batch_size=size
                ):
                    outputs.append(result.output)
        return watch.seconds, outputs

    batched_s, batched_outputs = engine_run(batch_size)
    engine_s, engine_outputs = engine_run(1)
    loop_outputs = []
    with timed(loaded.device) as loop:
        for sample, parts in zip(samples, prompts):
            for method, budget in cells:
                observed = observe(loaded, parts.context_ids, method.needs())
                result = run_cell(loaded, observed, method, budget, parts.question_ids, sample.max_new_tokens)
                loop_outputs.append(result.output)
    same = batched_outputs == engine_outputs == loop_outputs
    for label, seconds in (
        (f"sweep engine, batches of {batch_size} cells", batched_s),
        ("sweep engine, each cell alone", engine_s),
        ("per-cell loop (one prefill per cell)", loop.seconds),
    ):
        print(f"{label + ':':<40} {seconds:.1f} s")
    print(
        f"speedup over the loop: {loop.seconds / batched_s:.2f}x batched, {loop.seconds / engine_s:.2f}x unbatched "
        f"| same outputs: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
