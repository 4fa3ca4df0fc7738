"""Distillation fine-tuning for `attention_clustering` (seed 003's step 4, specs/seed_methods.md (c)).

The method prunes and merges the cache while the model reads; a model fine-tuned to read through that
compression loses less. The student is the model itself run with the compression really applied (the context
streamed in P-token chunks, pruned to B and merged to K between chunks: `streaming_forward` with the
method's own `ClusteringStream`); the teacher is the same model, at the same step, with its full cache and no
gradient. The seed repository's wrapper never applied its compression, so its student was its teacher: here a
test checks that the student's logits change once the first prune has happened.

Loss: L = L_MLE + λ·τ²·KL(softmax(z_teacher/τ) ‖ softmax(z_student/τ)), KL averaged over positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvbench.harness.engine.prefill import streaming_forward
from kvbench.harness.errors import KVBenchError
from kvbench.methods.attention_clustering.method import AttentionClusteringConfig, ClusteringStream, EntryPlan
from kvbench.methods.common.calibration_data import DATA_VERSION, calibration_ids


@dataclass(frozen=True)
class DistillationConfig:
    """Seed 003's recipe: τ = 2, λ = 0.5, AdamW with lr 5e-5 and weight decay 0.01, linear warm-up over 500
    steps, sequences of 2048 tokens, batch 4, compression at B = 1024 kept entries and K = 256 centroids.

    The seed trains 3 epochs of WikiText-103, which cannot be downloaded here: kvbench trains `steps`
    optimizer steps on windows of offline prose (Python's documentation topics, one seeded window per
    sequence), and records that. The warm-up is min(`warmup_steps`, `steps`) steps. Sequences are processed
    one at a time (kvbench's cache holds one sequence) and their gradients accumulated over the batch.
    """

    steps: int = 100
    length: int = 2048
    batch: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 500
    temperature: float = 2.0
    kl_weight: float = 0.5
    max_cache_size: int = 1024
    num_clusters: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.length, self.batch, self.num_clusters) < 1:
            raise KVBenchError("training needs steps, length, batch and clusters of at least 1")
        if self.num_clusters > self.max_cache_size:
            raise KVBenchError(
                f"--clusters {self.num_clusters} exceeds --max-cache {self.max_cache_size}: the cache is pruned "
                "to B entries, then merged into K ≤ B centroids"
            )
        if self.length <= self.max_cache_size:
            raise KVBenchError(
                f"training length {self.length} does not exceed the cache size B = {self.max_cache_size}: nothing "
                "would be pruned and the student would be its teacher; raise --length or lower --max-cache"
            )
        if self.learning_rate <= 0 or self.temperature <= 0 or self.kl_weight < 0:
            raise KVBenchError("training needs a positive learning rate and temperature and a non-negative KL weight")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, MLE, KL) for one sequence: next-token cross-entropy plus λ·τ²·KL(teacher ‖ student) at τ."""
    mle = F.cross_entropy(student_logits[:-1].float(), ids[1:])
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return mle + weight * temperature**2 * kl, mle, kl


def student_logits(
    model: torch.nn.Module, ids: torch.Tensor, method: AttentionClusteringConfig, plan: EntryPlan
) -> torch.Tensor:
    """Logits of every position with the method's pruning and merging applied between P-token chunks."""
    stream = ClusteringStream(method, plan, int(ids.numel()))
    _, logits = streaming_forward(model, ids, stream.chunk_size, stream.after_chunk)
    return logits


def distill(
    model: torch.nn.Module,
    tokenizer,
    config: DistillationConfig,
    method: AttentionClusteringConfig | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict:
    """Fine-tune `model` in place; returns what was trained on and the loss of every step."""
    method = method or AttentionClusteringConfig()
    limit = int(model.config.max_position_embeddings)
    if config.length > limit:
        raise KVBenchError(f"training length {config.length} exceeds the model's maximum of {limit} tokens")
    plan = EntryPlan(keep=config.max_cache_size, clusters=config.num_clusters)
    device = model.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, config.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    history = []
    start = time.perf_counter()
    model.train()
    try:
        for step in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            totals = torch.zeros(3)
            for sequence in range(config.batch):
                seed = config.seed + step * config.batch + sequence
                ids = torch.tensor(calibration_ids(tokenizer, config.length, seed), device=device)
                with torch.no_grad():
                    teacher = model(input_ids=ids[None], use_cache=False).logits[0]
                student = student_logits(model, ids, method, plan)
                loss, mle, kl = distillation_loss(student, teacher, ids, config.temperature, config.kl_weight)
                parts = torch.stack([loss, mle, kl]).detach().cpu()
                if not math.isfinite(float(parts[0])):
                    raise KVBenchError(f"the distillation loss is {float(parts[0])} at step {step}; lower --lr")
                (loss / config.batch).backward()
                totals += parts / config.batch
            learning_rate = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            loss, mle, kl = totals.tolist()
            history.append({"step": step, "loss": loss, "mle": mle, "kl": kl, "lr": learning_rate})
            say(f"kvbench: step {step + 1}/{config.steps}: loss {loss:.4f} (MLE {mle:.4f}, KL {kl:.4f})")
    finally:
        model.eval()
    return {
        "config": asdict(config),
        "method": asdict(method),
        "data": f"{DATA_VERSION}: {config.length}-token windows of Python's documentation topics, seeds "
        f"{config.seed}..{config.seed + config.steps * config.batch - 1}",
        "seconds": round(time.perf_counter() - start, 3),
        "history": history,
    }
