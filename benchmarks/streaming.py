"""Long answers: attention_clustering's bounded cache vs the full cache, token by token.

Seed 003's method prunes and merges every P tokens while decoding too, so its cache stays near B entries
where the full cache grows with every generated token. This decodes --new-tokens tokens (no EOS) after a
--context-token passkey context with both, and prints per window of --window generated tokens: ms/token of
each, their ratio (measured in this same run), and the entries per KV head each held at the window's end;
then the bytes each stored at the end (context and answer) and their ratio. Not a test: timings depend on
the machine.

    python benchmarks/streaming.py [--model smollm2-135m] [--context 2048] [--new-tokens 2048]
                                   [--budget 0.25] [--window 256] [--pruning-interval 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from kvbench.harness.engine.decode import greedy_decode  # noqa: E402
from kvbench.harness.engine.pipeline import compress_context  # noqa: E402
from kvbench.harness.models.loading import load_model  # noqa: E402
from kvbench.methods import get_method  # noqa: E402
from kvbench.tasks import generate_samples, split_prompt  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def entries_per_head(cache) -> int:
    first = cache.layers[0]
    return (first.prefix.head_lengths()[0] if first.prefix is not None else 0) + first.tail_length


def stored_bytes(cache) -> int:
    """Context prefix (as measured for the budget) plus the raw tail of answer tokens."""
    tail = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers if layer.keys is not None)
    element = cache.layers[0].keys.element_size() if cache.layers[0].keys is not None else 0
    return cache.kv_bytes() + tail * element


def decode_trace(loaded, method, budget: float, context_ids: list[int], tokens: int):
    """Per generated token after the first: the time it was done and the entries per head then."""
    compressed = compress_context(loaded, None, method, budget, context_ids)
    stamps: list[float] = []
    entries: list[int] = []

    def start_hook(cache) -> None:
        method.on_decode_start(cache)
        synchronize(loaded.device)
        stamps.append(time.perf_counter())
        entries.append(entries_per_head(cache))

    def step_hook(cache, step: int) -> None:
        method.on_decode_step(cache, step)
        synchronize(loaded.device)
        stamps.append(time.perf_counter())
        entries.append(entries_per_head(cache))

    generation = greedy_decode(
        loaded.model,
        compressed.cache,
        [],
        tokens,
        eos_token_ids=[],
        first_logits=compressed.last_logits,
        step_hook=step_hook,
        start_hook=start_hook,
    )
    return stamps, entries, stored_bytes(compressed.cache), compressed.cache.kv_bytes(), generation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", type=int, default=2048, help="target context length in tokens")
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--window", type=int, default=256, help="generated tokens per reported row")
    parser.add_argument("--pruning-interval", type=int, default=512, help="P of attention_clustering")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device, args.dtype)
    sample = generate_samples("passkey", loaded.tokenizer, args.context, 1)[0]
    context_ids = split_prompt(loaded.tokenizer, sample.context, sample.question, sample.answer_prefix).context_ids
    method = get_method("attention_clustering", pruning_interval=args.pruning_interval)
    full_stamps, full_entries, full_bytes, _, _ = decode_trace(
        loaded, get_method("full"), 1.0, context_ids, args.new_tokens
    )
    ours_stamps, ours_entries, ours_bytes, context_bytes, _ = decode_trace(
        loaded, method, args.budget, context_ids, args.new_tokens
    )
    print(f"model {args.model} | device {loaded.device} | dtype {loaded.dtype} | torch {torch.__version__}")
    print(
        f"context {len(context_ids)} tokens | {args.new_tokens} new tokens (no EOS) | attention_clustering at "
        f"b = {args.budget}, P = {args.pruning_interval} | {torch.get_num_threads()} CPU threads"
    )
    print(f"{'tokens':>13}{'full ms/tok':>13}{'ours ms/tok':>13}{'ratio':>8}{'full entries':>14}{'ours entries':>14}")
    steps = len(full_stamps) - 1
    for start in range(0, steps, args.window):
        stop = min(start + args.window, steps)
        full_ms = 1000 * (full_stamps[stop] - full_stamps[start]) / (stop - start)
        ours_ms = 1000 * (ours_stamps[stop] - ours_stamps[start]) / (stop - start)
        print(
            f"{start + 1:>6}-{stop + 1:<6}{full_ms:>13.2f}{ours_ms:>13.2f}{ours_ms / full_ms:>8.3f}"
            f"{full_entries[stop]:>14}{ours_entries[stop]:>14}"
        )
    print(f"largest cache while decoding: full {max(full_entries)} entries per head, ours {max(ours_entries)}")
    print(
        f"stored at the end: full {full_bytes:,} bytes, ours {ours_bytes:,} ({ours_bytes / full_bytes:.3f} of full; "
        f"after the context alone ours held {context_bytes:,})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
