"""The reproduction's statistics: intervals that cover, tests that reject at their level,
Holm's adjustment and the verdict rule, with expected values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from symgate import ConfigError
from symgate.experiments import stats


def test_paired_ci_covers_the_true_mean_at_about_its_level() -> None:
    # 300 studies of 20 seeds, differences N(1, 1): a 95 % interval for the mean should cover 1
    # in about 95 % of them; BCa at n = 20 under-covers slightly, and 300 studies give a binomial
    # sd of 1.3 %, so [0.89, 0.99] is a 4-sd band around 0.94
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(300):
        d = rng.normal(1.0, 1.0, 20)
        ci = stats.paired_ci(d, statistic="mean", resamples=999, seed=k)
        hits += ci.low <= 1.0 <= ci.high
    assert 0.89 <= hits / 300 <= 0.99, hits


def test_paired_ci_of_pairs_is_the_interval_of_their_differences() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=12), rng.normal(size=12)
    both = stats.paired_ci(a, b, resamples=999)
    diff = stats.paired_ci(a - b, resamples=999)
    assert (both.estimate, both.low, both.high) == pytest.approx((diff.estimate, diff.low, diff.high))
    assert both.estimate == pytest.approx(np.median(a - b)) and both.low <= both.estimate <= both.high


def test_log_scale_compares_ratios() -> None:
    a = np.array([2.0, 4.0, 8.0, 16.0])
    ci = stats.paired_ci(a, a / 2, scale="log")  # every ratio is 2
    assert ci.estimate == pytest.approx(np.log(2)) and ci.low == ci.high and ci.method.startswith("degenerate")


def test_effect_size_by_hand() -> None:
    es = stats.effect_size([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert es["d_z"] == pytest.approx(2.0) and es["superiority"] == 1.0
    es = stats.effect_size([1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0])  # one above, one tie, one below, one above
    assert es["superiority"] == pytest.approx(0.625)


def test_sign_flip_p_exact_values_by_hand() -> None:
    # all differences positive: only the all-plus pattern reaches the observed mean
    assert stats.sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(1 / 8)
    assert stats.sign_flip_p([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1 / 16)
    # [1, -1]: patterns (+,+) 0, (+,-) 1, (-,+) -1, (-,-) 0; observed mean 0: three of four reach it
    assert stats.sign_flip_p([1.0, -1.0]) == pytest.approx(3 / 4)
    assert stats.sign_flip_p([1.0, 2.0, 3.0], alternative="two-sided") == pytest.approx(2 / 8)


def test_sign_flip_rejects_at_its_level_under_the_null() -> None:
    rng = np.random.default_rng(3)
    rejections = sum(stats.sign_flip_p(rng.normal(size=10)) <= 0.05 for _ in range(400))
    assert rejections / 400 <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)  # at most its level (+3 sd)


def test_holm_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, max(1*0.04, 0.06) = 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("low, high, direction, margin, want", [
    (0.1, 0.5, "greater", 0.0, "holds"), (0.1, 0.5, "greater", 0.2, "inconclusive"),
    (-0.5, -0.1, "greater", 0.0, "fails"), (-0.1, 0.5, "greater", 0.0, "inconclusive"),
    (-0.5, -0.1, "less", 0.0, "holds"), (0.1, 0.5, "less", 0.0, "fails"),
])
def test_the_verdict_rule_can_hold_fail_or_be_inconclusive(low: float, high: float, direction: str, margin: float,
                                                           want: str) -> None:
    ci = stats.Interval((low + high) / 2, low, high, 0.95, 10, "given")
    assert stats.verdict(ci, direction=direction, margin=margin) == want


def test_a_model_at_the_mean_baseline_has_not_learned() -> None:
    # the adding task at the paper's settings: final losses ~0.167 against Var(y) = 1/6
    assert not stats.learned(0.1674, 1 / 6)
    assert stats.learned(0.02, 1 / 6)


@pytest.mark.parametrize("call, fragment", [
    (lambda: stats.paired_ci([1.0, 2.0], [1.0]), "equal length"),
    (lambda: stats.paired_ci([1.0]), "at least 2 seeds"),
    (lambda: stats.paired_ci([1.0, np.nan]), "NaN"),
    (lambda: stats.paired_ci([1.0, 2.0], [0.0, 1.0], scale="log"), "positive"),
    (lambda: stats.paired_ci([1.0, 2.0], statistic="mode"), "statistic"),
    (lambda: stats.holm([0.2, 1.5]), "in \\[0, 1\\]"),
    (lambda: stats.learned(0.1, 0.0), "baseline positive"),
    (lambda: stats.verdict(stats.Interval(0, 0, 0, 0.95, 2, "x"), direction="up"), "direction"),
])
def test_bad_statistics_input_is_a_config_error(call: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call()  # type: ignore[operator]
