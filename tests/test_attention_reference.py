"""kvbench's ragged and logit-bias attention against a reference that shares none of its code (issue 10, item 9).

Ragged eviction and merged tokens reach the model only through `TokenPrefix`, `KVBenchCache`, `attend_compressed`
and the decode loop. Comparing that path with itself (b = 1 against `full`) cannot catch a head attending to the
wrong keys or a bias applied to the wrong token, because at b = 1 nothing is dropped and no bias is set. So here
the same question is answered a second way: a small forward pass of the tiny model written in plain torch from
the model's weights, over the *full* sequence (context, question, generated tokens), where each context key of
each KV head carries a multiplicity for the tokens after the context: 0 for a dropped key, 1 for a kept one, c
for a token that stands for c identical copies. Attention there is a count-weighted softmax over the full causal
cache, so it knows nothing of packing, splitting, tails, biases or the SDPA fast path.

The reference is validated first: with every count 1 it reproduces the model's own eager logits, and with a
layer-independent pattern of drops and counts it reproduces transformers' eager attention under a per-head 4D
additive mask (log count). Only then is it trusted to judge kvbench.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHITECTURES, random_ids, tiny_model

from kvbench.harness.cache.attention import kvbench_attention_enabled
from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.cache.prefix import TokenPrefix
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill

CONTEXT = 40
QUESTION = 5
STEPS = 6
ATOL = 1e-5
# A change the tests must see: far above ATOL, on logits of scale ~0.1 from the random tiny models.
MATTERS = 100 * ATOL


# --- the reference forward --------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: list[int], counts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [S, vocab] of every position of `ids`, with the context keys weighted per layer and KV head.

    counts[layer] is [H_kv, N] for the first N tokens (the context): how many copies of each context key the
    tokens after the context see. Context tokens themselves always attend causally to the whole context, as
    the prefill did. None means the full cache. Every position keeps its own absolute RoPE position.
    """
    config = model.config
    assert config.hidden_act == "silu"
    h_q, h_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // h_q
    group = h_q // h_kv
    length = len(ids)
    tokens = torch.tensor(ids)
    x = F.embedding(tokens, model.model.embed_tokens.weight)
    cos, sin = (t[0] for t in model.model.rotary_emb(x[None], torch.arange(length)[None]))
    weights = torch.ones(length, length).tril().expand(h_kv, length, length).clone()
    for layer_idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        layer_weights = weights.clone()
        if counts is not None:
            n = counts[layer_idx].shape[1]
            layer_weights[:, n:, :n] = counts[layer_idx][:, None, :].float()
        h = _rms_norm(x, layer.input_layernorm)
        q = _rotate(_linear(h, attn.q_proj).view(length, h_q, head_dim).transpose(0, 1), cos, sin)
        k = _rotate(_linear(h, attn.k_proj).view(length, h_kv, head_dim).transpose(0, 1), cos, sin)
        v = _linear(h, attn.v_proj).view(length, h_kv, head_dim).transpose(0, 1)
        # KV head j serves query heads j·group … (j+1)·group − 1, as in transformers' repeat_kv.
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        layer_weights = layer_weights.repeat_interleave(group, 0)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(layer_weights == 0, float("-inf"))
        scores = scores - scores.amax(-1, keepdim=True)
        probs = layer_weights * scores.exp()
        probs = probs / probs.sum(-1, keepdim=True)
        x = x + _linear((probs @ v).transpose(0, 1).reshape(length, h_q * head_dim), attn.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        x = x + _linear(F.silu(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj), mlp.down_proj)
    return F.linear(_rms_norm(x, model.model.norm), model.lm_head.weight, model.lm_head.bias)


# --- kvbench's side: prefixes built straight from the prefill ----------------------------------------------------


def token_prefixes(observation: Observation, counts: list[torch.Tensor], as_bias: bool) -> list[TokenPrefix]:
    """One TokenPrefix per layer holding, per KV head, each context key `count` times.

    as_bias=True stores a key with count c once, with logit bias ln(c) (how a merging method stores it);
    as_bias=False stores c identical copies and no bias (how eviction stores kept tokens).
    """
    prefixes = []
    for keys, values, layer_counts in zip(observation.keys, observation.values, counts, strict=True):
        head_keys, head_values, head_bias = [], [], []
        for head, head_counts in enumerate(layer_counts):
            kept = torch.nonzero(head_counts).flatten()
            if as_bias:
                index = kept
                head_bias.append(head_counts[kept].float().log())
            else:
                index = kept.repeat_interleave(head_counts[kept].long())
            head_keys.append(keys[head, index])
            head_values.append(values[head, index])
        prefixes.append(TokenPrefix(head_keys, head_values, head_bias if as_bias else None))
    return prefixes


def kvbench_question_logits(model, observation: Observation, prefixes, question: list[int]) -> torch.Tensor:
    """Logits [L, vocab] of every question token, fed in one forward after the compressed context."""
    n = observation.context_length
    cache = KVBenchCache(observation.num_layers, prefixes, n)
    with torch.inference_mode(), kvbench_attention_enabled(model):
        out = model(
            input_ids=torch.tensor([question]),
            position_ids=torch.arange(n, n + len(question))[None],
            **cache_argument(model, cache),
            use_cache=True,
            logits_to_keep=0,
            kvbench_cache=cache,
        )
    return out.logits[0]


def assert_decode_matches_reference(model, observation, prefixes, context, question, counts):
    """greedy_decode over the prefixes: every step's logits and token equal the reference's over the full sequence."""
    cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
    generation = greedy_decode(model, cache, question, STEPS, eos_token_ids=[], keep_logits=True)
    assert len(generation.step_logits) == STEPS
    reference = reference_logits(model, context + question + generation.token_ids[:-1], counts)
    first = len(context) + len(question) - 1
    for step, (ours, token) in enumerate(zip(generation.step_logits, generation.token_ids, strict=True)):
        torch.testing.assert_close(ours, reference[first + step], rtol=0, atol=ATOL)
        assert int(reference[first + step].argmax()) == token
    return generation


# --- drop and count patterns ---------------------------------------------------------------------------------------


def ragged_counts(model, n: int, seed: int) -> list[torch.Tensor]:
    """Per layer, each KV head keeps a different random subset of a different size: never two equal lengths."""
    generator = torch.Generator().manual_seed(seed)
    h_kv = model.config.num_key_value_heads
    counts = []
    for _ in range(model.config.num_hidden_layers):
        sizes = torch.randperm(n - 4, generator=generator)[:h_kv] + 2
        layer = torch.zeros(h_kv, n, dtype=torch.long)
        for head, size in enumerate(sizes.tolist()):
            layer[head, torch.randperm(n, generator=generator)[:size]] = 1
        counts.append(layer)
    return counts


def full_counts(model, n: int) -> list[torch.Tensor]:
    return [torch.ones(model.config.num_key_value_heads, n, dtype=torch.long)] * model.config.num_hidden_layers


def prefilled(kind: str, layers: int = 3, seed: int = 0):
    """A tiny model, a context and a question, and the context's prefill: the keys every prefix is cut from."""
    model = tiny_model(kind, layers=layers, seed=seed)
    context, question = random_ids(CONTEXT, seed=seed + 1), random_ids(QUESTION, seed=seed + 2)
    return model, context, question, prefill(model, context, ObservationNeeds())


# --- the reference is right ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_reference_with_nothing_dropped_equals_the_model(kind):
    """If the hand-written forward missed a bias, a norm or the RoPE convention, every later test would be void."""
    model = tiny_model(kind)
    model.set_attn_implementation("eager")
    ids = random_ids(CONTEXT + QUESTION, seed=3)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(reference_logits(model, ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(reference_logits(model, ids, full_counts(model, CONTEXT)), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-gqa"])
def test_reference_masking_equals_eager_with_a_per_head_4d_mask(kind):
    """The reference's counts and GQA grouping agree with transformers' own eager attention.

    A 4D mask is shared by all layers, so the pattern here is the same in every layer: per KV head, some keys
    dropped (−inf) and some counted three times (+ln 3), expanded to that head's query group.
    """
    model = tiny_model(kind)
    model.set_attn_implementation("eager")
    ids = random_ids(CONTEXT + QUESTION, seed=4)
    h_q, h_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    counts = ragged_counts(model, CONTEXT, seed=5)[0]
    counts[:, torch.nonzero(counts[0]).flatten()[:2]] *= 3
    length = len(ids)
    weights = torch.ones(length, length).tril().expand(h_kv, length, length).clone()
    weights[:, CONTEXT:, :CONTEXT] = counts[:, None, :].float()
    mask = weights.log().repeat_interleave(h_q // h_kv, 0)[None]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0]
        unmasked = model(input_ids=torch.tensor([ids])).logits[0]
    assert (expected[CONTEXT:] - unmasked[CONTEXT:]).abs().max() > MATTERS  # the mask really changes the answer
    ours = reference_logits(model, ids, [counts] * model.config.num_hidden_layers)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


# --- kvbench equals the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_ragged_eviction_equals_masked_full_attention(kind):
    """Each KV head keeping its own subset (packed ragged) answers as full attention with that head's drops masked.

    Catches keys of one head attended by another head's queries, a wrong query-group split, lost RoPE positions
    of kept keys, new tokens at the wrong position, and a tail mask off by one, in the question's multi-token
    forward and in every greedy step.
    """
    model, context, question, observation = prefilled(kind)
    counts = ragged_counts(model, CONTEXT, seed=7)
    prefixes = token_prefixes(observation, counts, as_bias=False)
    assert all(p.lengths is not None and len(set(p.head_lengths())) == len(p.head_lengths()) for p in prefixes)
    reference = reference_logits(model, context + question, counts)
    full = reference_logits(model, context + question)
    assert (reference[CONTEXT:] - full[CONTEXT:]).abs().max() > MATTERS  # the drops matter
    ours = kvbench_question_logits(model, observation, prefixes, question)
    torch.testing.assert_close(ours, reference[CONTEXT:], rtol=0, atol=ATOL)
    assert_decode_matches_reference(model, observation, prefixes, context, question, counts)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-gqa", "llama-mha"])
def test_merged_token_with_bias_ln_c_equals_c_copies(kind):
    """A token stored once with bias ln 3 weighs exactly as three stored copies of it, and as the reference's count 3.

    The bias version is a uniform prefix with bias (attend_compressed's one-softmax path); the copies version is a
    ragged prefix without bias (the per-head path): a bias on the wrong token, the wrong head, or added with the
    wrong sign or scale breaks the equality.
    """
    model, context, question, observation = prefilled(kind, seed=10)
    counts = full_counts(model, CONTEXT)
    counts = [c.clone() for c in counts]
    layer, head, token = 1, model.config.num_key_value_heads - 1, 17
    counts[layer][head, token] = 3
    merged = token_prefixes(observation, counts, as_bias=True)
    copies = token_prefixes(observation, counts, as_bias=False)
    assert merged[layer].lengths is None and merged[layer].bias is not None
    assert copies[layer].lengths is not None and copies[layer].bias is None
    assert torch.allclose(merged[layer].bias[head, token], torch.tensor(math.log(3)))
    reference = reference_logits(model, context + question, counts)[CONTEXT:]
    with_bias = kvbench_question_logits(model, observation, merged, question)
    with_copies = kvbench_question_logits(model, observation, copies, question)
    # One key of 40, in one head of one layer, moves the logits by a few 1e-4: still tens of ATOL.
    assert (reference - reference_logits(model, context + question)[CONTEXT:]).abs().max() > 10 * ATOL
    torch.testing.assert_close(with_bias, with_copies, rtol=0, atol=ATOL)
    torch.testing.assert_close(with_bias, reference, rtol=0, atol=ATOL)
    torch.testing.assert_close(with_copies, reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_mixed_layers_through_the_decode_loop(kind):
    """Every layout kvbench dispatches on, in one model, through greedy_decode with keep_logits.

    Layer 0 keeps everything (the SDPA path over an equal-length prefix), layer 1 keeps the same number of
    different tokens per head (uniform, no bias: SDPA with per-head keys), layer 2 is uniform with merged tokens
    (bias), layer 3 is ragged with merged tokens and one head that keeps nothing at all.
    """
    model, context, question, observation = prefilled(kind, layers=4, seed=20)
    h_kv = model.config.num_key_value_heads
    generator = torch.Generator().manual_seed(21)
    counts = [torch.ones(h_kv, CONTEXT, dtype=torch.long)]
    uniform = torch.zeros(h_kv, CONTEXT, dtype=torch.long)
    for head in range(h_kv):
        uniform[head, torch.randperm(CONTEXT, generator=generator)[:15]] = 1
    counts.append(uniform)
    merged = uniform.clone()
    for head in range(h_kv):
        kept = torch.nonzero(merged[head]).flatten()
        merged[head, kept[head % len(kept)]] = 2 + head
    counts.append(merged)
    ragged = ragged_counts(model, CONTEXT, seed=22)[0]
    ragged[0] = 0
    ragged[-1, torch.nonzero(ragged[-1]).flatten()[:3]] = 4
    counts.append(ragged)
    prefixes = token_prefixes(observation, counts, as_bias=True)
    prefixes[0] = TokenPrefix(observation.keys[0], observation.values[0])
    prefixes[1] = token_prefixes(observation, counts, as_bias=False)[1]
    assert [p.lengths is None for p in prefixes] == [True, True, True, False]
    assert [p.bias is not None for p in prefixes] == [False, False, True, True]
    assert prefixes[3].head_lengths()[0] == 0
    assert_decode_matches_reference(model, observation, prefixes, context, question, counts)
