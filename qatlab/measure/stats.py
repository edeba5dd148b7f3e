"""Statistics over a population of measured models: Kendall's rank correlation (Jiang et al.
2019 rank generalization measures by it against the generalization gap)."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
