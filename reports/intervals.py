"""95% percentile bootstrap intervals, paired by sample (DESIGN §5: a mean without its n and interval is no result).

A table's columns (its cells, and their differences to the reference) are resampled with one set of draws
of the table's sample ids, so every interval in it reflects the same sampling noise and a paired difference
keeps each sample's pairing. Samples are drawn within their task (stratified), because the headline mean
weighs tasks equally whatever their sample counts; a fixed seed keeps a report the same on every render.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """Per column: the point estimate, its interval bounds and how many samples it scored."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray


def stratified_mean(values: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """Per column: the mean over strata of the mean of its scored (not NaN) values in each stratum.

    Missing (NaN) when a column scored nothing in some stratum: a mean over fewer tasks would not
    compare with the other columns'.
    """
    values = np.asarray(values, dtype=float)
    scored = ~np.isnan(values)
    filled = np.where(scored, values, 0.0)
    per_stratum = [_ratio(filled[strata == s].sum(axis=0), scored[strata == s].sum(axis=0)) for s in _levels(strata)]
    return np.mean(per_stratum, axis=0)


def bootstrap(
    values: np.ndarray, strata: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Estimate:
    """Percentile interval of `stratified_mean` for each column of `values` (samples × columns, NaN = unscored).

    Each resample draws, within every stratum, as many sample ids as the stratum holds, with replacement,
    and applies the same draw to all columns; a column's unscored samples then simply contribute nothing.
    A resample in which a column drew no scored sample of some stratum has no estimate for that column and
    is left out of its percentiles.
    """
    values = np.asarray(values, dtype=float)
    strata = np.asarray(strata)
    scored = ~np.isnan(values)
    filled = np.where(scored, values, 0.0)
    rng = np.random.default_rng(seed)
    replicates = []
    for stratum in _levels(strata):
        inside = strata == stratum
        counts = _draw_counts(int(inside.sum()), resamples, rng)
        replicates.append(_ratio(counts @ filled[inside], counts @ scored[inside]))
    replicate_means = np.mean(replicates, axis=0)
    mean = stratified_mean(values, strata)
    tail = 100 * (1 - level) / 2
    lo = np.full(mean.shape, np.nan)
    hi = np.full(mean.shape, np.nan)
    for column in np.flatnonzero(~np.isnan(mean)):
        estimates = replicate_means[:, column]
        estimates = estimates[~np.isnan(estimates)]
        lo[column], hi[column] = np.percentile(estimates, [tail, 100 - tail])
    return Estimate(mean=mean, lo=lo, hi=hi, n=scored.sum(axis=0))


def _levels(strata: np.ndarray) -> list:
    """Strata in a fixed order, so the draws (and the report) do not depend on row order."""
    return sorted(set(np.asarray(strata).tolist()), key=str)


def _draw_counts(size: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of `size` samples is drawn in each resample (resamples × size), as floats for matmul."""
    draws = rng.integers(0, size, size=(resamples, size)) + size * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * size).reshape(resamples, size).astype(float)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)
