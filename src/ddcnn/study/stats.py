"""Statistics over seeds: mean, sample standard deviation, Student-t confidence intervals, paired differences.

Pure functions on plain floats. The confidence interval of a mean over ``n`` seeds is
``mean ± t(1 - (1 - level) / 2, n - 1) · s / sqrt(n)``, with ``s`` the sample standard deviation (divisor ``n - 1``)
and ``t`` the Student-t quantile from ``scipy.stats`` (a maintained library). A paired difference
(same seed = same data order and same initialisation of the local CNNs) is the same interval over the per-seed
differences ``a_s - b_s``, so that the seed-to-seed variation both strategies share cancels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from scipy import stats

LEVEL = 0.95
METHOD = ("mean over seeds; sample standard deviation (n - 1); 95% confidence interval mean ± t(0.975, n - 1) · s / "
          "sqrt(n) (Student t); claims are paired differences over the seeds both strategies finished, and a claim "
          "holds when its interval lies above 0, fails when it lies below 0, else (or with n < 2) is inconclusive")


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (``scipy.stats.t.ppf``)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with the sample standard deviation and the t interval (None where n < 2)."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    """Mean, sample standard deviation and ``level`` Student-t confidence interval of the mean."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def verdict(summary: Summary) -> str:
    """``holds`` when the interval lies above 0, ``fails`` when below 0, else ``inconclusive`` (also for n < 2)."""
    if summary.n < 2 or summary.ci_low is None or summary.ci_high is None:
        return "inconclusive"
    if summary.ci_low > 0:
        return "holds"
    if summary.ci_high < 0:
        return "fails"
    return "inconclusive"


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """``a[s] - b[s]`` for every seed ``s`` both hold, in seed order."""
    return {s: float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))}


def ratio_summary(ratios: Sequence[float], level: float = LEVEL) -> dict:
    """The geometric mean of positive ``ratios`` with its ``level`` interval, from the Student-t interval of the
    mean of their logarithms (both ends exponentiated); the verdict of "a ratio below 1": ``holds`` when the
    interval lies below 1, ``fails`` when it lies above 1, else ``inconclusive`` (also for n < 2)."""
    logs = summarize([math.log(r) for r in ratios], level)
    ends = (None, None) if logs.ci_low is None or logs.ci_high is None else (math.exp(logs.ci_low),
                                                                             math.exp(logs.ci_high))
    word = ("inconclusive" if ends[0] is None or ends[1] is None else
            "holds" if ends[1] < 1 else "fails" if ends[0] > 1 else "inconclusive")
    return {"n": logs.n, "geometric_mean": None if logs.mean is None else math.exp(logs.mean),
            "ci_low": ends[0], "ci_high": ends[1], "verdict": word}
