"""Offline per-head statistics for calibration: echo and induction scores on a repeated random sequence
(RazorAttention, arXiv 2407.15891) and the truncated matrix entropy of queries (UNComp, arXiv 2410.03090).

Both read post-RoPE queries and keys from kvbench's own prefill, with an observation window as long as the
input, so they see exactly the tensors the model attends with and depend on no model architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill
from kvbench.methods.common.calibration_data import random_token_ids

# Query rows per chunk when scoring the probe, so the N×N attention of a layer is never held at once.
_PROBE_CHUNK = 256


def observe_all_queries(model: torch.nn.Module, input_ids: list[int]) -> Observation:
    """A prefill that keeps every position's post-RoPE queries ([H_q, N, d] per layer), not just a window."""
    return prefill(model, input_ids, ObservationNeeds(window=len(input_ids)))


def probe_ids(tokenizer, vocab_size: int, length: int, repeats: int, seed: int) -> list[int]:
    """BOS, then `length` seeded random ordinary tokens repeated `repeats` times.

    Random tokens carry no meaning, so the only thing a head can exploit is the earlier copies: heads that
    look at them (echo) or at the token after them (induction) show up, whatever text they saw in training.
    Special tokens are left out because they trigger their own attention patterns.
    """
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])
    sequence = ordinary[random_token_ids(len(ordinary), length, seed)].tolist()
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + sequence * repeats


def copy_pairs(length: int, repeats: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every earlier copy of each token in a sequence of period `length` after `offset` tokens.

    Row i of copy r ≥ 1 pairs with columns i − S, i − 2S, …: the echo mask; the induction mask is the same
    rows with every column moved one to the right (the token that followed the earlier copy).
    """
    positions = torch.arange(length, length * repeats)
    rows, cols = [], []
    for back in range(1, repeats):
        earlier = positions - back * length
        valid = earlier >= 0
        rows.append(positions[valid])
        cols.append(earlier[valid])
    return torch.cat(rows) + offset, torch.cat(cols) + offset


def _masked_sums(
    attention: torch.Tensor, first_row: int, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of attention [H, m, N] (rows first_row … first_row + m − 1) over the echo and induction entries."""
    inside = (rows >= first_row) & (rows < first_row + attention.shape[1])
    local, col = rows[inside] - first_row, cols[inside]
    return attention[:, local, col].sum(-1), attention[:, local, col + 1].sum(-1)


def probe_scores(attention: torch.Tensor, length: int, repeats: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction scores [H] of full attention maps [H, N, N]: mean attention over each mask's entries."""
    rows, cols = copy_pairs(length, repeats, offset)
    echo, induction = _masked_sums(attention.float(), 0, rows, cols)
    return echo / rows.numel(), induction / rows.numel()


def layer_probe_scores(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, length: int, repeats: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`probe_scores` of one layer's causal attention, from post-RoPE queries [H_q, N, d] and keys [H_kv, N, d].

    Attention is computed a chunk of rows at a time and per KV head's query group (no repeat_kv); rows before
    the second copy hold no mask entry and are skipped.
    """
    h_q, n, dim = queries.shape
    h_kv = keys.shape[0]
    group = h_q // h_kv
    rows, cols = copy_pairs(length, repeats, offset)
    rows, cols = rows.to(queries.device), cols.to(queries.device)
    echo = torch.zeros(h_q, device=queries.device)
    induction = torch.zeros(h_q, device=queries.device)
    grouped = queries.float().reshape(h_kv, group, n, dim)
    keys = keys.float()
    columns = torch.arange(n, device=queries.device)
    for start in range(offset + length, n, _PROBE_CHUNK):
        stop = min(start + _PROBE_CHUNK, n)
        logits = torch.einsum("hgid,hjd->hgij", grouped[:, :, start:stop], keys) * scaling
        future = columns[None, :] > torch.arange(start, stop, device=queries.device)[:, None]
        attention = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).reshape(h_q, stop - start, n)
        chunk_echo, chunk_induction = _masked_sums(attention, start, rows, cols)
        echo += chunk_echo
        induction += chunk_induction
    return echo / rows.numel(), induction / rows.numel()


def truncated_matrix_entropy(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """H_k of matrices [..., N, d]: −Σ_{i≤k} σ_i log σ_i / log d over the top-k eigenvalues of ZᵀZ/N.

    Z is the matrix with rows centred over tokens and L2-normalised, so Σ has trace 1 and the entropy measures
    how many directions the rows spread over: 1 for isotropic rows (k = d), 0 for rows on one line.
    """
    n, dim = matrix.shape[-2], matrix.shape[-1]
    centred = matrix.double() - matrix.double().mean(dim=-2, keepdim=True)
    z = F.normalize(centred, dim=-1)
    sigma = z.transpose(-1, -2) @ z / n
    eigenvalues = torch.linalg.eigvalsh(sigma).flip(-1)[..., : min(rank, dim)].clamp_min(0)
    terms = torch.where(eigenvalues > 0, eigenvalues * eigenvalues.clamp_min(1e-300).log(), 0.0)
    return (-terms.sum(-1) / math.log(dim)).float()
