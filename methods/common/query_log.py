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


def attach_query_log(cache, layers: list[int]) -> None:
    """At decode start: give the cache's method state (if any) a fresh query log and make it the recorder, so the
    queries of every token after the context reach the state, where kv_bytes counts them."""
    state = cache.method_state
    if state is not None:
        state.log = QueryLog(layers)
        cache.recorder = state.log


def logged_state(cache, method: str):
    """At a decode step: the cache's method state with its query log attached (None for a cache the method left
    without decode state); a step before `on_decode_start` is a bug of the caller, said as such."""
    state = cache.method_state
    if state is None:
        return None
    if state.log is None or cache.recorder is not state.log:
        raise RuntimeError(f"{method}'s decode steps need on_decode_start first, which attaches its query log")
    return state
