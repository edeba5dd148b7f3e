"""Statistics over a population of measured models: Kendall's rank correlation (Jiang et al.
2019 rank generalization measures by it against the generalization gap), and paired per-seed
differences of two arms with Student-t intervals (comparison reports' contrasts)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qatlab.measure.registry import is_number


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of paired samples (ties in either variable handled): +1 when ``x`` and
    ``y`` order every pair alike, -1 when oppositely; NaN with fewer than 2 pairs or a
    constant variable."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


# ----------------------------------------------------------------------------- paired differences
# Student's t from the regularized incomplete beta function (continued fraction, Numerical
# Recipes' betacf): exact to ~1e-12 for any degrees of freedom, with no scipy in the core deps.
def _beta_cf(a: float, b: float, x: float) -> float:
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on
    :func:`t_cdf`; ``t_quantile(0.975, 4)`` = 2.776)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """Per-seed paired differences ``d_s = arm_s - control_s`` over the seeds both sides have.

    ``lo``/``hi``: the two-sided ``level`` Student-t interval of the mean difference,
    ``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)`` (None with fewer than 2 pairs: no interval).
    ``wins``/``ties``/``losses``: d > tie, |d| <= tie, d < -tie (signs as measured, not by
    which direction is better). ``unpaired``: seeds only one side has (ignored)."""

    diffs: tuple[tuple[Any, float], ...]  # (seed, d) in seed order
    unpaired: int
    tie: float = 0.0
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def values(self) -> list[float]:
        return [d for _, d in self.diffs]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.diffs else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def half_width(self) -> float | None:
        if self.n < 2:
            return None
        return t_quantile(0.5 + self.level / 2, self.n - 1) * self.sd / math.sqrt(self.n)

    @property
    def lo(self) -> float | None:
        return None if self.n < 2 else self.mean - self.half_width

    @property
    def hi(self) -> float | None:
        return None if self.n < 2 else self.mean + self.half_width

    @property
    def wins(self) -> int:
        return sum(d > self.tie for d in self.values)

    @property
    def ties(self) -> int:
        return sum(abs(d) <= self.tie for d in self.values)

    @property
    def losses(self) -> int:
        return sum(d < -self.tie for d in self.values)

    def verdict(self, higher_is_better: bool | None = True) -> str:
        """``better`` / ``worse`` when the interval excludes 0 (on the better / worse side;
        ``higher`` / ``lower`` for a metric with no better side, ``higher_is_better=None``),
        else ``no detectable difference (n=N)``; with fewer than 2 pairs, says why there is
        no interval."""
        if self.n == 0:
            return "no paired seeds"
        if self.n == 1:
            return "no interval (n=1)"
        if self.lo > 0 or self.hi < 0:
            if higher_is_better is None:
                return "higher" if self.lo > 0 else "lower"
            return "better" if (self.lo > 0) == higher_is_better else "worse"
        return f"no detectable difference (n={self.n})"


def paired_differences(
    arm: Mapping[Any, float | None],
    control: Mapping[Any, float | None],
    tie: float = 0.0,
    level: float = 0.95,
) -> Paired:
    """:class:`Paired` differences of ``arm`` minus ``control``, both ``{seed: value}``; seeds
    with a value (finite number) on one side only are counted in ``unpaired`` and ignored."""
    a = {s: v for s, v in arm.items() if is_number(v)}
    c = {s: v for s, v in control.items() if is_number(v)}
    common = sorted(set(a) & set(c))
    diffs = tuple((s, float(a[s]) - float(c[s])) for s in common)
    return Paired(diffs, len(set(a) ^ set(c)), float(tie), float(level))
