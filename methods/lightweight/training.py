"""Training of the Lightweight scorer (seed_methods.md (d)): the base LM frozen, only the scorer's parameters train,
through a differentiable relaxation of the token selection, on offline chat prompts answered by the full-cache
model itself (self-distillation).

One step on one prompt, as inference runs it: the context is prefilled with full attention (no grad) and its
features and scores computed exactly as `Lightweight.compress` does; then the question and response are fed,
teacher-forced, through this module's attention function (`ATTENTION_NAME`, registered with
`transformers.AttentionInterface`), which weights each context key j for query row i by
W_ij = hard_ij + soft_ij − soft_ij.detach(). soft_ij = n_i·w_ij with w_ij = p_j𝟙[j≤i]/Σ_{j'≤i}p_j' and
p = softmax(s/τ) (the spec's causal log-bias log w_ij, scaled by the n_i context keys row i sees so that uniform
scores change nothing), shared by the query group; hard_ij = 1 for the tokens inference keeps at `keep_fraction`
(protected ones plus the top-k by score), else 0. exp(logits)·W normalised is softmax(logits + log W), so the
forward pass is exactly attention over the kept tokens and the backward pass the gradient of the soft weights
(straight-through top-k); it is computed in that multiplicative form so the gradient stays finite where
W = 0. Protected tokens (first `global_tokens`, last `recent_window`) are always kept and their p_j is the
maximum, as at inference. Loss: cross-entropy on the response tokens only.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from kvbench.harness.artifacts.training import Trained, progress
from kvbench.harness.cache.attention import attention_implementation
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import TokenPrefix
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import head_dim, kv_heads
from kvbench.methods.common.eviction import tokens_for_budget, top_indices
from kvbench.methods.lightweight import features as lw
from kvbench.tasks.errors import TaskError
from kvbench.tasks.fingerprint import derive_seed
from kvbench.tasks.generated.haystacks import essay_words
from kvbench.tasks.prompting import split_prompt
from kvbench.tasks.registry import generate_samples

ATTENTION_NAME = "kvbench_lightweight_relaxed"
# The seed kvbench's sweeps run with (harness.sweep.SweepSpec.seed; a test checks they agree): the training
# prompts come from other base seeds, and their derived sample seeds are checked disjoint from its.
EVALUATION_SEED = 42
DATA_SEED = 4_000_004
TASKS = ("niah_single_1", "passkey", "vt", "fwe", "reconstruction")
PROSE_QUESTIONS = (
    "What is the main topic of the text above? Answer in one sentence.",
    "Summarize the text above in two sentences.",
    "Repeat the first sentence of the text above.",
    "Name three technical terms that the text above uses.",
)


@dataclass
class Example:
    context_ids: list[int]
    question_ids: list[int]
    response_ids: list[int]
    source: dict


@dataclass
class Relaxation:
    """What the relaxed attention reads per layer: the context's keys/values [H_kv, C, d] and the weights
    [H_kv, m, C] of the m fed rows on them (None: the full cache, every weight 1)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    weights: list[torch.Tensor | None]


def relaxed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    lightweight_relaxation: Relaxation | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of the fed rows over the weighted context (softmax(logits + log W), as exp(logits)·W
    normalised) and, causally, over themselves; per KV head and its query group, never expanded."""
    relax = lightweight_relaxation
    if relax is None:
        raise RuntimeError("the relaxed attention runs only inside lightweight training")
    if query.shape[0] != 1:
        raise ValueError("lightweight trains on one sequence at a time")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    q, tail_k, tail_v = query[0].float(), key[0].float(), value[0].float()
    h_q, m, dim = q.shape
    h_kv = tail_k.shape[0]
    grouped = q.reshape(h_kv, h_q // h_kv, m, dim)
    context = torch.einsum("hgmd,hcd->hgmc", grouped, relax.keys[layer].float()) * scaling
    tail = torch.einsum("hgmd,htd->hgmt", grouped, tail_k) * scaling
    future = torch.arange(m, device=q.device)[None, :] > torch.arange(m, device=q.device)[:, None]
    tail = tail.masked_fill(future, float("-inf"))
    top = torch.maximum(context.amax(dim=-1), tail.amax(dim=-1)).detach()[..., None]
    context, tail = torch.exp(context - top), torch.exp(tail - top)
    if relax.weights[layer] is not None:
        context = context * relax.weights[layer][:, None]
    total = context.sum(dim=-1, keepdim=True) + tail.sum(dim=-1, keepdim=True)
    values = relax.values[layer].float()
    out = (torch.einsum("hgmc,hcd->hgmd", context, values) + torch.einsum("hgmt,htd->hgmd", tail, tail_v)) / total
    return out.reshape(h_q, m, dim).transpose(0, 1)[None].to(query.dtype), None


AttentionInterface.register(ATTENTION_NAME, relaxed_attention)


def relaxed_attention_enabled(model: torch.nn.Module):
    return attention_implementation(model, ATTENTION_NAME)


def relaxed_weights(
    scores: torch.Tensor, row_positions: torch.Tensor, n_kept: int, global_tokens: int, recent_window: int, tau: float
) -> torch.Tensor:
    """W [H, m, C] of rows at `row_positions` [m] on the C context tokens scored [H, C] (see the module doc)."""
    heads, n = scores.shape
    order = torch.arange(n, device=scores.device)
    guarded = lw.protected_positions(order, n, global_tokens, recent_window)
    kept = top_indices(scores.detach().masked_fill(guarded[None], float("inf")), n_kept)
    hard = torch.zeros(heads, n, device=scores.device).scatter(1, kept, 1.0)
    forced = torch.where(guarded[None], scores.max(dim=-1, keepdim=True).values.detach(), scores)
    p = torch.softmax(forced / tau, dim=-1)
    visible = (order[None, :] <= row_positions[:, None]).float()
    masked = p[:, None, :] * visible[None]
    soft = masked / masked.sum(dim=-1, keepdim=True) * visible.sum(dim=-1)[None, :, None]
    return hard[:, None, :] * visible[None] + (soft - soft.detach())


def needs_for(features: tuple[str, ...]) -> ObservationNeeds:
    return ObservationNeeds(window=lw.ALL_QUERIES, hidden_states=lw.needs_vectors(features))


@dataclass
class Prepared:
    """What training needs of one context's full prefill, computed once (no grad) and reused every epoch: its
    keys/values per layer, attn_score [H, C] and the parameter-free static features [H, C, ·] per layer (None
    when not selected), and the vectors the convolutions read (only when they are selected)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attn: list[torch.Tensor | None]
    fixed: list[torch.Tensor | None]
    vectors: list[dict[str, torch.Tensor]] | None

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])


def prepare(features: tuple[str, ...], observation: Observation, flags: torch.Tensor | None) -> Prepared:
    """The observation's inference-mode tensors are copied into ordinary ones, which autograd may save."""
    keys, values, attns, fixed, vectors = [], [], [], [], []
    with torch.no_grad():
        for layer in range(observation.num_layers):
            k, v = observation.keys[layer].clone(), observation.values[layer].clone()
            queries, hidden, token = lw.observed_inputs(features, observation, layer, flags)
            queries = queries.clone() if queries is not None else None
            hidden = hidden.clone() if hidden is not None else None
            token = token.clone() if token is not None else None
            found = lw.token_vectors(k, v, queries, hidden) if lw.needs_vectors(features) else {}
            keys.append(k)
            values.append(v)
            attns.append(lw.prefill_attn_score(queries, k, observation.scaling) if "attn_score" in features else None)
            fixed.append(lw.fixed_features(features, found, token, k.shape[0]))
            vectors.append(found)
    return Prepared(keys, values, attns, fixed, vectors if "convolution" in features else None)


def prepared_features(scorer: lw.Scorer, prepared: Prepared, layer: int) -> torch.Tensor:
    """[H, C, F], as `prefill_layer_features` gives them at inference (the convolutions with their gradient)."""
    convolution = lw.convolution_features(scorer, layer, prepared.vectors[layer]) if prepared.vectors else None
    keys = prepared.keys[layer]
    positions = torch.arange(prepared.length, device=keys.device).expand(keys.shape[0], -1)
    static = lw.join(prepared.fixed[layer], convolution)
    return lw.assemble(scorer.features, prepared.attn[layer], positions, prepared.length - 1, static)


@torch.no_grad()
def standardize_from(scorer: lw.Scorer, prepared: list[Prepared]) -> None:
    """Set `scorer`'s shift and scale to each (layer, KV head, feature)'s mean and 1/std (population, fp64) over
    every token of `prepared` (the training split's contexts; no response is read). The trainable convolutions'
    outputs (already min-max normalised per token) and features constant over the split keep scale 1 (and the
    convolutions shift 0)."""
    plain = scorer.plain_width
    for layer in range(len(prepared[0].keys)):
        total = square = count = 0
        for item in prepared:
            values = prepared_features(scorer, item, layer).double()  # [H, C, F]
            total = total + values.sum(dim=1)
            square = square + (values * values).sum(dim=1)
            count += values.shape[1]
        mean = total / count
        std = (square / count - mean * mean).clamp(min=0).sqrt()
        shift, scale = mean.clone(), torch.where(std < lw.GUARD, torch.ones_like(std), 1 / std.clamp(min=lw.GUARD))
        shift[:, plain:], scale[:, plain:] = 0.0, 1.0
        scorer.shift[layer] = shift.to(scorer.shift.dtype)
        scorer.scale[layer] = scale.to(scorer.scale.dtype)


def example_loss(
    model: torch.nn.Module, scorer: lw.Scorer | None, example: Example, prepared: Prepared, config
) -> torch.Tensor:
    """Mean cross-entropy of the response tokens after the context compressed at `keep_fraction` by `scorer`
    (straight-through relaxed; None: the full cache)."""
    n = prepared.length
    tail_ids = example.question_ids + example.response_ids
    rows = torch.arange(n, n + len(tail_ids), device=prepared.keys[0].device)
    weights: list[torch.Tensor | None] = [None] * len(prepared.keys)
    if scorer is not None:
        n_kept = tokens_for_budget(n, config.keep_fraction)
        for layer in range(len(prepared.keys)):
            scores = scorer(layer, prepared_features(scorer, prepared, layer))
            weights[layer] = relaxed_weights(
                scores, rows, n_kept, config.global_tokens, config.recent_window, config.temperature
            )
    relax = Relaxation(prepared.keys, prepared.values, weights)
    with relaxed_attention_enabled(model):
        logits = model(
            input_ids=torch.tensor([tail_ids], device=rows.device),
            position_ids=rows[None],
            use_cache=False,
            lightweight_relaxation=relax,
        ).logits[0]
    first = len(example.question_ids) - 1
    predicted = logits[first : first + len(example.response_ids)].float()
    return torch.nn.functional.cross_entropy(predicted, torch.tensor(example.response_ids, device=rows.device))


# --- data ------------------------------------------------------------------------------------------------------


def check_disjoint(seed: int, tasks: tuple[str, ...], length: int, count: int) -> None:
    """The training prompts' sample seeds (derived from `seed` as the task generators derive them) share none
    with evaluation's (from EVALUATION_SEED) for the same tasks and length, for any of the first 1 000 samples."""
    assert seed != EVALUATION_SEED, "training prompts must not use the evaluation seed"
    for task in tasks:
        evaluation = {derive_seed(EVALUATION_SEED, task, length, i) for i in range(1_000)}
        evaluation.add(derive_seed(EVALUATION_SEED, task, length, "search"))
        training = {derive_seed(seed, task, length, i) for i in range(count)}
        training.add(derive_seed(seed, task, length, "search"))
        assert not evaluation & training, f"training seeds of {task} overlap evaluation's"


def prompts(tokenizer, config) -> list[tuple[list[int], list[int], dict]]:
    """`samples` chat-formatted prompts of about `length` tokens, alternating over kvbench's task generators
    (base seed DATA_SEED) and documentation passages with a question about them; (context ids, question ids,
    source record) each."""
    sources = [*TASKS, "prose"]
    counts = {name: len(range(i, config.samples, len(sources))) for i, name in enumerate(sources)}
    tasks = tuple(t for t in TASKS if counts[t])
    check_disjoint(DATA_SEED, tasks, config.length, max(counts.values()))
    made: dict[str, list] = {}
    for task in tasks:
        try:
            samples = generate_samples(task, tokenizer, config.length, counts[task], seed=DATA_SEED)
        except TaskError as error:
            raise KVBenchError(f"lightweight training prompts (--length {config.length}): {error}") from None
        made[task] = [
            (
                split_prompt(tokenizer, s.context, s.question, s.answer_prefix),
                {"kind": "task", "task": task, "seed": DATA_SEED, "sample_id": s.sample_id},
            )
            for s in samples
        ]
    rng = random.Random(DATA_SEED)
    words = essay_words()
    made["prose"] = []
    for index in range(counts["prose"]):
        offset = rng.randrange(len(words) - config.length)
        question = PROSE_QUESTIONS[rng.randrange(len(PROSE_QUESTIONS))]
        intro, outro = "Read the following text.\n\n", "\n\n"
        room = max(config.length - len(tokenizer.encode(intro + outro + question, add_special_tokens=False)) - 16, 8)
        passage_ids = tokenizer.encode(" ".join(words[offset : offset + config.length]), add_special_tokens=False)
        passage = tokenizer.decode(passage_ids[:room])
        record = {"kind": "prose", "word_offset": offset, "question": question, "seed": DATA_SEED, "index": index}
        made["prose"].append((split_prompt(tokenizer, intro + passage + outro, question, ""), record))
    ordered = []
    for i in range(config.samples):
        name = sources[i % len(sources)]
        parts, record = made[name][i // len(sources)]
        ordered.append((parts.context_ids, parts.question_ids, record))
    return ordered


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = tokenizer.eos_token_id if ids is None else ids
    return [] if ids is None else [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def self_distilled(model: torch.nn.Module, tokenizer, config, flags) -> tuple[list[Example], list[Prepared]]:
    """The prompts with the full-cache model's own greedy answers as responses, and each context's prepared
    prefill (the same prefill the answer came from)."""
    examples, prepared = [], []
    eos = eos_ids(model, tokenizer)
    features = config.feature_names
    for context_ids, question_ids, record in progress(prompts(tokenizer, config), desc="kvbench: answer (full cache)"):
        observation = prefill(model, context_ids, needs_for(features))
        prefixes = [
            TokenPrefix(k, v, first_position=0) for k, v in zip(observation.keys, observation.values, strict=True)
        ]
        cache = KVBenchCache(observation.num_layers, prefixes, observation.context_length)
        answer = greedy_decode(model, cache, question_ids, config.response_tokens, eos, tokenizer=tokenizer)
        examples.append(Example(context_ids, question_ids, answer.token_ids, {**record, "response": answer.text}))
        prepared.append(prepare(features, observation, flags))
    return examples, prepared


# --- training --------------------------------------------------------------------------------------------------


def heldout_loss(model, scorer, examples: list[Example], prepared: list[Prepared], config) -> float:
    with torch.no_grad():
        losses = [example_loss(model, scorer, e, p, config).item() for e, p in zip(examples, prepared, strict=True)]
    return sum(losses) / len(losses)


def shapes(model: torch.nn.Module) -> tuple[int, int, int, int]:
    c = model.config
    return c.num_hidden_layers, kv_heads(c), head_dim(c), c.hidden_size


def train(model: torch.nn.Module, tokenizer, config) -> Trained:
    """Self-distilled data, the held-out split, the untrained scorer's held-out loss, epochs of AdamW with
    ReduceLROnPlateau on the held-out loss, and the trained scorer's held-out loss (plus the full cache's)."""
    from kvbench.methods.lightweight.method import layout_record

    features = config.feature_names
    layers, heads, dim, hidden = shapes(model)
    start = time.perf_counter()
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        flags = lw.token_flags(tokenizer, model.config.vocab_size) if "token_profiling" in features else None
        examples, prepared = self_distilled(model, tokenizer, config, flags)
        data_seconds = time.perf_counter() - start
        order = list(range(len(examples)))
        random.Random(config.seed).shuffle(order)
        held = max(1, math.ceil(len(examples) * config.heldout_fraction))
        if len(examples) - held < 1:
            raise KVBenchError(f"--samples {config.samples} leaves no training prompt after the held-out split")
        heldout_index, train_index = sorted(order[:held]), sorted(order[held:])
        heldout, heldout_prepared = [examples[i] for i in heldout_index], [prepared[i] for i in heldout_index]
        train_set, train_prepared = [examples[i] for i in train_index], [prepared[i] for i in train_index]
        scorer = lw.Scorer(
            config.scorer, features, layers, heads, dim, hidden, config.conv_channels, config.seed, config.standardize
        )
        if config.standardize:
            standardize_from(scorer, train_prepared)
        untrained = heldout_loss(model, scorer, heldout, heldout_prepared, config)
        full = heldout_loss(model, None, heldout, heldout_prepared, config)
        optimizer = torch.optim.AdamW(scorer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, min_lr=1e-6)
        generator = torch.Generator().manual_seed(config.seed)
        bar = progress(total=config.epochs * len(train_set), desc=f"kvbench: train lightweight ({config.scorer})")
        epoch_train, epoch_heldout = [], []
        for epoch in range(config.epochs):
            running = 0.0
            optimizer.zero_grad()
            for step, index in enumerate(torch.randperm(len(train_set), generator=generator).tolist()):
                loss = example_loss(model, scorer, train_set[index], train_prepared[index], config)
                (loss / config.grad_accumulation).backward()
                if (step + 1) % config.grad_accumulation == 0 or step + 1 == len(train_set):
                    optimizer.step()
                    optimizer.zero_grad()
                running += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
            epoch_train.append(running / len(train_set))
            epoch_heldout.append(heldout_loss(model, scorer, heldout, heldout_prepared, config))
            plateau.step(epoch_heldout[-1])
        bar.close()
    finally:
        for parameter, flag in zip(model.parameters(), trainable, strict=True):
            parameter.requires_grad_(flag)
        model.train(was_training)
    weights = {f"scorer.{name}": t.detach().clone() for name, t in scorer.state_dict().items()}
    weights["layout"] = lw.encode_layout(layout_record(config, layers, heads, dim, hidden))
    if flags is not None:
        weights["token_flags"] = flags
    data = {
        "kind": "offline chat prompts, responses = the full-cache model's greedy answers (self-distillation)",
        "data_seed": DATA_SEED,
        "evaluation_seed_excluded": EVALUATION_SEED,
        "tasks": list(TASKS),
        "prose": "pydoc_data.topics essay words at seeded offsets, with a question about the passage",
        "length": config.length,
        "response_tokens": config.response_tokens,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
        "examples": [
            {**e.source, "context_tokens": len(e.context_ids), "response_tokens": len(e.response_ids)} for e in examples
        ],
        "train_indices": train_index,
        "heldout_indices": heldout_index,
        "heldout_fraction": config.heldout_fraction,
    }
    losses = {
        "heldout": {"untrained": untrained, "trained": epoch_heldout[-1], "full_cache": full},
        "train_epochs": epoch_train,
        "heldout_epochs": epoch_heldout,
        "measure": f"mean response-token cross-entropy, context compressed at keep_fraction {config.keep_fraction}",
    }
    settings = {
        "relaxation": "straight-through top-k at keep_fraction (hard forward, soft softmax(s/τ) backward)",
        "temperature": config.temperature,
        "optimizer": f"AdamW lr {config.lr} wd {config.weight_decay}, ReduceLROnPlateau(0.5, patience 1, min 1e-6)",
        "grad_accumulation": config.grad_accumulation,
        "feature_dim": lw.feature_dim(features, dim, hidden),
        "data_seconds": round(data_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return Trained(weights, data, losses, settings)
