"""Learned KV autoencoder (seeds 000/001, seed_methods.md (a)): every context key and value stored as a latent.

Per layer, separate autoencoders for K and V (option: one per KV head), Linear(d→m) + activation and
Linear(m→d), trained on exactly what the cache stores (post-RoPE keys, values) of the frozen model. Each
context entry is encoded once, at compression, from the cached vector; the latents are decoded at attention
time and never re-encoded (the seed re-encoded its whole cache every step and its perplexity went from 78 to
thousands). Tokens decoded after the context are encoded the same way once they age past a raw window of the
newest `decode_window` tokens (`decode_window=0`: they stay raw, as kvbench's version 1 kept them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.harness.artifacts.training import Trained, train_text
from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.latent_prefix import LatentDecoder, LatentPrefix
from kvbench.harness.cache.prefix import LayerPrefix, Prefixes, TokenPrefix
from kvbench.harness.engine.prefill import Observation
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.method_spec import OptionError, option
from kvbench.harness.models.loading import head_dim
from kvbench.methods.autoencoder import training
from kvbench.methods.autoencoder.training import encode
from kvbench.methods.base import Method, register

ACTIVATIONS = ("none", "relu")
LOSSES = ("reconstruction", "reconstruction+attention")
LATENT_BITS = (2, 4, 8, 16, 32)
# fp16 scale + fp16 zero point per quantized group of latents.
GROUP_METADATA_BYTES = 4


@dataclass(frozen=True)
class AutoencoderConfig:
    """Seed 000/001's autoencoder as seed_methods.md (a) specifies it.

    latent_dim: m; 0 (default) trains m = d/8, d/4 and d/2 (8, 16, 32 on SmolLM2, the seed's sizes) and the
    budget picks among them. activation: `none` (linear, kvbench's default: its optimum is the PCA subspace) or
    `relu` (the seed's, latents ≥ 0). per_head: one AE per KV head instead of one per layer. loss:
    `reconstruction` (MSE of K and V) or `reconstruction+attention` (plus `attention_weight` × the MSE of the
    attention output with real queries: RoPE'd projections of each KV head's query group, causal mask;
    `attention_queries` query rows drawn per window; windows are whole, so there is no padding to mask).

    Training, sized to finish in minutes on 2 CPU cores for SmolLM2 (135M): `tokens` tokens of offline prose in
    windows of `window` tokens (2048, so that the keys' RoPE angles cover the positions a 2k context uses), plus
    the user's `text_file`s; 10% held out (recorded). AdamW (weight decay 1e-3), cosine schedule with 10% warm-up,
    gradient clip 1.0 per layer's problem, as in the repository; lr 1e-3 rather than its 1e-4 because kvbench
    trains hundreds of steps, not epochs of WikiText-103. On a GPU, raise `tokens` (e.g. 262144) and `epochs`:
    the prefill, not the AE, is what costs time.

    Budget: latents are stored in the cache dtype, in fp16 (for fp32 caches), or quantized to `latent_bits` ∈
    {2, 4, 8} with asymmetric min-max scales and zero points (fp16) per vector (`latent_group_size` 0) or per
    group of latent channels; codes packed. latent_bits 0 lets the budget choose; the budget picks the (m, bits)
    whose stored bytes are closest to it from below: b ≈ (m·bits + 32 per group)/(d·bits_cache). b = 1 stores
    the context raw (no reduction, no quantization: the full cache). Decoder weights are reported in
    `method_bytes`, never in the cache's bytes.

    While decoding (not in the seed, which re-encoded everything every step): the newest `decode_window` tokens
    stay raw, as KIVI's full-precision window (R = 128 there); once `STREAM_CHUNK` more have aged past it they are
    encoded at the compression's latent size and width and kept as latents. 0 keeps every decoded token raw.
    """

    latent_dim: int = option(0, at_least=0)  # 0: d/8, d/4 and d/2
    activation: str = option("none", choices=ACTIVATIONS)
    per_head: bool = False
    loss: str = option("reconstruction", choices=LOSSES)
    latent_bits: int = option(0, choices=(0, *LATENT_BITS))  # 0: chosen by the budget
    latent_group_size: int = option(0, at_least=0)  # 0: one group per latent vector
    tokens: int = option(16384, at_least=2)
    window: int = option(2048, at_least=2)
    epochs: int = option(10, at_least=1)
    batch: int = option(512, at_least=1)
    lr: float = option(1e-3, above=0)
    weight_decay: float = option(1e-3, at_least=0)
    attention_weight: float = option(1.0, at_least=0)
    attention_queries: int = option(64, at_least=1)
    seed: int = option(0, at_least=0)
    text_file: tuple[str, ...] = ()
    checkpoint: str = ""
    decode_window: int = option(128, at_least=0)  # 0: decoded tokens stay raw

    def __post_init__(self) -> None:
        if self.tokens < self.window:
            raise OptionError(
                f"options tokens={self.tokens} and window={self.window} do not fit; tokens must be at least window "
                "(training takes whole windows)"
            )
        if self.latent_dim and self.latent_group_size and self.latent_dim % self.latent_group_size:
            raise OptionError(
                f"options latent_dim={self.latent_dim} and latent_group_size={self.latent_group_size} do not fit; "
                "latent_group_size must divide latent_dim"
            )


TRAINING_FIELDS = (
    "latent_dim",
    "activation",
    "per_head",
    "loss",
    "tokens",
    "window",
    "epochs",
    "batch",
    "lr",
    "weight_decay",
    "attention_weight",
    "attention_queries",
    "seed",
    "text_file",
)


@dataclass(frozen=True)
class LatentPlan:
    latent: int
    bits: int


# Decoded tokens are encoded this many at a time once they age past the raw window (KIVI's G).
STREAM_CHUNK = 32


@dataclass(frozen=True)
class LatentStream:
    """One sequence's streaming while decoding (its cache's `method_state`; plain integers, no bytes): the latent
    size the compression chose, the raw window and the chunk."""

    latent: int
    window: int
    chunk: int


def latent_sizes(config: AutoencoderConfig, dim: int) -> list[int]:
    if config.latent_dim:
        if config.latent_dim >= dim:
            raise KVBenchError(f"latent_dim {config.latent_dim} reduces nothing on head_dim {dim}; pick m < {dim}")
        return [config.latent_dim]
    return sorted({max(1, dim // 8), max(1, dim // 4), max(1, dim // 2)})


def layer_bytes(heads: int, n: int, latent: int, bits: int, group: int) -> int:
    """Bytes one layer's `LatentPrefix` stores for K and V: latents in a float of `bits` bits, or packed codes
    plus an fp16 scale and zero point per group."""
    if bits >= 16:
        return 2 * heads * n * latent * bits // 8
    groups = latent // (group or latent)
    return 2 * (math.ceil(heads * n * latent * bits / 8) + heads * n * groups * GROUP_METADATA_BYTES)


@register
class Autoencoder(Method):
    name = "autoencoder"
    family = "latent codes"
    description = (
        "Each context K/V vector encoded once into a learned latent (per layer, K and V apart), decoded at attention"
    )
    Config = AutoencoderConfig
    needs_calibration = True
    learns = True
    # 2: tokens decoded after the context are encoded as they age past `decode_window` (1 kept them raw).
    version = 2
    # A model's sliding-window layers keep their windows (TokenPrefix); only the latent layers stream.
    leaves_windows = True

    def __init__(self, config: AutoencoderConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.weights: dict[str, torch.Tensor] | None = None

    def calibration_key(self) -> str:
        """The weights depend on the training options only; latent bits and groups act at compress time."""
        return " ".join(f"{name}={getattr(self.config, name)!r}" for name in TRAINING_FIELDS)

    def calibrate(self, model: torch.nn.Module, tokenizer) -> Trained:
        config = self.config
        start = time.perf_counter()
        split = train_text(tokenizer, config.tokens, config.window, config.seed, 0.1, config.text_file)
        model_config = model.config
        dim = head_dim(model_config)
        sizes = latent_sizes(config, dim)
        attention = "attention" in config.loss
        train = training.collect(
            model, split.train, config.attention_queries if attention else 0, config.seed, "kvbench: prefill (train)"
        )
        heldout = training.collect(model, split.heldout, config.window, config.seed, "kvbench: prefill (held-out)")
        collected = training.seconds_since(start)
        heads = train.kv.shape[2]
        slots = heads if config.per_head else 1
        weights, losses = {}, {}
        for latent in sizes:
            folded, epochs = training.train_latent(
                train, latent, slots, config.activation, config, f"kvbench: train autoencoder m={latent}"
            )
            weights.update({f"m{latent}.{name}": tensor for name, tensor in folded.items()})
            losses[f"m={latent}"] = {
                "train_epochs": epochs,
                "train": training.heldout_report(
                    training.KVData(train.kv, train.window, [], [], train.scaling), folded, config.activation
                ),
                "heldout": training.heldout_report(heldout, folded, config.activation),
            }
        settings = {
            "latent_sizes": sizes,
            "head_dim": dim,
            "inputs": "post-RoPE keys, values (as cached)",
            "optimizer": f"AdamW lr {config.lr} weight decay {config.weight_decay}, cosine, 10% warm-up, clip 1.0",
            "collect_seconds": collected,
            "seconds": training.seconds_since(start),
        }
        return Trained(weights, split.record, losses, settings)

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        self.weights = dict(artifacts)

    def _sizes(self) -> list[int]:
        if self.weights is None:
            raise KVBenchError(
                "autoencoder has no weights loaded; train them with 'kvbench train autoencoder --model <model> "
                "--out FILE' and pass autoencoder:checkpoint=FILE"
            )
        return sorted(int(name.split(".")[0][1:]) for name in self.weights if name.endswith(".decoder_weight"))

    def method_bytes(self) -> int | None:
        """The decoders of every latent size held (any budget may pick any of them)."""
        if self.weights is None:
            return None
        return sum(t.numel() * t.element_size() for n, t in self.weights.items() if ".decoder_" in n)

    def plan(self, heads: int, n: int, dim: int, element: int, budget: float) -> LatentPlan:
        """The trained size and latent width whose bytes are closest to the budget from below."""
        config = self.config
        cache_bits = 8 * element
        widths = [config.latent_bits] if config.latent_bits else [b for b in LATENT_BITS if b <= cache_bits]
        full = 2 * heads * n * dim * element
        candidates = []
        for latent in self._sizes():
            for bits in widths:
                if bits > cache_bits or (config.latent_group_size and latent % config.latent_group_size):
                    continue
                size = layer_bytes(heads, n, latent, bits, config.latent_group_size)
                candidates.append((size, latent, bits))
        if not candidates:
            raise BudgetError(
                f"autoencoder: no trained latent size fits latent_bits={config.latent_bits} and "
                f"latent_group_size={config.latent_group_size} on a {cache_bits}-bit cache; change those options"
            )
        candidates.sort(reverse=True)
        fitting = [c for c in candidates if c[0] <= budget * full]
        if not fitting:
            size, latent, bits = candidates[-1]
            lowest = size / full
            raise BudgetError(
                f"autoencoder at m={latent}, {bits}-bit latents keeps {lowest:.4f} of the cache, so budget {budget:g} "
                f"is unreachable; the lowest reachable budget is {math.ceil(lowest * 100) / 100:g}"
            )
        _, latent, bits = fitting[0]
        return LatentPlan(latent, bits)

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        if budget >= 1.0:  # no reduction, no quantization: the full cache
            return [TokenPrefix(k, v) for k, v in zip(observation.keys, observation.values, strict=True)]
        heads, n, dim = observation.num_kv_heads, observation.context_length, observation.head_dim
        dtype = observation.keys[0].dtype
        plan = self.plan(heads, n, dim, observation.keys[0].element_size(), budget)
        latent_dtype = dtype if plan.bits == 8 * observation.keys[0].element_size() else torch.float16
        device = observation.keys[0].device
        w = {name: self.weights[f"m{plan.latent}.{name}"].to(device) for name in
             ("encoder_weight", "encoder_bias", "decoder_weight", "decoder_bias")}  # fmt: skip
        if w["encoder_weight"].shape[1] != observation.num_layers or w["encoder_weight"].shape[-2] != dim:
            raise KVBenchError(
                f"autoencoder's weights are for another model shape {tuple(w['encoder_weight'].shape)}; train "
                "them for this model with 'kvbench train autoencoder --model <model> --out FILE'"
            )
        prefixes = []
        for layer, (keys, values) in enumerate(zip(observation.keys, observation.values, strict=True)):
            latents = [
                encode(x.float(), w["encoder_weight"][i, layer], w["encoder_bias"][i, layer], self.config.activation)
                for i, x in enumerate((keys, values))
            ]
            decoders = [LatentDecoder(w["decoder_weight"][i, layer], w["decoder_bias"][i, layer]) for i in (0, 1)]
            prefixes.append(
                LatentPrefix(*latents, *decoders, plan.bits, self.config.latent_group_size, latent_dtype, dtype)
            )
        stream = (
            LatentStream(plan.latent, self.config.decode_window, STREAM_CHUNK) if self.config.decode_window else None
        )
        return Prefixes(prefixes, decode_state=stream)

    def changes_cache_within(self, cache: KVBenchCache, new_tokens: int) -> bool:
        stream = cache.method_state
        return isinstance(stream, LatentStream) and any(
            self._due(stream, layer, new_tokens) for layer in cache.layers if isinstance(layer.prefix, LatentPrefix)
        )

    @staticmethod
    def _due(stream: LatentStream, layer, new_tokens: int = 0) -> bool:
        return layer.prefix.key_residual.shape[1] + layer.tail_length + new_tokens >= stream.window + stream.chunk

    def on_decode_step(self, cache: KVBenchCache, step: int) -> None:
        """Encode what aged past the raw window, with the compression's encoders, in every latent layer due."""
        stream = cache.method_state
        if not isinstance(stream, LatentStream):
            return
        weight, bias = (self.weights[f"m{stream.latent}.{name}"] for name in ("encoder_weight", "encoder_bias"))
        activation = self.config.activation
        for index, layer in enumerate(cache.layers):
            if not (isinstance(layer.prefix, LatentPrefix) and self._due(stream, layer)):
                continue

            def encoder(which: int, x: torch.Tensor, layer_index: int = index) -> torch.Tensor:
                w, b = weight[which, layer_index].to(x.device), bias[which, layer_index].to(x.device)
                return encode(x, w, b, activation)

            prefix = layer.prefix.with_tail(layer.keys[0], layer.values[0], encoder, stream.window, stream.chunk)
            layer.absorb_tail(prefix)
