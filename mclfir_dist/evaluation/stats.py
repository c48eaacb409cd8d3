"""Is a difference between two methods more than seed noise? Welch's t-test (unequal variances), with the
t distribution's tail integrated numerically (no SciPy needed), and the wording a claim may use."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Welch:
    difference: float   # mean(a) - mean(b)
    t: float
    df: float
    p: float            # two-sided

    def verdict(self, alpha: float = 0.05) -> str:
        """'above', 'below' or 'not distinguishable' (a at the level alpha against b)."""
        if not self.p < alpha:
            return "not distinguishable"
        return "above" if self.difference > 0 else "below"


def p_text(p: float) -> str:
    """'p = 0.012', or 'p < 0.001' where three decimals would print 0.000."""
    return "p < 0.001" if p < 0.0005 else f"p = {p:.3f}"


def t_two_sided_p(t: float, df: float, steps: int = 4000) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (Simpson's rule on the density)."""
    t = abs(t)
    if t == 0:
        return 1.0
    if math.isinf(t):
        return 0.0
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))
    h = t / steps
    area = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return min(1.0, max(0.0, 1.0 - 2.0 * area * h / 3.0))


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's t-test of mean(a) vs mean(b); each needs at least 2 values."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per side, got {len(a)} and {len(b)}")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return Welch(ma - mb, math.copysign(math.inf, ma - mb) if ma != mb else 0.0, math.inf,
                     0.0 if ma != mb else 1.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return Welch(ma - mb, t, df, t_two_sided_p(t, df))
