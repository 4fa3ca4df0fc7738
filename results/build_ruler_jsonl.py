"""Write a local RULER data set in NVIDIA/RULER's output schema (`TASK/validation.jsonl`, one JSON object per line:
`index, input, outputs, length, answer_prefix`) from kvbench's offline generators, fitted with a model's tokenizer.

It stands in for what `python scripts/data/prepare.py` of NVIDIA/RULER writes (no network here): the input holds
the task template with its haystack and question, the answer prefix is its own field, `length` the measured tokens
with the generation allowance. `kvbench run --tasks ruler:TASK --data ruler=DIR` then reads it like RULER's own.

    python results/build_ruler_jsonl.py --model smollm2-135m --tasks niah_single_1,vt --length 1024 --samples 10 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvbench.harness.models.loading import load_model
from kvbench.tasks import generate_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="niah_single_1,vt")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = load_model(args.model, "cpu", "float32").tokenizer
    for task in args.tasks.split(","):
        samples = generate_samples(task, tokenizer, args.length, args.samples, args.seed)
        target = Path(args.out) / task / "validation.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8") as stream:
            for sample in samples:
                record = {
                    "index": sample.sample_id,
                    "input": sample.context + sample.question,
                    "outputs": sample.references,
                    "length": sample.metadata["length"],
                    "answer_prefix": sample.answer_prefix,
                }
                stream.write(json.dumps(record) + "\n")
        print(f"{task}: {len(samples)} records -> {target}")


if __name__ == "__main__":
    main()
