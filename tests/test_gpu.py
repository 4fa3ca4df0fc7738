"""The CUDA path: `full` in bf16 against transformers, compressed and batched decoding on the device.

Skipped without a GPU. The last test runs benchmarks/gpu.py's tiny size on the CPU, so that the GPU benchmark
stays runnable as it stands wherever a GPU is.
"""

import runpy
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, random_ids, tiny_model

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.engine.batched_decode import DecodeRow, batched_greedy_decode
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.methods import get_method

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NEW_TOKENS = 12
# bf16 keeps 8 mantissa bits: logits of magnitude ~4 are resolved to ~1.6e-2. kvbench's `full` makes the same SDPA
# call as transformers over the same keys, so the two agree far closer
# than this in practice; the tolerance is bf16's resolution at the tiny models' logit scale.
BF16_ATOL, BF16_RTOL = 2e-2, 1.6e-2


def on_cuda(kind, dtype=torch.bfloat16, layers=3):
    return tiny_model(kind, layers=layers).to(device="cuda", dtype=dtype)


def reference(model, context, question):
    ids = torch.tensor([context + question], device="cuda")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[0, ids.shape[1] :].tolist(), [logits[0].float().cpu() for logits in out.logits]


def compressed(model, context, method="full", budget=1.0, **options):
    compressor = get_method(method, **options)
    observation = prefill(model, context, compressor.needs())
    cache = KVBenchCache(observation.num_layers, compressor.compress(observation, budget), observation.context_length)
    return cache, observation


@cuda
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_full_in_bf16_equals_transformers_on_cuda(kind):
    model = on_cuda(kind)
    context, question = random_ids(200, seed=1), random_ids(7, seed=2)
    tokens, logits = reference(model, context, question)
    cache, observation = compressed(model, context)
    ours = greedy_decode(
        model, cache, question, NEW_TOKENS, [2], first_logits=observation.last_logits, keep_logits=True
    )
    assert ours.token_ids == tokens
    assert len(ours.step_logits) == len(logits) >= 4
    for a, b in zip(ours.step_logits, logits, strict=True):
        torch.testing.assert_close(a, b, rtol=BF16_RTOL, atol=BF16_ATOL)


@cuda
@pytest.mark.parametrize(
    "method,options",
    [("adakv", {}), ("attention_clustering", {}), ("kivi", {}), ("h2o", {"decode_evict": True}), ("snapkv", {})],
)
def test_compressed_rows_batch_on_cuda_as_alone(method, options):
    """Ragged heads (adakv), merged tokens with a logit bias (attention_clustering's own prefill), quantized codes
    and decode-time eviction, in fp32 on the device: batched rows give the tokens and logits of rows alone."""
    model = on_cuda("llama-gqa", dtype=torch.float32)
    context = random_ids(400, seed=3)
    compressor = get_method(method, **options)

    def fresh():
        if compressor.prefills_itself(model.config, len(context), 0.25):
            return compressor.prefill_and_compress(model, context, 0.25)[0]
        observation = prefill(model, context, compressor.needs().union(ObservationNeeds(window=64)))
        return KVBenchCache(observation.num_layers, compressor.compress(observation, 0.25), len(context))

    questions = [random_ids(4, seed=s) for s in (4, 5, 6)]
    alone = []
    for question in questions:
        cache = fresh()
        alone.append(
            greedy_decode(
                model,
                cache,
                question,
                NEW_TOKENS,
                [],
                keep_logits=True,
                step_hook=compressor.on_decode_step,
                start_hook=compressor.on_decode_start,
            )
        )
    rows = [
        DecodeRow(fresh(), q, NEW_TOKENS, step_hook=compressor.on_decode_step, start_hook=compressor.on_decode_start)
        for q in questions
    ]
    batched = batched_greedy_decode(model, rows, [], keep_logits=True)
    for single, row in zip(alone, batched, strict=True):
        assert row.generation.token_ids == single.token_ids
        for a, b in zip(row.generation.step_logits, single.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# Attention over compressed caches on the device against tests/test_packed_attention.py's float64 direct computation
# (from the same rounded inputs). fp32: 1e-4 (cuBLAS may reorder sums). bf16: logits are rounded to bf16 before the
# fp32 softmax, as in transformers' eager attention; at the cases' logit scale (|logit| up to ~8, bf16 step 2^-8·8 ≈
# 0.03) the outputs (|o| ~ 1) move by up to 0.039 on the CPU in bf16, so 6e-2.
CUDA_FP32_ATOL, CUDA_BF16_ATOL = 1e-4, 6e-2


@cuda
@pytest.mark.parametrize("mode", ["packed", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compressed_attention_on_cuda_equals_the_direct_computation(mode, dtype):
    from test_packed_attention import LAYERS, check_case

    from kvbench.harness.cache.attention import set_ragged_mode

    previous = set_ragged_mode(mode)
    try:
        for case in sorted(LAYERS):
            for batched in (False, True):
                check_case(case, batched, "cuda", dtype, CUDA_FP32_ATOL if dtype == torch.float32 else CUDA_BF16_ATOL)
    finally:
        set_ragged_mode(previous)


def test_gpu_benchmark_runs_at_its_tiny_size(monkeypatch, capsys):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    argv = ["gpu.py", "--size", "tiny", "--device", "cpu", "--dtype", "float32", "--contexts", "256"]
    argv += ["--batches", "1,3", "--budgets", "0.5,0.25", "--new-tokens", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(str(script), run_name="__main__")
    assert finished.value.code == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["full"], ["snapkv"], ["kivi"])]
    # full once, snapkv and kivi at two budgets (or a refusal line), for each of the two batch sizes
    assert len(rows) == 2 * 5
    # adakv beside its kvpress-style twin (full length, masked) at each budget and batch size
    ada = [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["adakv"], ["adakv/masked"])]
    assert ada == ["adakv", "adakv/masked"] * 4
    ratios = {line.split()[0]: float(line.split()[3]) for line in out.splitlines() if line.startswith("adakv")}
    assert ratios["adakv"] <= 0.5 < 1 < ratios["adakv/masked"]  # packed saves; full length plus a mask does not
    full_rows = [row for row in rows if row[0] == "full"]
    assert all(row[5] == "1.000" for row in full_rows)  # full's ratio to itself
