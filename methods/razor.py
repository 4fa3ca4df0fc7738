"""RazorAttention: retrieval heads keep everything, the others sinks + a window + one compensation token
(Tang et al., arXiv 2407.15891; ICLR 2025)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from kvbench.harness.cache.prefix import LayerPrefix, TokenPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.method_spec import option
from kvbench.methods.base import Method, register
from kvbench.methods.common.head_scores import layer_probe_scores, observe_all_queries, probe_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RazorConfig:
    """arXiv 2407.15891 with the Huawei port's head fractions (RAConfig: 14% induction, 1% echo), N0 = 4 sinks.

    Heads are scored offline on BOS + a random sequence of `probe_length` ordinary tokens repeated
    `probe_repeats` times. The paper uses S = 2500; kvbench's default S = 512 (× 4, 2049 tokens) keeps the
    O(N²) scoring cheap on CPU (SmolLM2 on 2 cores: under a minute, once), as baselines.md §3 allows for
    small models. `count_bias` weights the compensation token by |D| (logit bias ln|D|, Eq. 5); the Huawei
    port stores the plain mean (False). The window L_h is solved from the budget (S0 = 0) against the bytes
    the prefixes will hold, biases and ragged lengths included, so the measured ratio never exceeds b; the
    paper's native S0/C rule is not offered.
    """

    induction_fraction: float = option(0.14, at_least=0, at_most=1)
    echo_fraction: float = option(0.01, at_least=0, at_most=1)
    n_sink: int = option(4, at_least=0)
    count_bias: bool = True
    probe_length: int = option(512, at_least=2)  # a probe needs two tokens repeated at least twice
    probe_repeats: int = option(4, at_least=2)
    seed: int = option(0, at_least=0)


def head_count(fraction: float, total: int) -> int:
    """One rounding rule for every head fraction: round half up, at KV-head granularity."""
    return math.floor(fraction * total + 0.5)


def retrieval_heads(
    echo: torch.Tensor, induction: torch.Tensor, echo_fraction: float, induction_fraction: float
) -> torch.Tensor:
    """[L, H_kv] bool: the global top induction heads ∪ the global top echo heads, ranked across all layers."""
    total = echo.numel()
    chosen = torch.zeros(total, dtype=torch.bool)
    for scores, fraction in ((induction, induction_fraction), (echo, echo_fraction)):
        order = scores.flatten().float().argsort(descending=True, stable=True)
        chosen[order[: head_count(fraction, total)]] = True
    return chosen.reshape(echo.shape)


def layer_bytes(observation: Observation, retrieval: torch.Tensor, n_kept: int, count_bias: bool) -> int:
    """Bytes the prefixes of the compressed layers will hold when each non-retrieval head keeps `n_kept` < N tokens.

    Mirrors TokenPrefix's storage, because the harness measures exactly that: a layer with a compressed head
    stores one bias per token of every head, and a layer mixing full and compressed heads is ragged (one
    int32 length per head). Layers of retrieval heads only are stored whole, without bias.
    """
    n = observation.context_length
    keys, values = observation.keys[0], observation.values[0]
    per_token = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
    bias = keys.element_size() if count_bias else 0
    total = 0
    for heads in retrieval[observation.compressed_layers()]:  # sliding windows keep theirs, outside the budget
        full, h_kv = int(heads.sum()), int(heads.numel())
        if full == h_kv:
            total += h_kv * n * per_token
            continue
        tokens = full * n + (h_kv - full) * n_kept
        total += tokens * (per_token + bias) + (4 * h_kv if full else 0)
    return total


def razor_layer(
    observation: Observation, layer: int, retrieval: torch.Tensor, n_kept: int, config: RazorConfig
) -> TokenPrefix:
    """Retrieval heads whole; the others their N0 sinks, one compensation token and the last L_h tokens.

    The compensation token is the mean of the dropped post-RoPE keys and values (Eq. 4, never re-rotated);
    with `count_bias` its logit bias ln|D| makes it attend like the |D| tokens it replaces (Eq. 5).
    """
    keys, values = observation.keys[layer], observation.values[layer]
    if bool(retrieval.all()):
        return TokenPrefix(keys, values, first_position=0)
    n, sinks = observation.context_length, config.n_sink
    window = n_kept - sinks - 1
    dropped = n - window - sinks
    head_keys, head_values, head_bias = [], [], []
    for head in range(keys.shape[0]):
        k, v = keys[head], values[head]
        if bool(retrieval[head]):
            head_keys.append(k)
            head_values.append(v)
            head_bias.append(k.new_zeros(n))
            continue
        mean_k = k[sinks : n - window].float().mean(dim=0, keepdim=True).to(k.dtype)
        mean_v = v[sinks : n - window].float().mean(dim=0, keepdim=True).to(v.dtype)
        head_keys.append(torch.cat([k[:sinks], mean_k, k[n - window :]]))
        head_values.append(torch.cat([v[:sinks], mean_v, v[n - window :]]))
        bias = k.new_zeros(n_kept)
        bias[sinks] = math.log(dropped)
        head_bias.append(bias)
    return TokenPrefix(head_keys, head_values, head_bias if config.count_bias else None)


@register
class Razor(Method):
    name = "razor"
    family = "head-wise eviction + merging"
    description = "Retrieval heads keep all; others keep sinks, a window and one ln|D|-weighted mean token"
    Config = RazorConfig
    needs_calibration = True

    def __init__(self, config: RazorConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.retrieval: torch.Tensor | None = None

    def calibration_key(self) -> str:
        # Only the probe decides the scores; the head fractions are applied when they are loaded.
        c = self.config
        return f"probe_length={c.probe_length} probe_repeats={c.probe_repeats} seed={c.seed}"

    def calibrate(self, model: torch.nn.Module, tokenizer) -> dict[str, torch.Tensor]:
        c = self.config
        ids = probe_ids(tokenizer, model.config.vocab_size, c.probe_length, c.probe_repeats, c.seed)
        observation = observe_all_queries(model, ids)
        offset = len(ids) - c.probe_length * c.probe_repeats
        echo, induction = [], []
        for layer in range(observation.num_layers):
            e, i = layer_probe_scores(
                observation.window_queries[layer],
                observation.keys[layer],
                observation.scaling,
                c.probe_length,
                c.probe_repeats,
                offset,
            )
            # A KV head serves retrieval if any of its query heads does: max over the group (Huawei).
            echo.append(e.reshape(observation.num_kv_heads, -1).amax(dim=1))
            induction.append(i.reshape(observation.num_kv_heads, -1).amax(dim=1))
        return {"echo": torch.stack(echo).cpu(), "induction": torch.stack(induction).cpu()}

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        c = self.config
        self.retrieval = retrieval_heads(
            artifacts["echo"], artifacts["induction"], c.echo_fraction, c.induction_fraction
        )
        total = self.retrieval.numel()
        logger.info(
            "razor: %d induction ∪ %d echo heads = %d of %d KV heads kept whole",
            head_count(c.induction_fraction, total),
            head_count(c.echo_fraction, total),
            int(self.retrieval.sum()),
            total,
        )

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        retrieval = self._retrieval_for(observation)
        if budget >= 1.0:
            return [TokenPrefix(k, v, first_position=0) for k, v in zip(observation.keys, observation.values)]
        n_kept = self._tokens_per_head(observation, retrieval, budget)
        return [
            razor_layer(observation, layer, retrieval[layer], n_kept, self.config) for layer in range(len(retrieval))
        ]

    def _retrieval_for(self, observation: Observation) -> torch.Tensor:
        if self.retrieval is None:
            raise KVBenchError("razor has no head scores yet; run 'kvbench calibrate razor --model MODEL' first")
        expected = (observation.num_layers, observation.num_kv_heads)
        if tuple(self.retrieval.shape) != expected:
            raise KVBenchError(
                f"razor's head scores cover {tuple(self.retrieval.shape)} (layers, KV heads) but the model has "
                f"{expected}; recalibrate with 'kvbench calibrate razor --force'"
            )
        return self.retrieval

    def _tokens_per_head(self, observation: Observation, retrieval: torch.Tensor, budget: float) -> int:
        """N0 + 1 + L_h for the non-retrieval heads: the largest that keeps the measured bytes within the budget.

        The least a compressed head can keep is its sinks, the compensation token and one recent token, and it
        must merge at least two tokens; below that the budget is refused, naming the lowest one it can reach.
        """
        n, sinks = observation.context_length, self.config.n_sink
        compressed = sum(observation.layer_bytes(layer) for layer in observation.compressed_layers())
        allowed = budget * compressed
        lowest, highest = sinks + 2, n - 1
        if lowest > highest or bool(retrieval.all()):
            reachable = 1.0
        else:
            reachable = layer_bytes(observation, retrieval, lowest, self.config.count_bias) / compressed
        if reachable == 1.0 or reachable > budget:
            fraction = float(retrieval.float().mean())
            raise BudgetError(
                f"razor keeps {int(retrieval.sum())} of {retrieval.numel()} KV heads whole (fraction {fraction:.3f}) "
                f"and at least {sinks}+1+1 tokens of the others, so budget {budget:g} is unreachable on this "
                f"{n}-token context; the lowest reachable budget is {math.ceil(reachable * 1000) / 1000:g}"
            )
        while lowest < highest:
            middle = (lowest + highest + 1) // 2
            if layer_bytes(observation, retrieval, middle, self.config.count_bias) <= allowed:
                lowest = middle
            else:
                highest = middle - 1
        return lowest
