"""Decode speed over ragged heads (adakv) vs equal heads (snapkv) vs `full`, and `full` vs transformers `generate`.

One process, one model (the embedded smollm2-135m by default), CPU or GPU. Per context length the passkey context is
prefilled once; each method compresses it at --budget (a fresh cache per repeat) and decodes --new-tokens greedy
tokens after the question (no EOS stop). ms/token is the median over repeats of the time between the first and the
last generated token's forward (the question's forward excluded), so it is the per-token cost of attending over
the compressed cache. Ratios are against `full` at the same length, measured in the same run; adakv/snapkv is the
price of ragged heads over equal heads at the same budget. Where the code has ragged attention modes
(`set_ragged_mode`), adakv runs under each (the per-head loop and the one-call packed product).

Then `full` through kvbench against transformers' own greedy `generate` continuing a DynamicCache of the same
context (tokens/s over --new-tokens, question included for both, alternating within each repeat).

The script uses only the API that kvbench had before issue 32, so the same file runs against an older checkout
(`PYTHONPATH` pointing at it) for a before/after comparison in the same conditions. The load average is printed at
the start and the end: on a shared machine, compare only numbers from one run.

    python benchmarks/ragged_decode.py [--lengths 4096,8192] [--budget 0.25] [--new-tokens 12] [--repeats 3]
                                       [--generate-lengths 4096]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, GenerationConfig  # noqa: E402

import kvbench.harness.cache.attention as kv_attention  # noqa: E402
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument  # noqa: E402
from kvbench.harness.engine.decode import greedy_decode  # noqa: E402
from kvbench.harness.engine.prefill import prefill  # noqa: E402
from kvbench.harness.models.loading import load_model  # noqa: E402
from kvbench.methods import get_method  # noqa: E402
from kvbench.tasks import generate_samples, split_prompt  # noqa: E402


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_token(model, cache, question, new_tokens, device) -> float:
    """Milliseconds per generated token between the first and the last generated token's forward."""
    stamps: list[float] = []

    def hook(_cache, _step):
        _sync(device)
        stamps.append(time.perf_counter())

    _sync(device)
    stamps.append(time.perf_counter())  # the first generated token is chosen from the question's forward
    greedy_decode(model, cache, question, new_tokens, eos_token_ids=[], step_hook=hook)
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3


@torch.inference_mode()
def transformers_tokens_per_s(model, context, question, new_tokens, prefilled) -> tuple[float, list[int]]:
    ids = torch.tensor([list(context) + list(question)], device=model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    defaults = model.generation_config
    saved, defaults.eos_token_id = defaults.eos_token_id, None
    try:
        _sync(model.device)
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config, **cache_argument(model, prefilled)
        )
        _sync(model.device)
        seconds = time.perf_counter() - start
    finally:
        defaults.eos_token_id = saved
    return new_tokens / seconds, out[0, ids.shape[1] :].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate-lengths", default="4096", help="lengths for full vs generate ('' for none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 3 or args.repeats < 1:
        print("--new-tokens must be at least 3 and --repeats at least 1", file=sys.stderr)
        return 2

    loaded = load_model(args.model, args.device, args.dtype)
    model = loaded.model
    modes = [None]
    if hasattr(kv_attention, "set_ragged_mode"):
        modes = ["loop", "packed"]
    code = os.path.dirname(os.path.dirname(os.path.abspath(kv_attention.__file__)))
    print(f"model {args.model} | device {loaded.device} | dtype {loaded.dtype} | torch {torch.__version__}")
    print(f"kvbench code at {os.path.dirname(code)} | {torch.get_num_threads()} CPU threads | load {os.getloadavg()}")
    print(f"budget {args.budget} | {args.new_tokens} new tokens | medians of {args.repeats} repeats\n")
    cells = [("full", None, 1.0), ("snapkv", None, args.budget)]
    cells += [("adakv", mode, args.budget) for mode in modes]
    methods = {name: get_method(name) for name, _, _ in cells}
    needs = methods["full"].needs()
    for method in methods.values():
        needs = needs.union(method.needs())
    print(f"{'length':>7} {'method':<16}{'ms/token':>10}{'vs full':>9}{'vs snapkv':>10}   kv fraction")
    for length in (int(x) for x in args.lengths.split(",")):
        sample = generate_samples("passkey", loaded.tokenizer, length, 1)[0]
        parts = split_prompt(loaded.tokenizer, sample.context, sample.question, sample.answer_prefix)
        context, question = parts.context_ids, parts.question_ids
        observation = prefill(model, context, needs)
        full_bytes = None
        results: dict[str, float] = {}
        for name, mode, budget in cells:
            previous = kv_attention.set_ragged_mode(mode) if mode else None
            try:
                times, kv = [], 0
                for _ in range(args.repeats):
                    prefixes = methods[name].compress(observation, budget)
                    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
                    kv = cache.kv_bytes()
                    with torch.inference_mode():
                        times.append(ms_per_token(model, cache, question, args.new_tokens, loaded.device))
                    del cache, prefixes
            finally:
                if mode:
                    kv_attention.set_ragged_mode(previous)
            label = name if mode is None else f"{name} ({mode})"
            results[label] = statistics.median(times)
            full_bytes = full_bytes or kv
            base, snap = results["full"], results.get("snapkv")
            versus_snap = f"{results[label] / snap:.3f}" if snap and name == "adakv" else "-"
            print(
                f"{len(context):>7} {label:<16}{results[label]:>10.2f}{results[label] / base:>9.3f}{versus_snap:>10}"
                f"   {kv / full_bytes:.3f}"
            )
        del observation
        if str(length) in args.generate_lengths.split(","):
            full = methods["full"]
            observation = prefill(model, context, methods["full"].needs())
            reference = DynamicCache(config=model.config)
            with torch.inference_mode():
                ids = torch.tensor([context], device=model.device)
                model(input_ids=ids, **cache_argument(model, reference), use_cache=True, logits_to_keep=1)
            ours, theirs, same = [], [], True
            for _ in range(args.repeats):
                cache = KVBenchCache(observation.num_layers, full.compress(observation, 1.0), len(context))
                _sync(loaded.device)
                start = time.perf_counter()
                mine = greedy_decode(model, cache, question, args.new_tokens, eos_token_ids=[]).token_ids
                _sync(loaded.device)
                ours.append(args.new_tokens / (time.perf_counter() - start))
                del cache
                speed, tokens = transformers_tokens_per_s(
                    model, context, question, args.new_tokens, copy.deepcopy(reference)
                )
                theirs.append(speed)
                same = same and tokens == mine
            a, b = statistics.median(ours), statistics.median(theirs)
            print(
                f"{len(context):>7} full vs generate: kvbench {a:.2f} tok/s, transformers {b:.2f} tok/s, "
                f"ratio {a / b:.3f} (goal >= 1) | same tokens: {same}"
            )
            del observation, reference
    print(f"\nload at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
