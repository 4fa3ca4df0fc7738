"""The contract every registered method meets, checked through the real pipeline on a tiny model.

A new method file is picked up here automatically: budget 1 answers like `full`, the measured bytes meet the
budget (or the method refuses it with a BudgetError), the shared prefill gives the same result as the
method's own, and results are deterministic.
"""

import os

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, run_cell, shared_needs
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import REGISTRY, get_method, load_all

load_all()
METHODS = sorted(REGISTRY)
CONTEXT = 400
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    previous = os.environ.get("KVBENCH_CACHE_DIR")
    os.environ["KVBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("calibration"))
    tokenizer = build_tasks_tokenizer(chat_template=True)
    model = tiny_model("llama-gqa", layers=4, vocab=len(tokenizer))
    yield LoadedModel("tiny", "memory:tiny-llama-gqa", model, tokenizer, torch.device("cpu"), torch.float32)
    if previous is None:
        del os.environ["KVBENCH_CACHE_DIR"]
    else:
        os.environ["KVBENCH_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def context():
    return random_ids(CONTEXT, seed=11), random_ids(5, seed=12)


@pytest.fixture(scope="module")
def shared(loaded, context):
    """One prefill with everything any registered method may ask for."""
    needs = shared_needs([get_method(name) for name in METHODS]).union(
        ObservationNeeds(window=128, column_sums=True, hidden_states=True)
    )
    return TimedObservation(prefill(loaded.model, context[0], needs), 0.0)


# The tiny model's heads have d = 16: ZACK's floor of 8 channels (specs/baselines.md §1) would be half a head and
# refuse every budget below 0.5 there. adaptive_policy's default trains on 28 prefills of 2048 tokens (minutes on
# shared cores); the contract needs a trained policy, not a good one.
TINY_MODEL_OPTIONS = {"zack": {"r_min": 2}, "adaptive_policy": {"texts": 4, "length": 512}}


def method_for(loaded, name, **options):
    method = get_method(name, **{**TINY_MODEL_OPTIONS.get(name, {}), **options})
    ensure_calibrated(loaded, method, say=lambda _: None)
    return method


def cell(loaded, shared, context, method, budget):
    observed = None if method.prefills_itself(loaded.model.config, len(context[0]), budget) else shared
    return run_cell(loaded, observed, method, budget, context[1], NEW_TOKENS, keep_logits=True, context_ids=context[0])


@pytest.fixture(scope="module")
def full(loaded, shared, context):
    return cell(loaded, shared, context, get_method("full"), 1.0)


@pytest.mark.parametrize("name", METHODS)
def test_budget_one_answers_like_full(loaded, shared, context, full, name):
    result = cell(loaded, shared, context, method_for(loaded, name), 1.0)
    assert result.token_ids == full.token_ids
    for ours, reference in zip(result.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


GRID = [0.1, 0.25, 0.5]


def harness_metadata_bytes(cache) -> int:
    """What the harness itself adds to what a method keeps, counted by hand from the stored tensors' shapes: the
    int32 per-head lengths of ragged prefixes (a method chooses ragged heads, not how they are packed). Everything
    else is the method's and must fit b x full: kept keys and values, codes, scales and bases, per-token logit
    biases, and the decode state it keeps in the cache (`method_state`)."""
    total = 0
    for layer in cache.layers:
        lengths = getattr(layer.prefix, "lengths", None)
        if lengths is not None:
            assert lengths.dtype == torch.int32 and lengths.numel() == layer.prefix.num_heads
            total += lengths.numel() * lengths.element_size()
    return total


def compressed(loaded, shared, context, method, budget):
    observed = None if method.prefills_itself(loaded.model.config, len(context[0]), budget) else shared
    return compress_context(loaded, observed, method, budget, context[0])


# Methods whose options add a decode state to what they keep: checked beside every registered method's defaults.
DECODE_STATE_SPECS = [
    "h2o:decode_evict=true",
    "h2o:decode_evict=true:normalize=false",
    "tova:decode_evict=true",
    "decoding:base=tova:interval=16",
    "decoding:base=knorm:interval=16",
    "decoding:base=snapkv:base_options=window=8:interval=16",
]


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"full"}) + DECODE_STATE_SPECS)
@pytest.mark.parametrize("budget", GRID)
def test_measured_bytes_meet_the_budget(loaded, shared, context, name, budget):
    """Budgets are ceilings on everything the cache holds: kv_bytes <= b x full + the harness's own metadata, the
    decode state and logit biases inside the budget."""
    method = method_for(loaded, name)
    try:
        result = compressed(loaded, shared, context, method, budget)
    except BudgetError as refusal:
        assert str(refusal) and "\n" not in str(refusal) and "lowest reachable budget" in str(refusal)
        return
    kv_bytes, full = result.cache.kv_bytes(), result.kv_bytes_full
    assert kv_bytes <= budget * full + harness_metadata_bytes(result.cache)
    assert kv_bytes / full >= budget - 0.05  # and it uses what it was given (no method keeps far less)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"full"}))
def test_some_budget_of_the_grid_is_reachable(loaded, shared, context, name):
    """A method that refuses every budget of the grid would pass the ceiling test vacuously."""
    method = method_for(loaded, name)
    reachable = []
    for budget in GRID:
        try:
            compressed(loaded, shared, context, method, budget)
        except BudgetError:
            continue
        reachable.append(budget)
    assert reachable, f"{name} refuses every budget of {GRID} on a {CONTEXT}-token context"


@pytest.mark.parametrize("name", [n for n in METHODS if not REGISTRY[n]().needs().own_prefill])
def test_shared_prefill_equals_own_prefill(loaded, shared, context, name):
    method = method_for(loaded, name)
    own = TimedObservation(prefill(loaded.model, context[0], method.needs()), 0.0)
    try:
        from_shared = cell(loaded, shared, context, method, 0.25)
    except BudgetError:
        pytest.skip(f"{name} refuses budget 0.25 on this context")
    from_own = cell(loaded, own, context, method, 0.25)
    assert from_shared.token_ids == from_own.token_ids and from_shared.kv_bytes == from_own.kv_bytes
    for a, b in zip(from_shared.step_logits, from_own.step_logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_results_are_deterministic(loaded, shared, context, name):
    first = cell(loaded, shared, context, method_for(loaded, name), 0.5)
    second = cell(loaded, shared, context, method_for(loaded, name), 0.5)
    assert first.token_ids == second.token_ids and first.kv_bytes == second.kv_bytes
    assert len(first.step_logits) == len(first.token_ids) > 0
    for a, b in zip(first.step_logits, second.step_logits, strict=True):
        assert torch.equal(a, b)
