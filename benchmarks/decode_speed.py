"""`full` through kvbench's cache and decode loop vs transformers' own greedy `generate` with a DynamicCache.

Same model, same context, same process: the context is prefilled once; each repeat then decodes the question and
--new-tokens greedy tokens (no EOS stop, so both decode exactly as many) from a fresh copy of that prefill, once
through kvbench (`full`'s compressed cache, `greedy_decode`) and once through `model.generate` continuing a
DynamicCache that holds the context. The two alternate within each repeat so that a noisy machine slows both
alike. Prints the median tokens/s of each, the ratio kvbench/transformers (the goal is at least 0.95) and whether
both chose the same tokens. Not a test: numbers depend on the machine.

    python benchmarks/decode_speed.py [--model smollm2-135m] [--length 4096] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, GenerationConfig  # noqa: E402

from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument  # noqa: E402
from kvbench.harness.engine.decode import greedy_decode  # noqa: E402
from kvbench.harness.engine.measure import timed  # noqa: E402
from kvbench.harness.engine.prefill import ObservationNeeds, prefill  # noqa: E402
from kvbench.harness.models.loading import load_model  # noqa: E402
from kvbench.methods import get_method  # noqa: E402
from kvbench.tasks import generate_samples, split_prompt  # noqa: E402


@torch.inference_mode()
def transformers_prefill(model, context_ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([context_ids], device=model.device)
    model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    return cache


@torch.inference_mode()
def transformers_decode(model, prefilled: DynamicCache, context_ids, question_ids, new_tokens) -> list[int]:
    ids = torch.tensor([list(context_ids) + list(question_ids)], device=model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    # generate fills a None eos_token_id from the model's own generation config, so it would stop at EOS (22 of 64
    # tokens on the 4k passkey context) while kvbench decodes all of them: blank the model's default for the call.
    defaults = model.generation_config
    saved = defaults.eos_token_id
    defaults.eos_token_id = None
    try:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config, **cache_argument(model, prefilled)
        )
    finally:
        defaults.eos_token_id = saved
    return out[0, ids.shape[1] :].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    model = loaded.model
    sample = generate_samples("passkey", loaded.tokenizer, args.length, 1)[0]
    parts = split_prompt(loaded.tokenizer, sample.context, sample.question, sample.answer_prefix)
    context, question = parts.context_ids, parts.question_ids
    print(f"model {args.model} | device {loaded.device} | dtype {loaded.dtype} | torch {torch.__version__}")
    print(f"context {len(context)} tokens | question {len(question)} | {args.new_tokens} new tokens")
    print(f"repeats {args.repeats} (medians, alternating) | {torch.get_num_threads()} CPU threads")

    observation = prefill(model, context, ObservationNeeds())
    full = get_method("full")
    reference = transformers_prefill(model, context)
    ours_s, theirs_s = [], []
    ours_tokens = theirs_tokens = None
    for _ in range(args.repeats):
        cache = KVBenchCache(observation.num_layers, full.compress(observation, 1.0), observation.context_length)
        with timed(loaded.device) as watch:
            ours_tokens = greedy_decode(model, cache, question, args.new_tokens, eos_token_ids=[]).token_ids
        ours_s.append(watch.seconds)
        del cache
        prefilled = copy.deepcopy(reference)
        with timed(loaded.device) as watch:
            theirs_tokens = transformers_decode(model, prefilled, context, question, args.new_tokens)
        theirs_s.append(watch.seconds)
        del prefilled
    if len(ours_tokens) != args.new_tokens or len(theirs_tokens) != args.new_tokens:
        print(
            f"decoded {len(ours_tokens)} (kvbench) and {len(theirs_tokens)} (transformers) of {args.new_tokens} tokens"
        )
        return 1
    ours = args.new_tokens / statistics.median(ours_s)
    theirs = args.new_tokens / statistics.median(theirs_s)
    print(f"kvbench full:              {ours:8.2f} tokens/s  (runs: {', '.join(f'{s:.2f}' for s in ours_s)} s)")
    print(f"transformers generate:     {theirs:8.2f} tokens/s  (runs: {', '.join(f'{s:.2f}' for s in theirs_s)} s)")
    print(
        f"ratio kvbench/transformers: {ours / theirs:.3f} (goal >= 0.95) | same tokens: {ours_tokens == theirs_tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
