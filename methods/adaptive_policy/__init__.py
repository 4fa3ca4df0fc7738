"""Learned per-head budgets (seed 002): the method (`method`), its per-head features (`features`) and its
training (`training`, run by `kvbench train adaptive_policy`)."""

from kvbench.methods.adaptive_policy.method import AdaptivePolicy, AdaptivePolicyConfig

__all__ = ["AdaptivePolicy", "AdaptivePolicyConfig"]
