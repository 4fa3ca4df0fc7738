"""Model load benchmark: a GGUF model's load time direct, converting into the model cache, and from the cache.

Each load runs in a fresh process (what a sweep or a CLI call pays), in this order: the direct GGUF load with
the cache bypassed (KVBENCH_NO_MODEL_CACHE=1: dequantize every time), the first load into an empty cache
(dequantize, save the conversion, load it), then --repeats loads from the cache. Prints for each the seconds
of the imports a load needs (torch, transformers' loading machinery and its Llama classes, which
transformers imports lazily on first use), the seconds inside `load_model` after them, and the whole process's
wall time (interpreter start, imports and exit included), and the cached load's ratio against the direct one
measured in this same run. Not a test: numbers depend on the machine.

    python benchmarks/model_load.py [--model smollm2-135m] [--dtype float32] [--repeats 2] [--cache-dir DIR]

--cache-dir defaults to a fresh temporary directory (removed afterwards), so that the first load converts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers import core_model_loading, modeling_utils
from kvbench.harness.models.loading import load_model
imported = time.perf_counter()
loaded = load_model(sys.argv[1], "cpu", sys.argv[2])
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": done - imported,
                  "parameters": sum(p.numel() for p in loaded.model.parameters())}))
"""


def load_in_fresh_process(model: str, dtype: str, cache_dir: str, bypass: bool) -> dict:
    env = {**os.environ, "KVBENCH_CACHE_DIR": cache_dir, "TQDM_DISABLE": "1"}
    env.pop("KVBENCH_NO_MODEL_CACHE", None)
    if bypass:
        env["KVBENCH_NO_MODEL_CACHE"] = "1"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, model, dtype], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"loading {model} failed:\n{result.stderr.strip().splitlines()[-1]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model or .gguf file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="cached loads (fresh processes); median shown")
    parser.add_argument("--cache-dir", default=None, help="model cache root (default: a fresh temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvbench-model-load-") as temporary:
        cache_dir = args.cache_dir or temporary
        direct = load_in_fresh_process(args.model, args.dtype, cache_dir, bypass=True)
        first = load_in_fresh_process(args.model, args.dtype, cache_dir, bypass=False)
        cached = [load_in_fresh_process(args.model, args.dtype, cache_dir, bypass=False) for _ in range(args.repeats)]

    print(f"model {args.model}, {args.dtype}, {first['parameters'] / 1e6:.1f}M parameters, {os.cpu_count()} CPUs")
    print(f"{'load':<40}{'imports s':>11}{'load_model s':>14}{'process s':>11}")
    rows = [("direct GGUF (KVBENCH_NO_MODEL_CACHE=1)", direct), ("first load (convert into the cache)", first)]
    rows += [(f"cached, fresh process {i + 1}", row) for i, row in enumerate(cached)]
    for label, row in rows:
        print(f"{label:<40}{row['import_s']:>11.2f}{row['load_s']:>14.2f}{row['process_s']:>11.2f}")
    load_s = statistics.median(row["load_s"] for row in cached)
    process_s = statistics.median(row["process_s"] for row in cached)
    print(
        f"cached / direct (medians of the cached): load_model {load_s / direct['load_s']:.3f} "
        f"({direct['load_s'] / load_s:.1f}x faster), whole process {process_s / direct['process_s']:.3f} "
        f"({direct['process_s'] / process_s:.1f}x faster)"
    )


if __name__ == "__main__":
    main()
