"""Bootstrap intervals over prompts: the one helper behind sweep, compare, the report and FID.

Resampling is stratified: each category's prompts are drawn from that category only, so every
resample keeps the category sizes, and GenEval's overall (the mean of the category accuracies)
is computed on every resample as on the data. Runs compared on the same prompts are resampled
together (paired): row r of `values` is run r, column j prompt j, and every run gets the same
draw. scipy.stats.bootstrap has no strata, hence the few lines of numpy here.

An interval over fewer than MIN_N prompts says little (two prompts that both pass give
[100, 100]); `enough(n)` is False then, and the tables and plots show the point with its n and
no interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 1000  # the default number of resamples everywhere
MIN_N = 10  # fewer prompts than this: no interval is shown
LEVEL = 0.95


def enough(n: int) -> bool:
    """Whether n observations are enough to show an interval."""
    return n >= MIN_N


def strata_of(labels: Sequence[str | None]) -> list[np.ndarray]:
    """Positions of each label's items (sorted labels); one stratum when no item has a label."""
    if all(c is None for c in labels):
        return [np.arange(len(labels))]
    names = ["" if c is None else str(c) for c in labels]
    arr = np.array(names)
    return [np.flatnonzero(arr == c) for c in sorted(set(names))]


def resample_indices(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) positions drawn with replacement."""
    return rng.integers(0, n, size=(resamples, n))


def stratified_bootstrap(values: np.ndarray, strata: Sequence[np.ndarray], category_mean: bool,
                         resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """values: (R, n), one row per run, columns paired by prompt (a 1-D array is one run).

    Returns the statistic on every resample, (R, B), and each stratum's mean per resample,
    [(R, B)], the same prompts drawn for every run. The statistic: the mean of the stratum means
    (`category_mean`, GenEval's overall) or the plain mean over prompts."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    rng = np.random.default_rng(seed)
    per_stratum = []
    for pos in strata:
        draw = pos[resample_indices(len(pos), resamples, rng)]  # (B, n_c)
        per_stratum.append(values[:, draw].mean(-1))  # (R, B, n_c) -> (R, B)
    if category_mean:
        stat = np.mean(per_stratum, axis=0)
    else:
        sizes = np.array([len(p) for p in strata], dtype=float)
        stat = np.tensordot(sizes / sizes.sum(), np.stack(per_stratum), axes=1)  # stratum-weighted = plain mean
    return stat, per_stratum


def point_estimate(values: np.ndarray, strata: Sequence[np.ndarray], category_mean: bool) -> np.ndarray:
    """The statistic of `stratified_bootstrap` on the data itself, one per run."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    if category_mean:
        return np.mean([values[:, pos].mean(-1) for pos in strata], axis=0)
    return values.mean(-1)


def interval(draws: np.ndarray, point: float | None = None, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap draws, widened to hold `point` when a tiny, skewed
    sample's percentiles miss it."""
    tail = 100 * (1 - level) / 2
    lo, hi = (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
    if point is not None:
        lo, hi = min(lo, float(point)), max(hi, float(point))
    return lo, hi


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], n: int, resamples: int = RESAMPLES,
                        seed: int = 0) -> np.ndarray:
    """`statistic(positions)` on every resample of n items (set-level statistics such as FID)."""
    rng = np.random.default_rng(seed)
    return np.array([statistic(idx) for idx in resample_indices(n, resamples, rng)])
