"""When a gain is evidence: paired differences over replicates, their t-interval, and the metric to report.

A replicate is one draw of the real subset and the classifier's seed; every method of a
replicate uses the same subset, so gains are paired by replicate and the spread of the paired
differences is the noise a claim has to clear.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

MIN_REPLICATES = 3  # fewer and a t-interval is too wide (or, with one, undefined) to call anything
IMBALANCE = 1.5  # largest / smallest class of the test split above this: balanced accuracy is the headline


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided Student-t ``confidence`` interval of the mean of ``values``.

    One value gives an infinite interval: one replicate says nothing about its noise.
    """
    from scipy.special import stdtrit  # the t quantile, as stats.t.ppf; scipy.stats takes 1.2 s longer to import

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, -math.inf, math.inf
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_gain(method: list[float], baseline: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """The gain of ``method`` over ``baseline`` from values paired by replicate (same order, same length).

    ``beyond_noise`` only when the interval excludes 0 and there are at least
    :data:`MIN_REPLICATES` pairs.
    """
    if len(method) != len(baseline):
        raise ValueError(f"paired values need equal counts; got {len(method)} and {len(baseline)}")
    diffs = [m - b for m, b in zip(method, baseline)]
    mean, low, high = t_interval(diffs, confidence)
    return {"mean": mean, "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0, "n": len(diffs),
            "low": low, "high": high, "confidence": confidence,
            "beyond_noise": bool(len(diffs) >= MIN_REPLICATES and (low > 0 or high < 0))}


def replicates_to_decide(mean: float, std: float, confidence: float = 0.95, cap: int = 200) -> int | None:
    """The fewest replicates whose interval would exclude 0 if the true gain were ``mean`` with paired spread ``std``
    (the t half-width falls as 1/sqrt(n)); None when even ``cap`` would not (a gain that small is not worth chasing)."""
    from scipy.special import stdtrit

    if std == 0 or not math.isfinite(std):
        return None if std != 0 or mean == 0 else MIN_REPLICATES
    for n in range(MIN_REPLICATES, cap + 1):
        if float(stdtrit(n - 1, 0.5 + confidence / 2)) * std / math.sqrt(n) < abs(mean):
            return n
    return None


def headline_metric(class_counts: list[int]) -> str:
    """``balanced_accuracy`` when the test split's classes differ by more than :data:`IMBALANCE`:1, else ``top1``."""
    present = [c for c in class_counts if c > 0]
    if len(present) > 1 and max(present) > IMBALANCE * min(present):
        return "balanced_accuracy"
    return "top1"


METRIC_NAMES = {"top1": "top-1 accuracy", "balanced_accuracy": "balanced accuracy"}
