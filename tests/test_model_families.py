"""Every model family, exactly (issue 29): `full` through kvbench equals transformers' own generation on tiny
models of each family, with attention sharpened so that sliding windows, soft-capping and sinks change the output
(shown by switching each off); unsupported families are refused in one line before their weights load; window
layers are measured as transformers' cache holds them; scorers that read model internals check what they derive
against the queries the model really used.

The method matrix over every family (every registered method at b = 0.5 within its budget and equal to `full` at
b = 1) runs the methods that train (minutes each on 2 cores) only with `-m slow`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build_tasks_tokenizer
from model_zoo import FAMILIES, family_config, family_model, random_ids, switched_off
from test_exactness import kvbench_generation, reference_generation
from test_method_contract import TINY_MODEL_OPTIONS, harness_metadata_bytes
from transformers import DynamicCache

from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.cli.commands import main
from kvbench.harness.engine.batched_decode import DecodeRow, batched_greedy_decode
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, run_cell, shared_needs
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.models.families import kept_positions, sliding_windows, unsupported_feature
from kvbench.harness.models.loading import LoadedModel, load_model
from kvbench.methods import REGISTRY, get_method, load_all
from kvbench.methods import expected_attention as ea

SERVED = sorted(name for name, family in FAMILIES.items() if family.refused is None)
REFUSED = sorted(name for name, family in FAMILIES.items() if family.refused is not None)
FEATURES = [(name, feature) for name in SERVED for feature in FAMILIES[name].features]
CONTEXT, QUESTION, NEW_TOKENS = 40, 5, 8  # the window (12 tokens) is far shorter than the context


def _assert_same(tokens, logits, ref_tokens, ref_logits):
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) == NEW_TOKENS
    for ours, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SERVED)
def test_full_equals_transformers_generate(name):
    model = family_model(name)
    context, question = random_ids(CONTEXT, seed=1), random_ids(QUESTION, seed=2)
    _assert_same(
        *kvbench_generation(model, context, question, new_tokens=NEW_TOKENS),
        *reference_generation(model, context, question, NEW_TOKENS),
    )


@pytest.mark.parametrize("method", ["full", "kivi"])
def test_a_window_keeps_sliding_over_a_whole_context_in_original_positions(method):
    """A context shorter than the window is kept whole (compressible, like a full-attention layer); as the answer
    grows past the window the earliest context positions leave it, exactly as in transformers' own cache."""
    model = family_model("mistral-window")
    context, question = random_ids(10, seed=8), random_ids(QUESTION, seed=9)  # 10 + 5 + 8 > 12
    observation = prefill(model, context, ObservationNeeds())
    assert observation.windowed_layers() == {}
    cache = KVBenchCache(observation.num_layers, get_method(method).compress(observation, 1.0), len(context))
    generation = greedy_decode(model, cache, question, NEW_TOKENS, [2], keep_logits=True)
    _assert_same(
        generation.token_ids, generation.step_logits, *reference_generation(model, context, question, NEW_TOKENS)
    )


def test_a_window_that_leaves_an_evicted_context_refuses_the_cell():
    """Which positions a ragged eviction kept is not recorded: once the window would hide some context position,
    the cell is refused (a sweep records it), never answered with the wrong positions."""
    model = family_model("mistral-window")
    context, question = random_ids(10, seed=8), random_ids(QUESTION, seed=9)
    observation = prefill(model, context, get_method("adakv").needs())
    cache = KVBenchCache(observation.num_layers, get_method("adakv").compress(observation, 0.5), len(context))
    with pytest.raises(BudgetError, match="no longer covers the compressed context"):
        greedy_decode(model, cache, question, NEW_TOKENS, [2])


@pytest.mark.parametrize(("name", "feature"), FEATURES)
def test_switching_a_feature_off_changes_the_output(name, feature):
    """The exactness test above would fail if kvbench ignored the feature: the model without it answers with
    logits far outside the 1e-5 tolerance."""
    context, question = random_ids(CONTEXT, seed=1), random_ids(QUESTION, seed=2)
    _, with_it = reference_generation(family_model(name), context, question, NEW_TOKENS)
    _, without = reference_generation(switched_off(name, feature), context, question, NEW_TOKENS)
    assert max(float((a - b).abs().max()) for a, b in zip(with_it, without, strict=True)) > 1e-3


@pytest.mark.parametrize("name", SERVED)
def test_batched_rows_equal_each_row_alone(name):
    """Batched decoding applies windows, caps and sinks per row as the single path does."""
    model = family_model(name)
    context, question = random_ids(CONTEXT, seed=3), random_ids(QUESTION, seed=4)
    observation = prefill(model, context, ObservationNeeds(window=16))
    alone = []
    caches = []
    for method, budget in (("full", 1.0), ("snapkv", 0.5), ("streaming_llm", 0.5)):
        try:
            prefixes = get_method(method).compress(observation, budget)
        except BudgetError:
            continue
        caches.append(lambda p=prefixes: KVBenchCache(observation.num_layers, p, observation.context_length))
        alone.append(greedy_decode(model, caches[-1](), question, NEW_TOKENS, [2], keep_logits=True, first_logits=None))
    rows = [DecodeRow(make(), list(question), NEW_TOKENS) for make in caches]
    batched = batched_greedy_decode(model, rows, [2], None, keep_logits=True)
    for row, single in zip(batched, alone, strict=True):
        assert row.generation.token_ids == single.token_ids
        for a, b in zip(row.generation.step_logits, single.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SERVED)
def test_windows_are_what_the_attention_applies_and_the_full_bytes_what_transformers_holds(name):
    model = family_model(name)
    context = random_ids(CONTEXT, seed=5)
    observation = prefill(model, context, ObservationNeeds())
    assert [a.window for a in observation.attention] == sliding_windows(model.config)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([context]), **cache_argument(model, cache), use_cache=True)
    held = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)
    assert observation.kv_bytes_full() == held
    full = get_method("full").compress(observation, 1.0)
    assert KVBenchCache(observation.num_layers, full, CONTEXT).kv_bytes() == held


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_families_are_refused_in_one_line_before_their_weights_load(name, tmp_path, capsys):
    """Only config.json is written: a loader that reached for the weights would fail otherwise."""
    family_config(name).save_pretrained(tmp_path)
    assert not any(p.suffix in (".safetensors", ".bin") for p in tmp_path.iterdir())
    with pytest.raises(KVBenchError, match=f"not supported: {FAMILIES[name].refused}"):
        load_model(str(tmp_path), "cpu", "float32")
    argv = ["run", "--model", str(tmp_path), "--methods", "full", "--budgets", "1", "--tasks", "niah_single_1"]
    assert main([*argv, "--lengths", "64", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvbench: error: model") and "not supported" in err[0]


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_families_are_refused_on_every_path_that_builds_a_kvbench_model(name):
    model = family_model(name)
    with pytest.raises(KVBenchError, match="not supported"):
        prefill(model, random_ids(16), ObservationNeeds())


def test_the_support_check_reads_configs_as_written():
    assert unsupported_feature({"num_hidden_layers": 2, "kv_lora_rank": 512}).startswith("multi-head latent")
    assert "conv" in unsupported_feature({"layer_types": ["conv", "full_attention"]})
    assert "state-space" in unsupported_feature({"mamba_d_state": 16})
    assert "chunked" in unsupported_feature({"attention_chunk_size": 8192})
    assert unsupported_feature({"text_config": {"layer_types": ["sliding_attention", "full_attention"]}}) is None
    assert kept_positions(
        {
            "num_hidden_layers": 3,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
        20,
    ) == [7, 20, 7]
    assert kept_positions({"num_hidden_layers": 2, "sliding_window": 64}, 20) == [20, 20]


@pytest.mark.parametrize("name", SERVED)
def test_expected_attention_derives_the_queries_the_model_used_or_refuses(name):
    """Pre-RoPE queries recomputed from the hidden states, rotated in the verified layout, are the post-RoPE
    queries recorded through the attention function (fp32: within 1e-3 relative); a layout that does not
    reproduce them is refused."""
    model = family_model(name)
    observation = prefill(model, random_ids(CONTEXT, seed=6), get_method("expected_attention").needs())
    for layer in range(observation.num_layers):
        queries = ea.pre_rope_queries(observation, layer)
        layout = ea.verified_rotation(observation, layer, queries)
        n = observation.context_length
        recorded = observation.window_queries[layer].float()
        positions = torch.arange(n - recorded.shape[1], n)
        cos, sin = ea._cos_sin(observation, layer, positions)
        predicted = ea._rotary(layout, queries[:, n - recorded.shape[1] :], cos, sin)
        assert float((predicted - recorded).norm() / recorded.norm()) < 1e-3
        # averaged_rope over one position is that position's rotation, applied as a matrix
        rotation = ea.averaged_rope(observation, n - 1, 1, layer, layout)
        torch.testing.assert_close(queries[:, -1] @ rotation.T, recorded[:, -1], rtol=1e-4, atol=1e-4)


def test_expected_attention_refuses_queries_it_cannot_reproduce():
    model = family_model("cohere")  # rotated pairs: rotate-half would be wrong
    observation = prefill(model, random_ids(CONTEXT, seed=6), get_method("expected_attention").needs())
    queries = ea.pre_rope_queries(observation, 0)
    assert ea.verified_rotation(observation, 0, queries) == "pairs"
    with pytest.raises(BudgetError, match="cannot derive this model's queries"):
        ea.verified_rotation(observation, 0, queries.flip(-1))


# --- every registered method on every family ---------------------------------------------------------------

load_all()
# Learned and calibrated methods trained just enough to run (what the matrix checks is that they run within their
# budget on every architecture, not that they are good).
FAMILY_OPTIONS = {
    **TINY_MODEL_OPTIONS,
    "lightweight": {"samples": 4, "response_tokens": 8, "epochs": 1},
    "autoencoder": {"tokens": 1024, "window": 256, "epochs": 2},
}
LEARNED = {"lightweight", "autoencoder", "adaptive_policy", "zack", "razor", "uncomp", "attention_clustering"}


def _matrix_params():
    for family in SERVED:
        for method in sorted(REGISTRY):
            marks = [pytest.mark.slow] if method in LEARNED else []
            yield pytest.param(family, method, marks=marks, id=f"{family}-{method}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tasks_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    previous = os.environ.get("KVBENCH_CACHE_DIR")
    os.environ["KVBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("calibration"))
    yield
    if previous is None:
        del os.environ["KVBENCH_CACHE_DIR"]
    else:
        os.environ["KVBENCH_CACHE_DIR"] = previous


_LOADED: dict[str, tuple] = {}


def _family_setup(family: str, tokenizer):
    """The family's model with the task tokenizer, one 400-token context and the shared prefill (once each)."""
    if family not in _LOADED:
        model = family_model(family, vocab_size=len(tokenizer))
        loaded = LoadedModel("tiny", f"memory:{family}", model, tokenizer, torch.device("cpu"), torch.float32)
        context, question = random_ids(400, seed=11), random_ids(5, seed=12)
        needs = shared_needs([get_method(n) for n in REGISTRY]).union(
            ObservationNeeds(window=128, column_sums=True, hidden_states=True)
        )
        shared = TimedObservation(prefill(model, context, needs), 0.0)
        full = run_cell(loaded, shared, get_method("full"), 1.0, question, 8, keep_logits=True, context_ids=context)
        _LOADED[family] = (loaded, context, question, shared, full)
    return _LOADED[family]


@pytest.mark.parametrize(("family", "name"), list(_matrix_params()))
def test_every_method_on_every_family(family, name, tokenizer, calibration_dir):
    """At b = 1 the method answers like `full`; at b = 0.5 it keeps at most half the cache a plain transformers
    cache holds (window layers included) plus its counted metadata, or refuses in one line."""
    loaded, context, question, shared, full = _family_setup(family, tokenizer)
    try:
        method = get_method(name, **FAMILY_OPTIONS.get(name, {}))
        ensure_calibrated(loaded, method, say=lambda _: None)
        observed = None if method.prefills_itself(loaded.model.config, len(context), 1.0) else shared
        one = run_cell(loaded, observed, method, 1.0, question, 8, keep_logits=True, context_ids=context)
    except BudgetError as refusal:
        assert "\n" not in str(refusal) and str(refusal)
        return
    assert one.token_ids == full.token_ids
    for a, b in zip(one.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if not method.uses_budget:
        return
    try:
        observed = None if method.prefills_itself(loaded.model.config, len(context), 0.5) else shared
        half = compress_context(loaded, observed, method, 0.5, context)
    except BudgetError as refusal:
        assert "\n" not in str(refusal) and str(refusal)
        return
    assert half.cache.kv_bytes() / half.kv_bytes_full <= 0.5 + harness_metadata_bytes(half.cache) / half.kv_bytes_full
    try:
        run_cell(loaded, observed, method, 0.5, question, 8, context_ids=context)
    except BudgetError as refusal:  # e.g. a window that stops covering what the method kept
        assert "\n" not in str(refusal)


def test_hybrid_budget_example():
    """What the budget means on a hybrid model, measured: gemma3's 5 local : 1 global layers at 400 tokens with
    a 12-token window. The windows hold 5 × 11 positions, the global layer 400: b = 0.5 of the 455 positions
    leaves 172.5 for the global layer (0.431 of it); below 55/455 = 0.121 no budget is reachable."""
    model = family_model("gemma3")
    observation = prefill(model, random_ids(400, seed=7), ObservationNeeds(window=64))
    windows = observation.windowed_layers()
    assert windows == {i: 11 for i in range(6) if i != 5}
    full = observation.kv_bytes_full()
    snap = get_method("snapkv")
    kept = snap.compress(observation, 0.5)
    cache = KVBenchCache(observation.num_layers, kept, 400)
    assert cache.kv_bytes() <= 0.5 * full
    assert cache.layers[5].prefix.head_lengths() == [172, 172]  # floor(0.5 · 455 − 55)
    assert all(cache.layers[i].prefix.head_lengths() == [11, 11] for i in windows)
    with pytest.raises(BudgetError, match="sliding-window layers alone hold 0.121"):
        snap.compress(observation, 0.1)
    assert json.dumps(kept_positions(model.config, 400)) == "[11, 11, 11, 11, 11, 400]"
