"""Paired differences per seed with a 95 % confidence interval (Student t, and a seeded bootstrap).

Two contenders run with the same seed see the same data and start from the same weights, so the
difference of their results *per seed* removes the variation the seed brings to both (which data,
which initial weights): `paired_difference` gives the per-seed differences, their mean and a
Student-t interval with n - 1 degrees of freedom (and a percentile bootstrap of the mean, as a
cross-check; with 5 seeds it is narrower than the t-interval, which is the one to read).

No scipy: the t quantile is computed here (`t_quantile`: the Student-t density integrated by
Simpson's rule, inverted by bisection).

Example:
    >>> d = paired_difference([53.6, 52.5, 50.5, 46.4, 54.4], [50.0, 50.0, 50.0, 50.0, 50.0])
    >>> [round(x, 1) for x in d.differences], round(d.mean, 2), round(d.ci_low, 2), round(d.ci_high, 2)
    ([3.6, 2.5, 0.5, -3.6, 4.4], 1.48, -2.49, 5.45)
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["PairedDifference", "paired_difference", "t_quantile"]


def _t_pdf(x: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_above_half(x: float, df: float, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the density integrated over [0, x] (composite Simpson)."""
    h = x / intervals
    total = _t_pdf(0.0, df) + _t_pdf(x, df)
    total += sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``p`` in (0, 1), ``df`` > 0).

    Example:
        >>> round(t_quantile(0.975, 4), 3)
        2.776
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while _t_cdf_above_half(high, df) < p:  # bracket (the integration step grows with x: fine for p <= 0.9999)
        high *= 2.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if _t_cdf_above_half(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` per seed: the differences, their mean and the confidence intervals.

    ``ci_low`` / ``ci_high``: mean -+ t_{(1+level)/2, n-1} * sd / sqrt(n) (NaN for one seed);
    ``boot_low`` / ``boot_high``: the percentile bootstrap of the mean (NaN for one seed).
    """

    differences: tuple[float, ...]
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    boot_low: float
    boot_high: float
    level: float
    n: int

    def as_dict(self) -> dict:
        """The fields as a dict for strict JSON: NaN (one seed) becomes None."""
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
        return {**out, "differences": list(self.differences)}


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, bootstrap: int = 10_000, seed: int = 0,
) -> PairedDifference:
    """Per-seed differences ``a[i] - b[i]`` with their mean, a Student-t and a bootstrap interval.

    Args:
        a, b: one value per seed, in the same seed order (the pairing).
        level: the interval's coverage (0.95: a 95 % interval).
        bootstrap: resamples of the seeds (with replacement) for the percentile interval; 0: none.
        seed: the bootstrap's seed (the result is deterministic).

    Raises:
        ValueError: different lengths, no value, or ``level`` outside (0, 1).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)} values")
    if not a:
        raise ValueError("no values to pair")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diffs = tuple(float(x) - float(y) for x, y in zip(a, b))
    n, mean = len(diffs), statistics.fmean(diffs)
    nan = float("nan")
    if n < 2:
        return PairedDifference(diffs, mean, nan, nan, nan, nan, nan, level, n)
    sd = statistics.stdev(diffs)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    boot_low = boot_high = nan
    if bootstrap > 0:
        rng = random.Random(seed)
        means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(bootstrap))
        tail = (1.0 - level) / 2
        boot_low = means[int(math.floor(tail * (bootstrap - 1)))]
        boot_high = means[int(math.ceil((1.0 - tail) * (bootstrap - 1)))]
    return PairedDifference(diffs, mean, sd, mean - half, mean + half, boot_low, boot_high, level, n)
