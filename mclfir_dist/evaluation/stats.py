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


# --------------------------------------------------------------------------------------------- paired designs
# Every method of a study shares its seeds (data order, query draw): the differences per seed are what vary.

@dataclass(frozen=True)
class Paired:
    """A paired comparison a - b over seeds: mean difference, its two-sided (1 - alpha) t interval, the paired
    t-test's p, and Cohen's d_z (mean difference / sd of the differences)."""
    differences: tuple
    mean: float
    low: float
    high: float
    p: float
    d_z: float
    alpha: float = 0.05

    @property
    def n(self) -> int:
        return len(self.differences)

    def verdict(self, p_adjusted: float | None = None) -> str:
        p = self.p if p_adjusted is None else p_adjusted
        if not p < self.alpha:
            return "not distinguishable"
        return "above" if self.mean > 0 else "below"

    def interval_text(self, scale: float = 100.0) -> str:
        return (f"{scale * self.mean:+.2f} [{scale * self.low:+.2f}, {scale * self.high:+.2f}]")


def paired(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> Paired:
    """Paired t over seeds (a[i] and b[i] share seed i). Needs at least 2 pairs."""
    from scipy import stats as st
    if len(a) != len(b):
        raise ValueError(f"a paired test needs as many values on each side, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    if len(d) < 2:
        raise ValueError(f"a paired test needs at least 2 pairs, got {len(d)}")
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
        return Paired(tuple(d), mean, mean, mean, p, math.copysign(math.inf, mean) if mean else 0.0, alpha)
    half = st.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    p = float(st.ttest_rel(a, b).pvalue)
    return Paired(tuple(d), mean, mean - half, mean + half, p, mean / sd, alpha)


@dataclass(frozen=True)
class Equivalence:
    """TOST: a - b within (-margin, +margin). p is the larger of the two one-sided p values; the (1 - 2 alpha)
    interval lies inside the margin exactly when p < alpha."""
    margin: float
    mean: float
    low: float    # the (1 - 2 alpha) interval of the paired difference
    high: float
    p: float
    alpha: float = 0.05

    def verdict(self, p_adjusted: float | None = None) -> str:
        p = self.p if p_adjusted is None else p_adjusted
        return "equivalent" if p < self.alpha else "not shown equivalent"


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float, alpha: float = 0.05) -> Equivalence:
    """Two one-sided paired t-tests of |mean(a - b)| < margin (margin in the values' own units)."""
    from scipy import stats as st
    pr = paired(a, b, alpha=2 * alpha)   # its interval is the (1 - 2 alpha) one
    n, d = pr.n, pr.differences
    sd = math.sqrt(sum((x - pr.mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        p = 0.0 if abs(pr.mean) < margin else 1.0
    else:
        se = sd / math.sqrt(n)
        p_low = st.t.sf((pr.mean + margin) / se, n - 1)    # H0: mean <= -margin
        p_high = st.t.cdf((pr.mean - margin) / se, n - 1)  # H0: mean >= +margin
        p = float(max(p_low, p_high))
    return Equivalence(margin, pr.mean, pr.low, pr.high, p, alpha)


def holm(p_values: Sequence[float]) -> list:
    """Holm's step-down adjusted p values (family-wise error over the claims), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
