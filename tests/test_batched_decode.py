"""Batched decoding gives every row what it gets decoding alone.

The reference is the unbatched path (`run_cell`, `greedy_decode`), itself checked against plain transformers
generation in test_exactness.py. Every registered method runs as one row of a single batch, so rows of different
representations (uniform and ragged heads, merged tokens with a logit bias, low-rank, quantized, latent codes,
decode-time eviction) decode side by side in the same forward passes.
"""

import os

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.latent_prefix import LatentDecoder, LatentPrefix
from kvbench.harness.engine.batched_decode import DecodeRow, batched_greedy_decode
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, iter_context_cells, run_batch, run_cell
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import REGISTRY, get_method, load_all

load_all()
CONTEXT = 400
NEW_TOKENS = 8
BUDGET = 0.25
# fp32 logits of a row in a batch of rows vs alone: the batched matmuls may sum in another order.
LOGITS_ATOL = 1e-4

# Every registered method at its defaults, plus the decode-time options that change the cache while decoding.
# (ZACK's floor of 8 channels would be half of the tiny model's 16-channel heads: r_min=2, as in the contract test;
# KIVI's 128-token raw window would be a third of the 400-token context, above the budget: a 32-token one.)
EXTRA = [("h2o", {"decode_evict": True}), ("tova", {"decode_evict": True})]
OPTIONS = {"zack": {"r_min": 2}, "kivi": {"residual": 32}}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    previous = os.environ.get("KVBENCH_CACHE_DIR")
    os.environ["KVBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("calibration"))
    tokenizer = build_tasks_tokenizer(chat_template=True)
    model = tiny_model("llama-gqa", layers=3, vocab=len(tokenizer))
    yield LoadedModel("tiny", "memory:tiny-llama-gqa", model, tokenizer, torch.device("cpu"), torch.float32)
    if previous is None:
        del os.environ["KVBENCH_CACHE_DIR"]
    else:
        os.environ["KVBENCH_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def context():
    return random_ids(CONTEXT, seed=21), random_ids(5, seed=22)


# The learned methods train in their calibration; on the tiny model, shrunk to a second each (what is checked is
# that their representations decode alike in and out of the batch, not how well they were trained).
LEARNED_SMALL = {
    "autoencoder": {"latent_dim": 8, "latent_bits": 4, "tokens": 1024, "window": 256, "epochs": 1},
    "lightweight": {"samples": 3, "length": 1024, "response_tokens": 8, "epochs": 1},
    "adaptive_policy": {"texts": 4, "length": 512, "t_q": 32, "epochs": 2},
}
LEARNED = sorted(name for name in REGISTRY if REGISTRY[name].learns)


def every_method():
    options = {**OPTIONS, **LEARNED_SMALL}
    made = [get_method(name, **options.get(name, {})) for name in sorted(REGISTRY)]
    return made + [get_method(name, **options) for name, options in EXTRA]


LABELS = [method.label for method in every_method()]


@pytest.fixture(scope="module")
def methods(loaded):
    made = every_method()
    for method in made:
        ensure_calibrated(loaded, method, say=lambda _: None)
    return made


@pytest.fixture(scope="module")
def shared(loaded, context, methods):
    needs = ObservationNeeds()
    for method in methods:
        if not method.needs().own_prefill:
            needs = needs.union(method.needs())
    return TimedObservation(prefill(loaded.model, context[0], needs), 0.0)


def compressed_cells(loaded, shared, context, methods, budget=BUDGET):
    """(method, budget, compressed context) for every method that takes the budget (refusals left out)."""
    cells = []
    for method in methods:
        effective = budget if method.uses_budget else 1.0
        own = method.prefills_itself(loaded.model.config, CONTEXT, effective)
        try:
            compressed = compress_context(loaded, None if own else shared, method, effective, context[0])
        except BudgetError:
            continue
        cells.append((method, effective, compressed))
    return cells


@pytest.fixture(scope="module")
def alone(loaded, shared, context, methods):
    """Each method's cell decoded alone: the reference."""
    out = {}
    for method in methods:
        effective = BUDGET if method.uses_budget else 1.0
        own = method.prefills_itself(loaded.model.config, CONTEXT, effective)
        try:
            out[method.label] = run_cell(
                loaded,
                None if own else shared,
                method,
                effective,
                context[1],
                NEW_TOKENS,
                keep_logits=True,
                context_ids=context[0],
            )
        except BudgetError:
            continue
    return out


@pytest.fixture(scope="module")
def together(loaded, shared, context, methods):
    """Every method's cell as one row of a single batch."""
    cells = compressed_cells(loaded, shared, context, methods)
    results = run_batch(loaded, cells, context[1], NEW_TOKENS, keep_logits=True)
    return {method.label: result for (method, _, _), result in zip(cells, results)}


# Every registered method, alone and batched, with the calibrations of razor, uncomp and zack and the learned methods'
# shrunk trainings: 17 s on 2 CPU cores, so in the default suite.
def test_the_batch_holds_every_representation(together, alone):
    """The batch really mixes the layouts this issue names, and no method fell out of it."""
    assert set(together) == set(alone) and {result.method for result in together.values()} >= set(LEARNED)
    names = {result.method for result in together.values()}
    assert {"adakv", "attention_clustering", "zack", "kivi", "uncomp", "razor"} <= names
    decode_time = [label for label in LABELS if "decode_evict" in label]
    assert len(decode_time) == 2 and set(decode_time) <= set(together)
    assert any(r.head_spread and r.head_spread["max"] > r.head_spread["min"] for r in together.values())  # ragged


@pytest.mark.parametrize("label", LABELS)
def test_a_row_in_a_batch_decodes_as_alone(together, alone, label):
    if label not in alone:
        pytest.skip(f"{label} refuses budget {BUDGET} on the tiny model")
    batched, single = together[label], alone[label]
    assert batched.token_ids == single.token_ids
    assert len(batched.step_logits) == len(single.step_logits) == len(single.token_ids) >= 1
    for ours, reference in zip(batched.step_logits, single.step_logits, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=LOGITS_ATOL)
    assert (batched.output, batched.stopped_by) == (single.output, single.stopped_by)
    assert (batched.kv_bytes, batched.kv_bytes_peak, batched.head_spread) == (
        single.kv_bytes,
        single.kv_bytes_peak,
        single.head_spread,
    )
    assert batched.decode_batch == len(together) and single.decode_batch == 1


def test_decode_shares_add_up_to_the_batch():
    """Each row's decode_s is its share of the forward passes it was in: shares of rows that ran every step equal,
    and a row that left after one step took a smaller share."""
    model = tiny_model("llama-gqa", layers=2)
    observation = prefill(model, random_ids(64, seed=5), ObservationNeeds())
    full = get_method("full")
    rows = [
        DecodeRow(
            KVBenchCache(observation.num_layers, full.compress(observation, 1.0), 64), random_ids(3, seed=6), limit
        )
        for limit in (12, 12, 1)
    ]
    decoded = batched_greedy_decode(model, rows, eos_token_ids=[])
    assert [len(row.generation.token_ids) for row in decoded] == [12, 12, 1]
    assert all(row.batch == 3 for row in decoded)
    assert decoded[2].decode_s < decoded[0].decode_s


def test_rows_that_stop_early_leave_the_others_unchanged():
    """One row stops at its token limit, another at an EOS id; every row decodes as it would alone."""
    model = tiny_model("qwen2-gqa")
    observation = prefill(model, random_ids(80, seed=7), ObservationNeeds(window=32))
    snapkv = get_method("snapkv")
    questions = [random_ids(4, seed=8), random_ids(4, seed=9), random_ids(4, seed=10)]
    free = [
        greedy_decode(
            model,
            KVBenchCache(observation.num_layers, snapkv.compress(observation, 0.5), 80),
            q,
            12,
            [],
            keep_logits=True,
        )
        for q in questions
    ]
    # An EOS id the second row produces early (the others stop at it too where they produce it: the reference cuts
    # their lone runs the same way); the first row stops at its limit of 2.
    eos = free[1].token_ids[3]
    limits = [2, 12, 12]
    rows = [
        DecodeRow(KVBenchCache(observation.num_layers, snapkv.compress(observation, 0.5), 80), q, limit)
        for q, limit in zip(questions, limits)
    ]
    decoded = batched_greedy_decode(model, rows, eos_token_ids=[eos], keep_logits=True)

    def cut(tokens, limit):  # what greedy_decode alone stops at: the first EOS, else the limit
        tokens = tokens[:limit]
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    expected = [cut(run.token_ids, limit) for run, limit in zip(free, limits)]
    assert len(expected[0]) <= 2 and len(expected[1]) <= 4
    assert [row.generation.token_ids for row in decoded] == expected
    assert decoded[1].generation.stopped_by == "eos"
    for row, run, tokens in zip(decoded, free, expected):
        for ours, reference in zip(row.generation.step_logits, run.step_logits[: len(tokens)], strict=True):
            torch.testing.assert_close(ours, reference, rtol=0, atol=LOGITS_ATOL)


def test_context_cells_in_batches_equal_cells_alone(loaded, context):
    """The sweep's entry point: batch sizes 1 (the reference), 3 and 5 give the same cells, in the same order,
    refusals included, with their own prefill where a method needs one."""
    cells = [(get_method(name), budget) for name in ("full", "snapkv", "adakv", "kivi") for budget in (0.25, 0.5)]
    cells.append((get_method("attention_clustering"), 0.25))  # prunes while prefilling at this budget

    def run(batch_size):
        outcomes = iter_context_cells(loaded, context[0], context[1], cells, NEW_TOKENS, batch_size=batch_size)
        return [
            (m.label, b, str(o))
            if isinstance(o, BudgetError)
            else (m.label, b, o.token_ids, o.kv_bytes, o.decode_batch)
            for m, b, o in outcomes
        ]

    single = run(1)
    decoded = [cell for cell in single if len(cell) == 5]
    assert len(decoded) >= 7 and {cell[4] for cell in decoded} == {1}
    for size in (3, 5):
        batched = run(size)
        assert sorted(cell[:4] for cell in batched) == sorted(cell[:4] for cell in single)
        assert max(cell[4] for cell in batched if len(cell) == 5) == size


def latent_prefixes(observation, bits):
    """Every layer's context as latents of m = 8 channels from a random linear code (quantized when bits < 16)."""
    generator = torch.Generator().manual_seed(3)
    d, m = observation.head_dim, 8
    prefixes = []
    for keys, values in zip(observation.keys, observation.values):
        encode = torch.randn(d, m, generator=generator) / d**0.5
        decoders = [
            LatentDecoder(torch.randn(1, m, d, generator=generator), torch.randn(1, 1, d, generator=generator))
            for _ in range(2)
        ]
        prefixes.append(
            LatentPrefix(keys @ encode, values @ encode, *decoders, bits, 0, torch.float32, observation.keys[0].dtype)
        )
    return prefixes


def test_latent_code_rows_batch_as_alone():
    """The autoencoder's representation (latent codes, float or 4-bit) in a batch with a ragged-head row."""
    model = tiny_model("llama-gqa")
    observation = prefill(model, random_ids(90, seed=16), get_method("adakv").needs())
    question = random_ids(4, seed=17)

    def caches():
        return [
            KVBenchCache(observation.num_layers, latent_prefixes(observation, 32), 90),
            KVBenchCache(observation.num_layers, latent_prefixes(observation, 4), 90),
            KVBenchCache(observation.num_layers, get_method("adakv").compress(observation, 0.3), 90),
        ]

    alone = [greedy_decode(model, cache, question, 10, [], keep_logits=True) for cache in caches()]
    together = batched_greedy_decode(
        model, [DecodeRow(cache, question, 10) for cache in caches()], [], keep_logits=True
    )
    for single, row in zip(alone, together, strict=True):
        assert row.generation.token_ids == single.token_ids
        for a, b in zip(row.generation.step_logits, single.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=LOGITS_ATOL)
