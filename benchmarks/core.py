"""Core benchmark: prefill, compress and decode costs of the reference methods on one model.

Prints, per context length: prefill seconds; compress seconds and kv_bytes per method at one budget (a method
that prunes while prefilling is timed through its own prefill; one that cannot reach the budget says so); decode
ms/token for `full` vs `snapkv` (or the comma-separated --decode-method list, each with its decode hooks); and the
ratios of each against `full` measured in this same run. Medians over --repeats. Methods that need calibration
are calibrated first, or read from the calibration cache. Not a test: numbers depend on the machine.

    python benchmarks/core.py [--model smollm2-135m] [--lengths 2048,4096] [--budget 0.25] [--repeats 3]
                              [--methods all] [--decode-method snapkv,h2o] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from kvbench.harness.artifacts.calibration import ensure_calibrated  # noqa: E402
from kvbench.harness.engine.decode import greedy_decode  # noqa: E402
from kvbench.harness.engine.measure import timed  # noqa: E402
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, shared_needs  # noqa: E402
from kvbench.harness.engine.prefill import prefill  # noqa: E402
from kvbench.harness.errors import BudgetError  # noqa: E402
from kvbench.harness.models.loading import load_model  # noqa: E402
from kvbench.methods import REGISTRY, get_method, load_all  # noqa: E402
from kvbench.tasks import generate_samples, split_prompt  # noqa: E402


def median_seconds(device: torch.device, repeats: int, work) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        with timed(device) as watch:
            result = work()
        times.append(watch.seconds)
    return statistics.median(times), result


def decode_ms_per_token(loaded, observed, method, budget, context_ids, question_ids, tokens, repeats) -> float:
    """Median decode time per token; each repeat decodes a fresh compression (decode-time methods change it)."""
    budget = budget if method.uses_budget else 1.0
    times, generated = [], 0
    for _ in range(repeats):
        cache = compress_context(loaded, observed, method, budget, context_ids).cache
        with timed(loaded.device) as watch:
            # No EOS: every run decodes exactly `tokens` tokens, so runs compare per token.
            generation = greedy_decode(
                loaded.model,
                cache,
                question_ids,
                tokens,
                eos_token_ids=[],
                step_hook=method.on_decode_step,
                start_hook=method.on_decode_start,
            )
        times.append(watch.seconds)
        generated = len(generation.token_ids)
    return 1000 * statistics.median(times) / generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-method", default="snapkv", help="comma-separated method specs to decode vs full")
    parser.add_argument("--methods", default="all", help="comma-separated, or all registered methods")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    load_all()
    names = sorted(REGISTRY) if args.methods == "all" else args.methods.split(",")
    methods = [get_method(name) for name in names]
    decoders = [get_method(name) for name in args.decode_method.split(",")]
    for method in methods + decoders:  # from the calibration cache, or calibrated now (said on stderr)
        ensure_calibrated(loaded, method)
    print(f"model {args.model} | device {loaded.device} | dtype {loaded.dtype} | torch {torch.__version__}")
    print(f"budget {args.budget} | repeats {args.repeats} (medians) | {torch.get_num_threads()} CPU threads")
    for length in (int(x) for x in args.lengths.split(",")):
        sample = generate_samples("passkey", loaded.tokenizer, length, 1)[0]
        parts = split_prompt(loaded.tokenizer, sample.context, sample.question, sample.answer_prefix)
        needs = shared_needs(methods + decoders)
        prefill_s, observation = median_seconds(
            loaded.device, args.repeats, partial(prefill, loaded.model, parts.context_ids, needs)
        )
        full_bytes = observation.kv_bytes_full()
        print(f"\n== context {observation.context_length} tokens (target {length}) ==")
        print(f"prefill: {prefill_s:.3f} s (one shared prefill serves every method below)")
        print(f"{'method':<22}{'compress_s':>12}{'kv_bytes':>14}{'kv_ratio':>10}")
        observed = TimedObservation(observation, prefill_s)
        for method in methods:
            budget = args.budget if method.uses_budget else 1.0
            own = method.prefills_itself(loaded.model.config, observation.context_length, budget)
            try:
                compress_s, compressed = median_seconds(
                    loaded.device,
                    args.repeats,
                    partial(compress_context, loaded, observed, method, budget, parts.context_ids),
                )
            except BudgetError as refusal:
                print(f"{method.label:<22}{'refused':>12}  {refusal}")
                continue
            kv_bytes = compressed.cache.kv_bytes()
            note = "  (its own prefill, compression included)" if own else ""
            print(f"{method.label:<22}{compress_s:>12.4f}{kv_bytes:>14,}{kv_bytes / full_bytes:>10.3f}{note}")
        context_ids = parts.context_ids
        full_ms = decode_ms_per_token(
            loaded, observed, get_method("full"), 1.0, context_ids, parts.question_ids, args.new_tokens, args.repeats
        )
        print(f"decode full: {full_ms:.2f} ms/token | kv_bytes full {full_bytes:,}")
        for other in decoders:
            other_ms = decode_ms_per_token(
                loaded, observed, other, args.budget, context_ids, parts.question_ids, args.new_tokens, args.repeats
            )
            print(f"decode {other.label}@{args.budget}: {other_ms:.2f} ms/token")
            print(f"ratio {other.label}/full decode time: {other_ms / full_ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
