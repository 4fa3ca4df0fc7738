"""GPU benchmark: a random-weight Llama-3.1-8B-sized model through kvbench, against the bytes-per-token limit.

Builds the model from Llama-3.1-8B's config (no download: random weights change neither speed nor memory) and
prints, per context length and batch size: the prefill's seconds, then per method and budget the compression's
seconds, decode tokens/s (all rows of the batch together), the device's peak memory while decoding, the ratio of
tokens/s to `full` at the same context and batch, and the bytes-per-token limit next to it: the tokens/s that the
device's memory bandwidth allows when every generated step reads the weights once and each row's stored KV bytes
once (weights + batch × (kv_bytes + the raw tail, at its mean length over the decode) per step, divided into
--bandwidth-gbs). A batch of B decodes B rows of
the same cell (each its own compressed cache) with `batched_greedy_decode`; batch 1 is `greedy_decode` alone.
Timers are `torch.cuda.synchronize()`-bracketed; no EOS stop, so every row decodes exactly --new-tokens tokens.

Beside every cell of a per-head method (adakv, adakv_snapkv: heads keep different numbers of tokens) the script
runs the same selection stored the kvpress way (`<method>/masked`): every head keeps the full context and the
dropped tokens are hidden by a −inf logit bias, which saves no memory; its ratio to full is the side-by-side
comparison with kvbench's packed ragged heads. Ragged heads attend as `--ragged-mode` says (auto: one packed call
per layer on CUDA).

    python benchmarks/gpu.py [--contexts 8192,32768] [--batches 1,8] [--budgets 0.5,0.25,0.1]
                             [--methods full,snapkv,adakv,kivi] [--new-tokens 32] [--bandwidth-gbs 3350]

--size tiny builds a 2-layer model of the same shape family for a run on any device (numbers meaningless); --smoke
is that size on the CPU in fp32 with one short context (what tests/test_gpu.py runs). benchmarks/gpu_run.sh runs
the CUDA tests and this script under timeouts in one command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvbench.harness.cache.attention import RAGGED_MODES, set_ragged_mode  # noqa: E402
from kvbench.harness.cache.kv_cache import KVBenchCache  # noqa: E402
from kvbench.harness.cache.prefix import TokenPrefix  # noqa: E402
from kvbench.harness.engine.batched_decode import DecodeRow, batched_greedy_decode  # noqa: E402
from kvbench.harness.engine.decode import greedy_decode  # noqa: E402
from kvbench.harness.engine.measure import peak_memory_bytes, reset_peak_memory, timed  # noqa: E402
from kvbench.harness.engine.pipeline import compress_context, observe, shared_needs  # noqa: E402
from kvbench.harness.errors import BudgetError  # noqa: E402
from kvbench.harness.models.loading import LoadedModel, resolve_device  # noqa: E402
from kvbench.methods import REGISTRY, get_method, load_all  # noqa: E402

# meta-llama/Llama-3.1-8B's config.json (the sizes that set speed and memory).
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
    tie_word_embeddings=False,
)
TINY = {**LLAMA_31_8B, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def build_model(size: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights of the given shape, made directly on the device in its dtype."""
    config = LlamaConfig(**(LLAMA_31_8B if size == "8b" else TINY), attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def masked_like(observation, cache: KVBenchCache) -> KVBenchCache:
    """The kvpress way of storing a per-head selection: every head keeps all N context tokens ([H, N, d]) and the
    ones the method dropped get a −inf logit bias. Kept tokens are found by matching each kept key's projection on
    a fixed random direction among the context's keys of its head (selections keep keys unchanged)."""
    prefixes = []
    for keys, values, layer in zip(observation.keys, observation.values, cache.layers, strict=True):
        kv = layer.prefix.materialize()
        heads = list(kv.keys) if not kv.uniform else list(kv.keys.unbind(0))
        direction = torch.randn(keys.shape[-1], generator=torch.Generator().manual_seed(1)).to(keys.device)
        signature = keys.float() @ direction
        bias = torch.full(keys.shape[:2], float("-inf"), device=keys.device, dtype=keys.dtype)
        for h, kept in enumerate(heads):
            bias[h][torch.isin(signature[h], kept.float() @ direction)] = 0
        prefixes.append(TokenPrefix(keys, values, bias))
    return KVBenchCache(observation.num_layers, prefixes, observation.context_length)


def decode(loaded, caches, question, new_tokens) -> float:
    """Seconds to decode `new_tokens` tokens on every cache (one row each) after the question."""
    with timed(loaded.device) as watch:
        if len(caches) == 1:
            greedy_decode(loaded.model, caches[0], question, new_tokens, eos_token_ids=[])
        else:
            rows = [DecodeRow(cache, question, new_tokens) for cache in caches]
            batched_greedy_decode(loaded.model, rows, eos_token_ids=[])
    return watch.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--size", choices=["8b", "tiny"], default="8b")
    parser.add_argument("--smoke", action="store_true", help="tiny size, CPU, fp32, one short context")
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budgets", default="0.5,0.25,0.1")
    parser.add_argument("--methods", default="full,snapkv,adakv,kivi")
    parser.add_argument("--per-head", default="adakv,adakv_snapkv", help="methods also run stored the kvpress way")
    parser.add_argument("--ragged-mode", choices=RAGGED_MODES, default="auto")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="decode repeats per cell (median)")
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=3350.0, help="device memory bandwidth, GB/s (H100 SXM: 3350, H200: 4800)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.size, args.device, args.dtype = "tiny", "cpu", "float32"
        args.contexts, args.batches, args.budgets, args.new_tokens = "256", "1,2", "0.25", 3
    set_ragged_mode(args.ragged_mode)

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.size, device, dtype)
    loaded = LoadedModel(f"random-llama-3.1-{args.size}", "random weights", model, None, device, dtype)
    load_all()
    names = [name for name in args.methods.split(",") if name in REGISTRY]
    missing = sorted(set(args.methods.split(",")) - set(names))
    methods = [get_method(name) for name in names]
    weights = weight_bytes(model)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    print(f"model {loaded.name} ({weights / 1e9:.2f} GB of weights) | device {device} | dtype {dtype}")
    print(
        f"torch {torch.__version__} | bandwidth {args.bandwidth_gbs:g} GB/s | {args.new_tokens} new tokens per row"
        f" | ragged heads: {args.ragged_mode}"
    )
    if missing:
        print(f"not registered here, left out: {', '.join(missing)}")
    header = (
        f"{'method':<20}{'b':>6}{'compress_s':>11}{'kv_ratio':>9}{'tok/s':>10}{'vs full':>9}"
        f"{'limit tok/s':>12}{'of limit':>9}{'peak GB':>9}"
    )
    per_head = set(args.per_head.split(","))
    for context_length in (int(x) for x in args.contexts.split(",")):
        context = torch.randint(0, vocab, (context_length,), generator=generator).tolist()
        question = torch.randint(0, vocab, (args.question_tokens,), generator=generator).tolist()
        observed = observe(loaded, context, shared_needs(methods))
        print(f"\n== context {context_length} | prefill {observed.prefill_s:.3f} s ==", flush=True)
        for batch in (int(x) for x in args.batches.split(",")):
            print(f"-- batch {batch} --")
            print(header, flush=True)
            full_speed = None
            for method in methods:
                for budget in [float(b) for b in args.budgets.split(",")] if method.uses_budget else [1.0]:
                    for masked in (False, True) if method.name in per_head else (False,):
                        try:
                            with timed(device) as watch:
                                first = compress_context(loaded, observed, method, budget, context)
                        except BudgetError as refusal:
                            print(f"{method.name:<20}{budget:>6g}  refused: {refusal}", flush=True)
                            break
                        cache = masked_like(observed.observation, first.cache) if masked else first.cache
                        kv_bytes = cache.kv_bytes()
                        times = []
                        for _ in range(args.repeats):
                            caches = [cache] if not times else []
                            while len(caches) < batch:
                                again = compress_context(loaded, observed, method, budget, context).cache
                                caches.append(masked_like(observed.observation, again) if masked else again)
                            reset_peak_memory(device)
                            times.append(decode(loaded, caches, question, args.new_tokens))
                            peak = peak_memory_bytes(device)
                            del caches
                        speed = batch * args.new_tokens / statistics.median(times)
                        if method.name == "full":
                            full_speed = speed
                        tail_bytes = first.kv_bytes_full / context_length * (args.question_tokens + args.new_tokens / 2)
                        per_step = weights + batch * (kv_bytes + tail_bytes)
                        limit = batch * args.bandwidth_gbs * 1e9 / per_step
                        ratio = f"{speed / full_speed:.3f}" if full_speed else "-"
                        peak_text = f"{peak / 1e9:.2f}" if peak is not None else "-"
                        label = f"{method.name}/masked" if masked else method.name
                        print(
                            f"{label:<20}{budget:>6g}{watch.seconds:>11.4f}{kv_bytes / first.kv_bytes_full:>9.3f}"
                            f"{speed:>10.1f}{ratio:>9}{limit:>12.1f}{speed / limit:>9.2f}{peak_text:>9}",
                            flush=True,
                        )
                        del first, cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del observed
    return 0


if __name__ == "__main__":
    sys.exit(main())
