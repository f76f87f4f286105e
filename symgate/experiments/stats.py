r"""Statistics for the reproduction's verdicts: paired bootstrap intervals, effect sizes,
multiple-comparison control and a declared verdict rule.

Every claim of the study compares two arms on the *same seeds* (same data, same
initialisation), so the unit of analysis is the per-seed paired difference
:math:`d_s = a_s - b_s`:

* :func:`paired_ci` -- the median (or mean) of :math:`d` with a BCa bootstrap interval over
  seeds (``scipy.stats.bootstrap``, paired resampling), for differences on any scale (use
  ``log`` for ratios of positive quantities such as anisotropy indices);
* :func:`effect_size` -- the standardised paired effect :math:`d_z = \bar d / s_d` and the
  probability of superiority :math:`P(d_s > 0) + \tfrac12 P(d_s = 0)`;
* :func:`holm` -- Holm's step-down adjustment of a family of p-values (family-wise error rate),
  with :func:`sign_flip_p` the exact (or Monte-Carlo) paired sign-flip test of each comparison;
* :func:`verdict` -- a rule declared before the data: the claim *holds* if the whole interval
  clears the margin in the claimed direction, *fails* if the whole interval lies on the other
  side of zero, and is *inconclusive* otherwise.  The rule can fail, and a null (zero
  difference, or a baseline arm) is what it must beat.
* :func:`learned` -- whether a run beats the predict-the-mean baseline of its task by a
  declared factor.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import ConfigError

__all__ = ["Interval", "paired_ci", "effect_size", "sign_flip_p", "holm", "verdict", "learned"]

#: default confidence level of every interval in the report
LEVEL = 0.95
#: bootstrap resamples (BCa); enough for stable 95 % endpoints at 5-20 seeds
RESAMPLES = 9999


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (``level``) over ``n`` paired seeds."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    method: str

    def excludes(self, value: float = 0.0) -> bool:
        return not (self.low <= value <= self.high)

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


def _paired(a: Sequence[float], b: Sequence[float] | None, scale: str) -> np.ndarray:
    """The per-seed differences on ``scale`` ("linear" or "log"), checked."""
    a_ = np.asarray(a, dtype=float)
    b_ = np.zeros_like(a_) if b is None else np.asarray(b, dtype=float)
    if a_.ndim != 1 or a_.shape != b_.shape:
        raise ConfigError(f"paired samples must be two 1-d sequences of equal length, got shapes {a_.shape} and {b_.shape}")
    if a_.size < 2:
        raise ConfigError(f"a paired comparison needs at least 2 seeds, got {a_.size}")
    if not (np.all(np.isfinite(a_)) and np.all(np.isfinite(b_))):
        raise ConfigError("paired samples contain NaN or infinity")
    if scale == "log":
        if b is None or np.any(a_ <= 0) or np.any(b_ <= 0):
            raise ConfigError("a log-scale comparison needs two samples of positive values")
        return np.log(a_) - np.log(b_)
    if scale != "linear":
        raise ConfigError(f"scale must be 'linear' or 'log', got {scale!r}")
    return a_ - b_


def paired_ci(a: Sequence[float], b: Sequence[float] | None = None, *, scale: str = "linear", statistic: str = "median",
              level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The ``statistic`` ("median" or "mean") of the paired differences ``a - b`` (or of ``a``
    alone) with a bootstrap interval over seeds: BCa, or the percentile method where BCa's
    acceleration is undefined (heavy ties); an interval of zero width when every difference is
    equal (nothing to resample).  ``Interval.method`` says which."""
    d = _paired(a, b, scale)
    fn: Callable[..., Any] = {"median": np.median, "mean": np.mean}.get(statistic)  # type: ignore[assignment]
    if fn is None:
        raise ConfigError(f"statistic must be 'median' or 'mean', got {statistic!r}")
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level!r}")
    est = float(fn(d))
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.max(np.abs(d)))):  # equal up to rounding: no spread to resample
        return Interval(est, est, est, level, d.size, "degenerate (all differences equal)")
    low, high = _bootstrap(d, fn, level, resamples, seed, "BCa")
    method = "BCa bootstrap"
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa's acceleration undefined (e.g. ties): percentile
        low, high = _bootstrap(d, fn, level, resamples, seed, "percentile")
        method = "percentile bootstrap"
    return Interval(est, low, high, level, d.size, method)


def _bootstrap(d: np.ndarray, fn: Callable[..., Any], level: float, resamples: int, seed: int, method: str) -> tuple[float, float]:
    """The interval endpoints (NaN where the method is undefined for these data)."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an undefined BCa acceleration: NaN endpoints, handled above
        warnings.simplefilter("ignore", getattr(stats, "DegenerateDataWarning", RuntimeWarning))
        res = stats.bootstrap((d,), fn, confidence_level=level, n_resamples=resamples, method=method,
                              random_state=np.random.default_rng(seed), vectorized=True, axis=-1)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def effect_size(a: Sequence[float], b: Sequence[float] | None = None, *, scale: str = "linear") -> dict[str, float]:
    r"""Paired effect sizes: :math:`d_z = \bar d/s_d` (inf when every difference is equal and
    nonzero) and the probability of superiority of ``a`` over ``b``."""
    d = _paired(a, b, scale)
    sd = float(np.std(d, ddof=1))
    mean = float(np.mean(d))
    dz = mean / sd if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    sup = float(np.mean(d > 0) + 0.5 * np.mean(d == 0))
    return {"d_z": dz, "superiority": sup, "n": float(d.size)}


def sign_flip_p(a: Sequence[float], b: Sequence[float] | None = None, *, scale: str = "linear",
                alternative: str = "greater", exact_max: int = 16, resamples: int = 20000, seed: int = 0) -> float:
    """The paired sign-flip (permutation) p-value of the mean difference: exact over all
    ``2**n`` sign patterns for ``n <= exact_max`` seeds, Monte-Carlo (with the +1 correction)
    otherwise.  ``alternative``: "greater" (a > b), "less" or "two-sided"."""
    d = _paired(a, b, scale)
    if alternative not in ("greater", "less", "two-sided"):
        raise ConfigError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    observed = float(np.mean(d))
    if d.size <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(resamples, d.size))
    means = signs @ d / d.size
    tol = 1e-12 * max(1.0, abs(observed))
    hits = {"greater": means >= observed - tol, "less": means <= observed + tol,
            "two-sided": np.abs(means) >= abs(observed) - tol}[alternative]
    if d.size <= exact_max:
        return float(np.mean(hits))
    return float((np.sum(hits) + 1) / (resamples + 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): controls the family-wise error rate."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ConfigError("p-values must be a 1-d sequence of numbers in [0, 1]")
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def verdict(ci: Interval, *, direction: str = "greater", margin: float = 0.0) -> str:
    """The declared rule: "holds" if the whole interval clears ``margin`` in ``direction``
    ("greater": low > margin; "less": high < -margin), "fails" if the whole interval lies on the
    other side of zero, "inconclusive" otherwise."""
    if direction not in ("greater", "less"):
        raise ConfigError(f"direction must be 'greater' or 'less', got {direction!r}")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    if direction == "greater":
        return "holds" if ci.low > margin else ("fails" if ci.high < 0 else "inconclusive")
    return "holds" if ci.high < -margin else ("fails" if ci.low > 0 else "inconclusive")


def learned(final_loss: float, baseline_loss: float, *, factor: float = 0.5) -> bool:
    """Whether a run learned its task: its final loss is below ``factor`` times the loss of the
    best constant prediction (the target variance for MSE).  ``factor`` is declared in the report."""
    if not (math.isfinite(final_loss) and math.isfinite(baseline_loss)) or baseline_loss <= 0:
        raise ConfigError(f"losses must be finite and the baseline positive, got {final_loss!r} and {baseline_loss!r}")
    if not 0 < factor <= 1:
        raise ConfigError(f"factor must lie in (0, 1], got {factor!r}")
    return final_loss < factor * baseline_loss
