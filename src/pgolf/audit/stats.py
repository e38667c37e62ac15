"""Welch's t-test and the Student-t tail, written out so the CLI needs no scipy (SPEC §1.5).

The t distribution's CDF is the regularised incomplete beta function,
P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2), evaluated with Lentz's continued fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # the fraction converges fast only on this side of the mean; use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df may be fractional)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


@dataclass(frozen=True)
class Welch:
    t: float  # (mean_a − mean_b) / standard error
    df: float  # Welch–Satterthwaite degrees of freedom
    p_two_sided: float
    standard_error: float


def welch_t_test(a: list[float], b: list[float], margin: float = 0.0) -> Welch:
    """Welch's unequal-variance t-test of mean(a) − mean(b) − margin.

    A group of one value has no variance estimate; it then counts as a known constant (the
    published score of another submission), which reduces the test to a one-sample t-test.
    """
    if len(a) + len(b) < 3 or (len(a) < 2 and len(b) < 2):
        raise ValueError("a t-test needs at least two values in one group")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    diff = ma - mb - margin
    if se == 0.0:
        t = math.copysign(math.inf, diff) if diff else 0.0
        return Welch(t, math.inf, 0.0 if diff else 1.0, 0.0)
    terms = [v * v / (len(g) - 1) for v, g in ((va, a), (vb, b)) if len(g) > 1]
    df = (va + vb) ** 2 / sum(terms)
    t = diff / se
    return Welch(t, df, min(1.0, 2.0 * t_sf(abs(t), df)), se)
