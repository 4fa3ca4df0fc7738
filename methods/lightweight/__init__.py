"""Lightweight trainable scorers (seed 004): the method (`method`), its token features and scorer networks
(`features`) and its training (`training`, run by `kvbench train lightweight`)."""

from kvbench.methods.lightweight.method import Lightweight, LightweightConfig

__all__ = ["Lightweight", "LightweightConfig"]
