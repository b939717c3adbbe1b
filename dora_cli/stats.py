"""The statistics of a study: confidence intervals over seeds, paired differences, the one-seed fallback.

    over_seeds([71.2, 72.0, 70.4])           # Student t: mean ± t(0.975, n-1) · sd / √n
    binomial(71.2, se=0.9)                   # one seed: mean ± z(0.975) · the test sets' standard error
    paired([70.1, 71.3, 69.8], [71.0, 71.9, 70.5])   # b − a per seed: mean, Student-t interval, t, p

Every result is an `Estimate`: the mean, the interval (low, high, half-width), n (the numbers behind it)
and `basis`, the kind of interval ("student-t over seeds", "binomial (test examples), one seed", or "none"
when one number leaves no interval). A difference whose interval lies on one side of 0 `excludes_zero`.

Student's t distribution for an integer number of degrees of freedom ν has a closed form (Abramowitz &
Stegun 26.7.3-4): with θ = atan(t / √ν), P(|T| ≤ t) is a finite sum of powers of cos θ. The quantile
`t_critical` inverts it by bisection to float precision; no table, no scipy at run time (tests compare
both with scipy.stats).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

CONFIDENCE = 0.95

STUDENT_T = "student-t over seeds"
BINOMIAL = "binomial (test examples), one seed"
NONE = "none (one value)"


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval (None where one number gives none)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    basis: str
    confidence: float = CONFIDENCE
    t: float | None = None  # paired differences over seeds: the t statistic (scipy's ttest_rel)
    p: float | None = None  # and its two-sided p-value

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width, "excludes_zero": self.excludes_zero}


# ---- Student's t ----------------------------------------------------------------------------------------
def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    t = abs(t)
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    cos, sin = math.cos(theta), math.sin(theta)
    c2 = cos * cos
    if df % 2:  # odd: (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + ... + (2·4···(ν−3))/(1·3···(ν−2)) cos^(ν−2) θ))
        term = total = cos
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        series = total if df > 1 else 0.0
        return min(1.0, 2 / math.pi * (theta + sin * series))
    # even: sin θ (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ... + (1·3···(ν−3))/(2·4···(ν−2)) cos^(ν−2) θ)
    term = total = 1.0
    for k in range(2, df - 1, 2):
        term *= (k - 1) / k * c2
        total += term
    return min(1.0, sin * total)


def t_p_value(t: float, df: int) -> float:
    """The two-sided p-value of a t statistic: P(|T| >= |t|)."""
    return max(0.0, 1.0 - t_two_sided_mass(t, df))


def t_critical(confidence: float, df: int) -> float:
    """t with P(|T| <= t) = confidence: the (1 + confidence) / 2 quantile (scipy: t.ppf((1 + c) / 2, df))."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < confidence:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if t_two_sided_mass(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def z_critical(confidence: float) -> float:
    """The normal distribution's (1 + confidence) / 2 quantile (1.96 for 95 %)."""
    return NormalDist().inv_cdf((1 + confidence) / 2)


# ---- estimates --------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n − 1 in the denominator; 0 for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def over_seeds(values: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """The mean of one number per seed with its Student-t interval (n >= 2); one value: no interval."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean, sd = mean_sd(values)
    if n == 1:
        return Estimate(mean, None, None, 1, NONE, confidence)
    half = t_critical(confidence, n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, STUDENT_T, confidence)


def binomial(mean: float, se: float | None, confidence: float = CONFIDENCE) -> Estimate:
    """One seed: the accuracy with the normal interval of its binomial standard error (the test sets' noise only)."""
    if se is None:
        return Estimate(mean, None, None, 1, NONE, confidence)
    half = z_critical(confidence) * se
    return Estimate(mean, mean - half, mean + half, 1, BINOMIAL, confidence)


def paired(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """b − a, seed by seed: the mean difference, its Student-t interval, t and the two-sided p-value
    (scipy.stats.ttest_rel(b, a)). One pair: the difference alone."""
    if len(a) != len(b) or not a:
        raise ValueError("paired: two lists of the same, non-zero length")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    if n == 1:
        return Estimate(mean, None, None, 1, NONE, confidence)
    se = sd / math.sqrt(n)
    half = t_critical(confidence, n - 1) * se
    if se > 0:
        t = mean / se
        p = t_p_value(t, n - 1)
    else:  # every seed gave the same difference
        t, p = (math.copysign(math.inf, mean), 0.0) if mean else (None, None)
    return Estimate(mean, mean - half, mean + half, n, STUDENT_T, confidence, t=t, p=p)


def binomial_difference(a_se: float | None, b_se: float | None, difference: float,
                        confidence: float = CONFIDENCE) -> Estimate:
    """One seed: b − a with the interval of two independent binomial errors, sqrt(se_a² + se_b²) (the same
    test examples make the two correlated, so this interval is wider than the truth)."""
    if a_se is None or b_se is None:
        return Estimate(difference, None, None, 1, NONE, confidence)
    return binomial(difference, math.hypot(a_se, b_se), confidence)
