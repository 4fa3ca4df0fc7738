"""Lightweight (seed 004, seed_methods.md (d)): each feature against a direct computation, zero guards, the
straight-through relaxation (its forward is inference's selection, its gradient reaches only the scorer), decode
eviction at constant head size, b = 1 is full, training lowers the held-out loss, one-line checkpoint errors."""

import dataclasses
import math
import string
import unicodedata

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.artifacts.training import load_checkpoint
from kvbench.harness.cache.attention import kvbench_attention_enabled
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.cache.prefix import TokenPrefix, stored_bytes
from kvbench.harness.cli.train import train_checkpoint, training_options
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.prefill import prefill
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.harness.runner.sweep import SweepSpec
from kvbench.methods import get_method
from kvbench.methods.lightweight import features as lw
from kvbench.methods.lightweight import training as lt
from kvbench.methods.lightweight.method import Lightweight, LightweightConfig, layout_record

# Tiny Llama, GQA: 4 query heads over 2 KV heads, head_dim 16, hidden 64, 2 layers. A short training for the checkpoint
# tests; LEARN trains at a keep fraction of 0.1 with a high learning rate, so that 4 epochs of 9 prompts move the
# selection (slow-marked: it is the file's longest part).
TRAIN = dict(samples=4, length=1000, response_tokens=4, epochs=1)
LEARN = dict(samples=12, length=1000, response_tokens=8, epochs=4, lr=0.05, keep_fraction=0.1)


@pytest.fixture(scope="module")
def loaded():
    """The tiny model with its output layer scaled up: random init gives near-uniform next-token distributions,
    on which no choice of kept tokens changes the loss; sharper ones depend on the context."""
    tokenizer = build_tasks_tokenizer(chat_template=True)
    model = tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return LoadedModel("tiny", "memory:tiny-llama-gqa", model, tokenizer, torch.device("cpu"), torch.float32)


def kept_per_head(method: Lightweight, context: int, budget: float) -> int:
    """By hand, for the tiny model in fp32: the most tokens per head whose key and value (2 × 16 floats) and decode
    state (an int32 position, an fp32 attn_score and the fp32 fixed features) fit b of the full cache."""
    features = method.config.feature_names
    token = 2 * 16 * 4
    state = 4 + 4 * ("attn_score" in features) + 4 * lw.static_dim(features, 16, 64)
    return math.floor(budget * context * token / (token + state))


def fresh_method(loaded, seed: int = 3, **options) -> Lightweight:
    """A lightweight method holding an untrained scorer (N(0, 0.02) weights), as a checkpoint would hand it over."""
    method = get_method("lightweight", **options)
    config = method.config
    model = loaded.model
    layers, heads, dim, hidden = lt.shapes(model)
    scorer = lw.Scorer(
        config.scorer, config.feature_names, layers, heads, dim, hidden, config.conv_channels, seed, config.standardize
    )
    artifacts = {f"scorer.{k}": v for k, v in scorer.state_dict().items()}
    artifacts["layout"] = lw.encode_layout(layout_record(config, layers, heads, dim, hidden))
    if "token_profiling" in config.feature_names:
        artifacts["token_flags"] = lw.token_flags(loaded.tokenizer, model.config.vocab_size)
    method.load_calibration(artifacts)
    return method


def direct_attention(queries, keys, scaling):
    """[H_kv, T, T] causal softmax per query head, then the group mean."""
    h_q, n, _ = queries.shape
    h_kv = keys.shape[0]
    group = h_q // h_kv
    expanded = keys.repeat_interleave(group, dim=0)
    logits = queries @ expanded.transpose(-1, -2) * scaling
    logits = logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(h_kv, group, n, n).mean(dim=1)


# --- features ----------------------------------------------------------------------------------------------


def test_attn_score_is_the_scaled_mean_of_the_attention_each_token_received(monkeypatch):
    monkeypatch.setattr(lw, "_CHUNK", 3)  # several chunks of query rows
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(4, 10, 8, generator=generator), torch.randn(2, 10, 8, generator=generator)
    attention = direct_attention(queries, keys, 0.35)
    expected = torch.zeros(2, 10)
    for j in range(10):
        for i in range(j, 10):
            expected[:, j] += (i + 1) * attention[:, i, j]
        expected[:, j] /= 10 - j
    assert torch.allclose(lw.prefill_attn_score(queries, keys, 0.35), expected, atol=1e-6)


def test_decode_running_mean_continues_the_prefill_estimate():
    """Prefill over T tokens, then the running mean over m more query rows = the prefill over T + m."""
    generator = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(4, 12, 8, generator=generator), torch.randn(2, 12, 8, generator=generator)
    t = 9
    score = torch.cat([lw.prefill_attn_score(queries[:, :t], keys[:, :t], 0.3), torch.zeros(2, 3)], dim=1)
    attention = direct_attention(queries, keys, 0.3)[:, t:]  # rows t.., over all 12 keys (causal)
    positions = torch.arange(12).expand(2, -1)
    updated = lw.update_attn_score(score, positions, attention, [9, 10, 11])
    assert torch.allclose(updated, lw.prefill_attn_score(queries, keys, 0.3), atol=1e-6)


def test_vector_statistics_match_a_direct_computation_and_are_guarded_at_zero():
    x = torch.tensor([[3.0, -1.0, 2.0, 0.0], [1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    stats = lw.vector_stats(x)
    for row, values in enumerate(x.tolist()):
        mean = sum(values) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
        assert stats["vector_norm"][row].item() == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-6)
        assert stats["vector_cv"][row].item() == pytest.approx(std / (mean if abs(mean) >= 1e-6 else 1e-6), rel=1e-5)
        assert stats["vector_z_score"][row].item() == pytest.approx((max(values) - mean) / max(std, 1e-6), rel=1e-5)
    assert torch.isfinite(torch.stack(list(stats.values()))).all()
    assert stats["vector_cv"][1].item() == pytest.approx(1e6)  # mean 0, std 1: guarded, not inf
    assert stats["vector_z_score"][3].item() == 0.0  # std 0: guarded, not nan


def test_token_flags_mark_special_tokens_and_punctuation():
    tokenizer = build_tasks_tokenizer(chat_template=True)
    flags = lw.token_flags(tokenizer, len(tokenizer) + 5)
    assert flags.shape == (len(tokenizer) + 5, 2)
    assert flags[:, 0].nonzero().flatten().tolist() == sorted(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).strip()
        punctuation = token_id not in tokenizer.all_special_ids and bool(text) and not any(c.isalnum() for c in text)
        punctuation = punctuation and all(c in string.punctuation or unicodedata.category(c)[0] == "P" for c in text)
        assert flags[token_id, 1].item() == float(punctuation), repr(text)
    assert flags[tokenizer.convert_tokens_to_ids("."), 1] == 1.0
    assert flags[len(tokenizer) :].abs().sum() == 0  # ids past the tokenizer (padding rows of the embedding)


@pytest.mark.parametrize(
    "length, out, kernels", [(64, 4, (4, 4)), (128, 4, (4, 8)), (576, 6, (8, 12)), (16, 4, (2, 2))]
)
def test_convolution_output_dims_are_the_divisor_nearest_six(length, out, kernels):
    assert lw.convolution_out(length) == out
    assert lw.convolution_kernels(length) == kernels


def test_double_convolution_is_conv1d_relu_conv1d_min_max_normalised():
    generator = torch.Generator().manual_seed(2)
    conv = lw.DoubleConvolution(2, 3, 64, 5, generator)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    x = torch.randn(3, 7, 64, generator=generator)
    got = conv(1, x)
    for h in range(3):
        hidden = F.relu(F.conv1d(x[h][:, None], conv.w1[1, h][:, None], conv.b1[1, h], stride=conv.k1))
        out = F.conv1d(hidden, conv.w2[1, h][None], conv.b2[1, h][None], stride=conv.k2)[:, 0]
        low, high = out.min(dim=-1, keepdim=True).values, out.max(dim=-1, keepdim=True).values
        assert torch.allclose(got[h], (out - low) / (high - low), atol=1e-5)
    flat = lw.DoubleConvolution(1, 1, 64, 2, generator)  # zero weights: every output equal, guarded to 0
    with torch.no_grad():
        for p in flat.parameters():
            p.zero_()
    assert torch.equal(flat(0, x[:1]), torch.zeros(1, 7, 4))


def test_prefill_features_are_the_observed_vectors_statistics(loaded):
    method = fresh_method(loaded, features="all", scorer="mlp")
    ids = random_ids(40, seed=4, low=4)
    observation = prefill(loaded.model, ids, method.needs())
    attn, static, features = lw.prefill_layer_features(method.scorer, observation, 1, method.flags)
    assert features.shape == (2, 40, lw.feature_dim(lw.FEATURES, 16, 64))
    k, v = observation.keys[1], observation.values[1]
    q = observation.window_queries[1].reshape(2, 2, 40, 16).mean(dim=1)
    x = observation.hidden_states[1]
    assert torch.allclose(
        features[..., 0], lw.prefill_attn_score(observation.window_queries[1], k, observation.scaling)
    )
    assert torch.allclose(features[..., 1], torch.arange(40.0).expand(2, -1) / 39)
    norms = torch.stack([k.norm(dim=-1), v.norm(dim=-1), q.norm(dim=-1), x.norm(dim=-1).expand(2, -1)], dim=-1)
    assert torch.allclose(features[..., 2:6], norms, rtol=1e-5)
    mean, std = q.mean(dim=-1), q.std(dim=-1, unbiased=False)
    assert torch.allclose(features[..., 8], std / mean, rtol=1e-4)  # cv of q̄
    assert torch.allclose(features[..., 13], (x.max(dim=-1).values - x.mean(dim=-1)) / x.std(dim=-1, unbiased=False))
    special = torch.tensor([i in loaded.tokenizer.all_special_ids for i in ids], dtype=torch.float32)
    assert torch.equal(features[..., 14], special.expand(2, -1))
    assert torch.equal(static, features[..., 2:])


# --- the relaxation ----------------------------------------------------------------------------------------


def test_relaxed_weights_forward_is_the_hard_selection_and_backward_the_soft_relaxation():
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 30, generator=generator, requires_grad=True)
    rows = torch.arange(30, 34)
    weights = lt.relaxed_weights(scores, rows, 12, 4, 5, 0.7)
    kept = weights.detach()[:, 0]
    assert set(kept.unique().tolist()) <= {0.0, 1.0} and torch.equal(kept.sum(dim=-1), torch.tensor([12.0, 12.0]))
    assert (kept[:, :4] == 1).all() and (kept[:, -5:] == 1).all()  # protected: first 4, last 5
    unprotected = scores.detach()[:, 4:25]
    for h in range(2):
        chosen = kept[h, 4:25].nonzero().flatten()
        assert torch.equal(chosen.sort().values, unprotected[h].topk(3).indices.sort().values)
    # backward: the gradient of the soft weights n_i·p_j/Σp (p = softmax(s/τ), protected at the max)
    probe = torch.randn(weights.shape, generator=generator)
    (weights * probe).sum().backward()
    guarded = torch.arange(30).lt(4) | torch.arange(30).ge(25)
    reference = scores.detach().clone().requires_grad_(True)
    forced = torch.where(guarded, reference.max(dim=-1, keepdim=True).values.detach(), reference)
    soft = torch.softmax(forced / 0.7, dim=-1) * 30
    (soft[:, None, :] * probe).sum().backward()
    assert torch.allclose(scores.grad, reference.grad, atol=1e-6)


def test_relaxed_weights_are_causal_for_rows_inside_the_context():
    scores = torch.zeros(1, 6)
    weights = lt.relaxed_weights(scores, torch.tensor([2, 5]), 6, 0, 1, 0.7)
    assert torch.equal(weights[0, 0], torch.tensor([1.0, 1, 1, 0, 0, 0]))  # row at position 2 sees 3 keys
    assert torch.equal(weights[0, 1], torch.ones(6))


def tail_logits_through_kvbench(model, prefixes, context_length, tail_ids):
    """Logits of every tail position fed after a compressed context, through kvbench's cache and attention."""
    cache = KVBenchCache(model.config.num_hidden_layers, prefixes, context_length)
    with torch.no_grad(), kvbench_attention_enabled(model):
        out = model(
            input_ids=torch.tensor([tail_ids]),
            position_ids=torch.arange(context_length, context_length + len(tail_ids))[None],
            **cache_argument(model, cache),
            use_cache=True,
            logits_to_keep=0,
            kvbench_cache=cache,
        )
    return out.logits[0]


@pytest.mark.parametrize("features", ["attn_score,vector_norm", "all"])
def test_training_loss_is_the_loss_of_what_inference_keeps(loaded, features):
    """The relaxed forward equals inference: compress at keep_fraction, then teacher-force through kvbench."""
    method = fresh_method(loaded, features=features, keep_fraction=0.3)
    context, question, response = random_ids(80, seed=6), random_ids(5, seed=7), random_ids(6, seed=8)
    example = lt.Example(context, question, response, {})
    observation = prefill(loaded.model, context, method.needs())
    prepared = lt.prepare(method.config.feature_names, observation, method.flags)
    loss = lt.example_loss(loaded.model, method.scorer, example, prepared, method.config)
    # Training keeps int(keep_fraction·N) = 24 tokens; inference keeps as many at the budget that pays for their
    # decode state too, a little above keep_fraction.
    budget = next(b / 1000 for b in range(300, 1000) if kept_per_head(method, 80, b / 1000) >= 24)
    prefixes = method.compress(observation, budget)
    assert prefixes[0].head_lengths() == [24, 24]
    logits = tail_logits_through_kvbench(loaded.model, prefixes, 80, question + response)
    expected = F.cross_entropy(logits[4:10], torch.tensor(response))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    full = lt.example_loss(loaded.model, None, example, prepared, method.config)
    plain = [TokenPrefix(k, v) for k, v in zip(observation.keys, observation.values)]
    logits = tail_logits_through_kvbench(loaded.model, plain, 80, question + response)
    assert full.item() == pytest.approx(F.cross_entropy(logits[4:10], torch.tensor(response)).item(), abs=1e-5)


def test_gradients_reach_the_scorer_and_never_the_frozen_model(loaded):
    method = fresh_method(loaded, features="all", scorer="mlp")
    scorer = method.scorer.train().requires_grad_(True)
    model = loaded.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.requires_grad_(False)
    example = lt.Example(random_ids(60, seed=9), random_ids(4, seed=10), random_ids(5, seed=11), {})
    prepared = lt.prepare(scorer.features, prefill(model, example.context_ids, method.needs()), method.flags)
    lt.example_loss(model, scorer, example, prepared, method.config).backward()
    grads = {name: p.grad for name, p in scorer.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(True)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


# --- inference ---------------------------------------------------------------------------------------------


def test_budget_one_is_the_full_cache(loaded):
    method = fresh_method(loaded)
    ids, question = random_ids(50, seed=12), random_ids(4, seed=13)
    observation = prefill(loaded.model, ids, method.needs())
    prefixes = method.compress(observation, 1.0)
    assert prefixes.decode_state is None
    full = get_method("full").compress(observation, 1.0)
    outputs = []
    for layers, hook in ((prefixes, method), (full, None)):
        cache = KVBenchCache(2, layers, 50)
        outputs.append(
            greedy_decode(
                loaded.model, cache, question, 8, [], step_hook=hook.on_decode_step if hook else None,
                start_hook=hook.on_decode_start if hook else None, keep_logits=True,
            )
        )  # fmt: skip
    assert outputs[0].token_ids == outputs[1].token_ids
    assert all(torch.equal(a, b) for a, b in zip(outputs[0].step_logits, outputs[1].step_logits))


def test_attn_score_is_computed_once_per_observation_and_layer(loaded, monkeypatch):
    """Cells at several budgets and several scorers over one observation share one attn_score per layer; their
    kept tokens and decode state are those of compressions of fresh (unshared) observations."""
    calls = []
    original = lw.prefill_attn_score
    monkeypatch.setattr(lw, "prefill_attn_score", lambda *a: calls.append(1) or original(*a))
    methods = [fresh_method(loaded, seed=3), fresh_method(loaded, seed=4, scorer="mlp")]
    ids = random_ids(48, seed=21)
    shared = prefill(loaded.model, ids, methods[0].needs())
    for method in methods:
        for budget in (0.5, 0.25):
            prefixes = method.compress(shared, budget)
            alone = method.compress(prefill(loaded.model, ids, method.needs()), budget)
            assert all(torch.equal(a, b) for a, b in zip(prefixes.decode_state.positions, alone.decode_state.positions))
            assert all(torch.equal(a, b) for a, b in zip(prefixes.decode_state.attn, alone.decode_state.attn))
            assert all(torch.equal(a.keys, b.keys) for a, b in zip(prefixes, alone))
    assert len(calls) == 2 + 4 * 2  # the shared observation's two layers once; each fresh one's two layers


@pytest.mark.parametrize("features", ["attn_score,vector_norm", "all"])
def test_decode_eviction_keeps_each_heads_size_and_its_protected_tokens(loaded, features):
    method = fresh_method(loaded, features=features, scorer="mlp")
    ids, question = random_ids(60, seed=14), random_ids(5, seed=15)
    observation = prefill(loaded.model, ids, method.needs())
    prefixes = method.compress(observation, 0.6)
    cache = KVBenchCache(2, prefixes, 60)
    state = cache.method_state
    # Fewer than int(0.6·60) = 36, the state being paid from the budget; still more than the 14 protected.
    kept = kept_per_head(method, 60, 0.6)
    assert [p.head_lengths() for p in prefixes] == [[kept, kept]] * 2 and 14 < kept < 36
    assert cache.kv_bytes() == stored_bytes(list(prefixes)) + stored_bytes(state)  # the state is counted
    assert cache.kv_bytes() <= 0.6 * observation.kv_bytes_full()  # and within the budget
    sizes, kept_positions = [], []

    def step(cache, index):
        method.on_decode_step(cache, index)
        sizes.append([layer.prefix.head_lengths() for layer in cache.layers])
        kept_positions.append([p.clone() for p in state.positions])
        assert all(layer.tail_length == 0 for layer in cache.layers)

    greedy_decode(loaded.model, cache, question, 12, [], step_hook=step, start_hook=method.on_decode_start)
    assert sizes == [[[kept + 5] * 2] * 2] * 11  # budget + question, constant
    for index, positions in enumerate(kept_positions):
        seen = 60 + 5 + index + 1
        for layer in positions:
            for head in layer:
                assert set(range(4)) <= set(head.tolist())  # global tokens
                assert set(range(seen - 10, seen)) <= set(head.tolist())  # recent window
                assert head.tolist() == sorted(head.tolist())
    # every kept token's stored state matches its own features
    layer = cache.layers[1]
    keys = layer.prefix.materialize().keys
    assert torch.allclose(state.static[1][..., 0], keys.norm(dim=-1), rtol=1e-6)  # ‖k‖ of the token now stored
    assert state.attn[1].shape == state.positions[1].shape == keys.shape[:2]


def test_decode_after_eviction_refuses_a_batch(loaded):
    method = fresh_method(loaded)
    observation = prefill(loaded.model, random_ids(40, seed=16), method.needs())
    cache = KVBenchCache(2, method.compress(observation, 0.5), 40)
    method.on_decode_start(cache)
    with (
        pytest.raises(KVBenchError, match="expected 1 sequence"),
        torch.no_grad(),
        kvbench_attention_enabled(loaded.model),
    ):
        loaded.model(input_ids=torch.tensor([[5], [6]]), position_ids=torch.tensor([[40], [40]]),
                     **cache_argument(loaded.model, cache), use_cache=True, kvbench_cache=cache)  # fmt: skip


# --- training and checkpoints ------------------------------------------------------------------------------


def test_training_seeds_are_disjoint_from_evaluation():
    assert {f.name: f.default for f in dataclasses.fields(SweepSpec)}["seed"] == lt.EVALUATION_SEED
    lt.check_disjoint(lt.DATA_SEED, lt.TASKS, 1024, 100)
    with pytest.raises(AssertionError):
        lt.check_disjoint(lt.EVALUATION_SEED, lt.TASKS, 1024, 100)


@pytest.fixture(scope="module")
def trained(loaded, tmp_path_factory):
    method = get_method("lightweight", **TRAIN)
    out = tmp_path_factory.mktemp("lw") / "lw.pt"
    summary = train_checkpoint(method, loaded, out, say=lambda _: None)
    return method, out, summary


@pytest.mark.slow
def test_training_lowers_the_heldout_loss(loaded):
    trained = lt.train(loaded.model, loaded.tokenizer, LightweightConfig(**LEARN))
    heldout = trained.losses["heldout"]
    assert heldout["trained"] < heldout["untrained"] - 0.005  # measured: 1.5572 untrained → 1.5411 trained
    assert trained.losses["heldout_epochs"][-1] == heldout["trained"]
    assert len(trained.data["heldout_indices"]) == 3 and len(trained.data["train_indices"]) == 9


def test_checkpoint_records_its_data_split_and_losses(loaded, trained):
    method, out, summary = trained
    payload = load_checkpoint(out, "lightweight", None, "tiny")
    data = payload["data"]
    assert len(data["examples"]) == 4 and data["data_seed"] == lt.DATA_SEED
    assert sorted(data["train_indices"] + data["heldout_indices"]) == list(range(4))
    assert not set(data["train_indices"]) & set(data["heldout_indices"])
    assert {e["kind"] for e in data["examples"]} == {"task"}  # prose is the 6th source
    heldout = payload["losses"]["heldout"]
    assert set(heldout) == {"untrained", "trained", "full_cache"}
    assert payload["losses"]["heldout_epochs"][-1] == heldout["trained"]
    assert lw.decode_layout(payload["artifacts"]["layout"])["features"] == ["attn_score", "vector_norm"]
    again = get_method("lightweight", checkpoint=str(out), **TRAIN)
    ensure_calibrated(loaded, again, say=lambda _: None)
    assert again.artifact_fingerprint() == method.artifact_fingerprint()
    assert again.method_bytes() == sum(t.numel() * 4 for t in method.scorer.state_dict().values())


def test_mismatched_or_corrupt_checkpoint_is_one_line(loaded, trained, tmp_path):
    _, out, _ = trained
    with pytest.raises(KVBenchError, match="trained with scorer=linear") as error:
        ensure_calibrated(loaded, get_method("lightweight", checkpoint=str(out), scorer="mlp"), say=lambda _: None)
    assert "\n" not in str(error.value) and "lightweight:scorer=linear" in str(error.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(out.read_bytes()[:200])
    with pytest.raises(KVBenchError, match="corrupt") as error:
        ensure_calibrated(loaded, get_method("lightweight", checkpoint=str(corrupt)), say=lambda _: None)
    assert "\n" not in str(error.value)
    other = LoadedModel("tiny", "memory:other", tiny_model("llama-mha", layers=3, vocab=len(loaded.tokenizer)),
                        loaded.tokenizer, torch.device("cpu"), torch.float32)  # fmt: skip
    with pytest.raises(KVBenchError, match="another model"):
        ensure_calibrated(other, get_method("lightweight", checkpoint=str(out)), say=lambda _: None)
    method = get_method("lightweight", checkpoint=str(out))
    method.load_calibration(load_checkpoint(out, "lightweight", None, "tiny")["artifacts"])
    observation = prefill(other.model, random_ids(30, seed=17), method.needs())
    with pytest.raises(KVBenchError, match="another model shape"):
        method.compress(observation, 0.5)


def test_standardization_is_the_training_splits_statistics_and_inference_applies_it(loaded):
    """shift / scale = mean / (1 / std) of each (layer, KV head, feature) over the training split's context tokens,
    recomputed here through inference's own prefill; the convolutions' outputs pass unchanged; the loaded scorer's
    scores are the linear map of the standardised features."""
    config = LightweightConfig(features="attn_score,vector_norm,convolution", **TRAIN)
    trained = lt.train(loaded.model, loaded.tokenizer, config)
    method = get_method("lightweight", features=config.features)
    method.load_calibration(trained.weights)
    probe = fresh_method(loaded, features=config.features, standardize=False).scorer
    prompts = lt.prompts(loaded.tokenizer, config)
    contexts = [prompts[i][0] for i in trained.data["train_indices"]]
    observations = [prefill(loaded.model, ids, method.needs()) for ids in contexts]
    plain = 1 + 4  # attn_score and the four norms come before the convolutions' 3·4 + 4 outputs
    shift, scale = trained.weights["scorer.shift"], trained.weights["scorer.scale"]
    for layer in range(2):
        features = torch.cat([lw.prefill_layer_features(probe, o, layer, None)[2] for o in observations], dim=1)
        values = features[..., :plain].double()
        assert torch.allclose(shift[layer, :, :plain].double(), values.mean(dim=1), rtol=1e-5, atol=1e-6)
        assert torch.allclose(scale[layer, :, :plain].double(), 1 / values.std(dim=1, unbiased=False), rtol=1e-5)
        assert torch.equal(shift[layer, :, plain:], torch.zeros(2, 16))
        assert torch.equal(scale[layer, :, plain:], torch.ones(2, 16))
    observation = observations[0]
    features = lw.prefill_layer_features(method.scorer, observation, 1, None)[2]
    standardised = (features - shift[1][:, None]) * scale[1][:, None]
    weight, bias = trained.weights["scorer.weight"][1], trained.weights["scorer.bias"][1]
    expected = (standardised * weight[:, None]).sum(dim=-1) + bias[:, None]
    assert torch.allclose(method.scorer(1, features), expected, atol=1e-5)


def test_checkpoints_from_before_standardization_load_as_unstandardized(loaded):
    """A checkpoint whose layout has no `standardize` was trained on raw features: it loads with
    standardize=false, and the default (standardised) configuration refuses it in one line naming that option."""
    layers, heads, dim, hidden = lt.shapes(loaded.model)
    scorer = lw.Scorer("linear", ("attn_score", "vector_norm"), layers, heads, dim, hidden, 4, 5)
    record = layout_record(LightweightConfig(), layers, heads, dim, hidden)
    del record["standardize"]
    artifacts = {f"scorer.{k}": v for k, v in scorer.state_dict().items()}
    artifacts["layout"] = lw.encode_layout(record)
    with pytest.raises(KVBenchError, match="trained with standardize=false") as error:
        get_method("lightweight").load_calibration(artifacts)
    assert "\n" not in str(error.value) and "lightweight:standardize=false" in str(error.value)
    old = get_method("lightweight", standardize=False)
    old.load_calibration(artifacts)
    features = torch.randn(heads, 7, 5)
    assert torch.equal(old.scorer(0, features), scorer(0, features))


def test_training_options_are_the_issue_flags():
    options = training_options(
        "lightweight",
        LightweightConfig,
        ["--features", "all", "--scorer", "mlp", "--keep-fraction", "0.1", "--epochs", "2", "--samples", "9"],
    )
    assert options == {"features": "all", "scorer": "mlp", "keep_fraction": 0.1, "epochs": 2, "samples": 9}
    assert LightweightConfig(features="all").feature_names == lw.FEATURES
    with pytest.raises(KVBenchError, match="lightweight features"):
        get_method("lightweight", features="attn_score,colour")
