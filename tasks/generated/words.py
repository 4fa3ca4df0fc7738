"""Word pools from the `wonderwords` package files (tasks.md §3), read without its private API."""

from __future__ import annotations

import bisect
import hashlib
import importlib.metadata
import importlib.resources
from functools import cache, lru_cache
from random import Random

_ASSETS = ("nounlist.txt", "adjectivelist.txt", "verblist.txt")


@cache
def _asset_words(name: str) -> tuple[str, ...]:
    text = (importlib.resources.files("wonderwords") / "assets" / name).read_text(encoding="utf-8")
    return tuple(line.rstrip() for line in text.splitlines())


@lru_cache(maxsize=1)
def wonderwords_version() -> str:
    """Recorded with every sample: the pools change with the package."""
    return importlib.metadata.version("wonderwords")


@lru_cache(maxsize=1)
def wonderwords_sha256() -> str:
    """Hash of the three word files, so a silently changed pool invalidates cached data."""
    digest = hashlib.sha256()
    for name in _ASSETS:
        digest.update("\n".join(_asset_words(name)).encode("utf-8") + b"\0")
    return digest.hexdigest()


class AdjNounWords:
    """All `adjective-noun` words, deduplicated and sorted, indexable without building 6M strings.

    Each adjective contributes a sorted block of `adj-noun` strings. Blocks are contiguous in
    the sorted order unless their ranges overlap (e.g. `blue` and `blue-eyed`); only such
    overlapping clusters are materialised, sorted and deduplicated.
    """

    def __init__(self, adjectives: tuple[str, ...], nouns: tuple[str, ...]) -> None:
        self._nouns = sorted(set(nouns))
        first, last = self._nouns[0], self._nouns[-1]
        ranges = sorted((f"{adj}-{first}", f"{adj}-{last}", adj) for adj in set(adjectives))
        self._segments: list[str | list[str]] = []
        self._starts: list[int] = []
        cluster: list[str] = []
        cluster_end = ""
        for low, high, adj in ranges:
            if cluster and low > cluster_end:
                self._add_segment(cluster)
                cluster = []
            cluster_end = max(cluster_end, high) if cluster else high
            cluster.append(adj)
        self._add_segment(cluster)
        self._length = self._starts[-1] + self._segment_length(self._segments[-1])

    def _segment_length(self, segment: str | list[str]) -> int:
        return len(self._nouns) if isinstance(segment, str) else len(segment)

    def _add_segment(self, cluster: list[str]) -> None:
        start = self._starts[-1] + self._segment_length(self._segments[-1]) if self._segments else 0
        if len(cluster) == 1:
            segment: str | list[str] = cluster[0]
        else:
            segment = sorted({f"{adj}-{noun}" for adj in cluster for noun in self._nouns})
        self._segments.append(segment)
        self._starts.append(start)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self._length:
            raise IndexError(index)
        position = bisect.bisect_right(self._starts, index) - 1
        segment, offset = self._segments[position], index - self._starts[position]
        if isinstance(segment, str):
            return f"{segment}-{self._nouns[offset]}"
        return segment[offset]


@lru_cache(maxsize=1)
def niah_words() -> AdjNounWords:
    """NIAH keys and word values: every adjective-noun pair (6,171,620 in wonderwords 3.0.1)."""
    return AdjNounWords(_asset_words("adjectivelist.txt"), _asset_words("nounlist.txt"))


@cache
def cwe_words(seed: int) -> tuple[str, ...]:
    """CWE pool: nouns + adjectives + verbs, deduplicated, sorted, shuffled by the base seed."""
    words = sorted(set(_asset_words("nounlist.txt") + _asset_words("adjectivelist.txt") + _asset_words("verblist.txt")))
    Random(seed).shuffle(words)
    return tuple(words)
