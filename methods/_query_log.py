"""The queries of the tokens fed after the context, for methods that act while decoding."""

from __future__ import annotations

import torch


class QueryLog:
    """Sits in the decode cache's recorder slot: the harness's attention hands it the post-RoPE queries of
    every token fed after the context (question and generated tokens). Only the layers asked for keep theirs,
    and only until the method takes them."""

    def __init__(self, layers: list[int]):
        self.queries: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if layer_idx in self.queries:
            self.queries[layer_idx].append(query[0])

    def take(self, layer_idx: int) -> torch.Tensor:
        """[H_q, m, d]: the queries observed since the last call, oldest first."""
        queries = torch.cat(self.queries[layer_idx], dim=1)
        self.queries[layer_idx] = []
        return queries
