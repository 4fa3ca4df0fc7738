"""Learned per-head budgets over any scorer (seed 002, "LearnedKV"; seed_methods.md (b)), stored ragged.

Per layer, a small network reads each KV head's statistics (52 features of its cached keys and values) and gives
it a logit; water-filling turns the layer's logits into token budgets k_h with Σ_h k_h fixed; each head keeps its
top k_h tokens by the base scorer. The seed topped every head back up to the uniform budget after allocating (so
its allocation never took effect) and crashed on every GQA sample; here the budgets are what each head stores.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.harness.artifacts.training import Trained, train_text
from kvbench.harness.cache.prefix import LayerPrefix
from kvbench.harness.engine.prefill import Observation, ObservationNeeds
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.method_spec import option
from kvbench.methods.adakv import AdaKVConfig
from kvbench.methods.adaptive_policy import training
from kvbench.methods.adaptive_policy.features import (
    FEATURE_VERSION,
    SCALARS,
    BudgetPolicy,
    context_statistics,
    feature_record,
    head_budgets,
    select_per_head,
)
from kvbench.methods.base import Method, register
from kvbench.methods.common.eviction import gather_heads, tokens_for_budget
from kvbench.methods.common.scorers import Scorer, canonical_options, get_scorer


@dataclass(frozen=True)
class AdaptivePolicyConfig:
    """Seed 002's policy as seed_methods.md (b) specifies it (LearnedKV/LearnedKV_Code, a fork of kvpress 0.4.0).

    base: the scorer whose ranking each head keeps its top k_h tokens of (snapkv, h2o, tova, expected_attention,
    knorm; `base_options` as for adakv, e.g. `base_options=window=32`). Default snapkv: its scores are the
    window's attention probabilities, the same kind of quantity as the teacher's u (attention of the last
    queries), so what the policy budgets for and what the base keeps agree; knorm and tova rank within a head
    only (tova keeps one token order for the whole layer). The policy itself is trained on u alone and never sees
    the base; a checkpoint still names its base, because its held-out table compares allocations over that base.

    c_min: tokens every head keeps at least, the same in training and at inference (the seed used 0 and 1).
    Budget: c = b, and each layer's heads share exactly H_kv·int(b·N) tokens, what uniform top-k and AdaKV store
    at the same b (so bytes are equal across the three); the water-filled budgets are rounded to whole tokens by
    largest remainder. b = 1 keeps everything.

    Training (`kvbench train adaptive_policy --model M --base B --out FILE`): t_q = 256 teacher queries,
    `texts` windows of `length` tokens of offline prose (plus `text_file`s), `heldout_fraction` held out
    (recorded), AdamW lr `lr`, weight decay `weight_decay`, hidden 128, one text per step, c ~ U(0.2, 0.8) per
    step, `epochs` passes. The spec's defaults are 100 texts (README: 1000) of 2048 tokens (README: 4096), 10
    epochs, lr 1e-4, batch 1 (README: 4). Here: 22 texts of 2048 tokens and 6 held out, all that kvbench's offline
    prose holds (29 such windows for SmolLM2's tokenizer); with 22 texts instead of 100, 60 epochs at lr 1e-3 give
    the policy about as many steps (1320). The teacher prefills are the whole cost: a policy step takes about 16 ms
    on SmolLM2's shapes (one thread), a 2048-token prefill some seconds on idle cores and minutes on busy ones
    (4–5 min each at a load of 11–16 on 2 cores, measured; `--texts 6` then takes about 40 minutes). On a GPU,
    give more text (`--text-file`), raise `texts` to the spec's 100 and `length` to 4096; the epochs can then drop
    to the spec's 10.
    """

    base: str = option("snapkv", choices=("snapkv", "h2o", "tova", "expected_attention", "knorm"))  # SCORERS
    base_options: str = ""
    c_min: int = option(1, at_least=1)  # a head with no token has nothing to attend to
    t_q: int = option(256, at_least=1)
    texts: int = option(22, at_least=1)
    length: int = option(2048, at_least=16)
    heldout_fraction: float = option(0.25, above=0, below=1)
    epochs: int = option(60, at_least=1)
    lr: float = option(1e-3, above=0)
    weight_decay: float = option(0.01, at_least=0)
    hidden: int = option(128, at_least=1)
    seed: int = option(0, at_least=0)
    text_file: tuple[str, ...] = ()
    checkpoint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_options", canonical_options(self.base, self.base_options))


# What the weights and their table depend on: every field but the checkpoint's path.
TRAINING_FIELDS = tuple(name for name in AdaptivePolicyConfig.__dataclass_fields__ if name != "checkpoint")
# Fields a checkpoint must agree with to be used: the allocation's own (the rest only says how it was trained).
MATCHED_FIELDS = ("base", "base_options", "c_min", "hidden")


def _remake(config: AdaptivePolicyConfig) -> str:
    options = f" --base-options {config.base_options}" if config.base_options else ""
    return (
        f"kvbench train adaptive_policy --model <model> --base {config.base}{options} --c-min {config.c_min} --out FILE"
    )


@register
class AdaptivePolicy(Method):
    name = "adaptive_policy"
    family = "token eviction (per-head budgets)"
    description = "Learned per-head token budgets (water-filled per layer) over any scorer's ranking (ragged heads)"
    Config = AdaptivePolicyConfig
    needs_calibration = True
    learns = True

    def __init__(self, config: AdaptivePolicyConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.policy: BudgetPolicy | None = None
        self.features: dict | None = None

    @property
    def scorer(self) -> Scorer:
        return get_scorer(self.config.base, self.config.base_options)

    def needs(self) -> ObservationNeeds:
        return self.scorer.needs()

    def calibration_key(self) -> str:
        fields = " ".join(f"{name}={getattr(self.config, name)!r}" for name in TRAINING_FIELDS)
        return f"{fields} features=v{FEATURE_VERSION}"

    def calibrate(self, model: torch.nn.Module, tokenizer) -> Trained:
        config = self.config
        start = time.perf_counter()
        split = train_text(
            tokenizer, config.texts * config.length, config.length, config.seed, config.heldout_fraction,
            config.text_file,
        )  # fmt: skip
        train = training.dump(model, split.train, config.t_q, None, "kvbench: teacher prefill (train)")
        heldout = training.dump(model, split.heldout, config.t_q, self.scorer, "kvbench: teacher prefill (held-out)")
        dumped = training.seconds_since(start)
        statistics = torch.stack([s.statistics for s in train])
        layers, heads, _ = train[0].statistics.shape
        head_dim = (statistics.shape[-1] - SCALARS) // 4
        alpha_safeguard = AdaKVConfig().alpha_safeguard
        with training.one_thread():
            policy = training.initial_policy(head_dim, config.hidden, config.seed, statistics)
            initial = {
                "train": training.mean_loss(policy, train, config.c_min),
                "heldout": training.mean_loss(policy, heldout, config.c_min),
            }
            epochs = training.train_policy(policy, train, config)
            policy.eval()
            table = training.allocation_table(policy, heldout, config.c_min, alpha_safeguard)
            losses = {
                "train": training.mean_loss(policy, train, config.c_min),
                "heldout": training.mean_loss(policy, heldout, config.c_min),
                "heldout_uniform": training.mean_loss(None, heldout, config.c_min),
                "heldout_untrained": initial["heldout"],
                "train_untrained": initial["train"],
                "train_epochs": training.epochs_record(epochs),
                "heldout_coverage": table,
            }
        settings = {
            "features": feature_record(head_dim, layers, heads),
            "base": config.base,
            "base_options": config.base_options,
            "c_min": config.c_min,
            "scope": "one layer's KV heads (training and inference)",
            "teacher": f"attention mass of the last {config.t_q} queries, mean over the query group",
            "loss_fractions": "trained on c ~ U(0.2, 0.8); losses measured on c in "
            + ", ".join(f"{c:g}" for c in training.LOSS_GRID),
            "table_budgets": f"H_kv·int(c·T) tokens per layer for every allocation; AdaKV α_safeguard {alpha_safeguard}",
            "optimizer": f"AdamW lr {config.lr} weight decay {config.weight_decay}, one text per step",
            "dump_seconds": dumped,
            "seconds": training.seconds_since(start),
        }
        print(training.format_table(table, config.base), file=sys.stderr)
        return Trained(
            {name: t.detach().clone() for name, t in policy.state_dict().items()}, split.record, losses, settings
        )

    def load_calibration(self, artifacts: dict[str, torch.Tensor]) -> None:
        record = getattr(self, "artifact_record", None) or {}
        self._check_record(record)
        try:
            head_dim = int(artifacts["mean_keys.weight"].shape[1])
            policy = BudgetPolicy(head_dim, self.config.hidden)
            policy.load_state_dict(artifacts)
        except (KeyError, RuntimeError):
            raise KVBenchError(
                f"adaptive_policy's weights do not fit its network; make new ones with '{_remake(self.config)}'"
            ) from None
        self.policy = policy.eval()
        self.features = (record.get("settings") or {}).get("features")

    def _check_record(self, record: dict) -> None:
        """A checkpoint made for another base, C_min, network or features is one line; the harness has already
        checked its format, method and model."""
        if "config" not in record:  # weights handed over right after training: they are this config's
            return
        where = f"checkpoint {self.config.checkpoint}" if self.config.checkpoint else "the cached policy"
        trained, settings = record["config"], record.get("settings") or {}
        for field in MATCHED_FIELDS:
            if trained.get(field) != getattr(self.config, field):
                raise KVBenchError(
                    f"{where} was trained with {field}={trained.get(field)!r}, not {getattr(self.config, field)!r}; "
                    f"make one with '{_remake(self.config)}'"
                )
        version = (settings.get("features") or {}).get("version")
        if version != FEATURE_VERSION:
            raise KVBenchError(
                f"{where} was trained on features version {version}, this kvbench computes version "
                f"{FEATURE_VERSION}; make one with '{_remake(self.config)}'"
            )

    def method_bytes(self) -> int | None:
        """The policy's weights (and standardization): model-sized, not part of any context's cache."""
        if self.policy is None:
            return None
        return sum(t.numel() * t.element_size() for t in self.policy.state_dict().values())

    def _policy_on(self, observation: Observation) -> BudgetPolicy:
        if self.policy is None:
            raise KVBenchError(
                f"adaptive_policy has no policy loaded; train one with '{_remake(self.config)}' and pass "
                "adaptive_policy:checkpoint=FILE"
            )
        shape = (observation.head_dim, observation.num_layers, observation.num_kv_heads)
        if self.features and shape != (self.features["head_dim"], self.features["layers"], self.features["kv_heads"]):
            raise KVBenchError(
                f"adaptive_policy's policy is for another model shape (head_dim, layers, KV heads) = "
                f"{(self.features['head_dim'], self.features['layers'], self.features['kv_heads'])}, not {shape}; "
                f"make one with '{_remake(self.config)}'"
            )
        device = observation.keys[0].device
        if self.policy.loc.device != device:
            self.policy = self.policy.to(device)
        return self.policy

    def head_budgets(self, observation: Observation, budget: float) -> list[list[int]]:
        """k_h of every layer: the policy's logits of the layer's heads, water-filled to H_kv·int(b·N) tokens."""
        n = observation.context_length
        n_kept = tokens_for_budget(n, budget)
        if n_kept < self.config.c_min:
            raise BudgetError(
                f"budget {budget:g} keeps {n_kept} tokens per head of a {n}-token context, fewer than "
                f"c_min={self.config.c_min}; raise the budget"
            )
        policy = self._policy_on(observation)
        with torch.no_grad():
            alpha = policy(context_statistics(observation.keys, observation.values))
        total = observation.num_kv_heads * n_kept
        return [head_budgets(alpha[layer], n, total, self.config.c_min) for layer in range(observation.num_layers)]

    def _compress(self, observation: Observation, budget: float) -> list[LayerPrefix]:
        n_kept = tokens_for_budget(observation.context_length, budget)
        scorer = self.scorer
        return [
            gather_heads(observation, layer, select_per_head(scorer.scores(observation, layer, n_kept), counts))
            for layer, counts in enumerate(self.head_budgets(observation, budget))
        ]
