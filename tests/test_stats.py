"""Statistics against values worked out by hand (t quantiles from a table)."""

import math

import numpy as np
import pytest

from dlcore import stats as S
from dlcore.stats import Bound

T2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom
T3 = 3.182446305284263  # 3 degrees of freedom


def test_mean_ci_is_the_student_t_interval_and_nan_for_one_value():
    mean, half = S.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(T3 * math.sqrt(5 / 3) / 2)  # sample sd sqrt(5/3), n = 4
    mean, half = S.mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)


def test_paired_diff_pairs_seeds_present_in_both():
    pretrained = {0: 0.80, 1: 0.81, 2: 0.82, 3: 0.99}  # seed 3 has no scratch partner: left out
    scratch = {0: 0.70, 1: 0.72, 2: 0.74}
    d = S.paired_diff(pretrained, scratch)
    assert d.n == 3
    assert d.mean == pytest.approx(0.09)  # differences 0.10, 0.09, 0.08
    assert d.half_width == pytest.approx(T2 * 0.01 / math.sqrt(3))  # sd of the differences 0.01


def test_bounds_format_without_infinity():
    assert S.fmt(Bound(3000, "above")) == "> 3,000"
    assert S.fmt(Bound(100, "below")) == "≤ 100"
    assert S.fmt(Bound(316.2)) == "316"
    assert S.fmt(Bound(3.5, "above"), ".1f", "x") == "> 3.5x"
    assert S.fmt_steps(Bound(4000, "above")) == "not within 4,000 steps"
    assert S.fmt_steps(Bound(90.0)) == "90"
    assert Bound(10, "above").scaled(0.1) == Bound(1.0, "above")
    with pytest.raises(ValueError, match="not one of"):
        Bound(1, "infinite")


def test_labels_to_match_interpolates_in_log_labels_and_censors_both_ends():
    assert S.labels_to_match([100, 1000], [0.7, 0.9], 0.6) == Bound(100, "below")  # there from the smallest budget
    assert S.labels_to_match([100, 1000], [0.7, 0.9], 0.95) == Bound(1000, "above")
    got = S.labels_to_match([10, 100, 1000], [0.5, 0.7, 0.9], 0.8)
    assert got.kind == "exact" and got.value == pytest.approx(100 * math.sqrt(10))  # halfway in log(100)..log(1000)
    got = S.labels_to_match([1000, 100], [0.9, 0.7], 0.75)  # unsorted input; a quarter of the way
    assert got.value == pytest.approx(100 * 10**0.25)


def test_steps_to_target_interpolates_between_bracketing_evaluations():
    assert S.steps_to_target([(0, 0.1), (50, 0.6), (100, 0.85), (150, 0.86)], 0.8).value == pytest.approx(90)
    # the first crossing counts, not a later dip and recovery
    assert S.steps_to_target([(50, 0.5), (100, 0.81), (150, 0.79)], 0.8).value == pytest.approx(50 + 50 * 0.3 / 0.31)
    # with a step-0 evaluation the start brackets it; without one only "by step 50" is known
    assert S.steps_to_target([(0, 0.1), (50, 0.9)], 0.8) == Bound(pytest.approx(43.75))
    assert S.steps_to_target([(50, 0.9), (100, 0.95)], 0.8) == Bound(50, "below")
    assert S.steps_to_target([(0, 0.85), (50, 0.9)], 0.8) == Bound(0)
    assert S.steps_to_target([(50, 0.5), (100, 0.7)], 0.8) == Bound(100, "above")
    assert S.steps_to_target([(50, 0.5), (100, 0.7)], 0.8, budget=120) == Bound(120, "above")


def test_quantile_keeps_the_direction_of_censored_values():
    assert S.quantile([Bound(v) for v in (1, 2, 3, 4)], 0.25) == Bound(np.percentile([1, 2, 3, 4], 25))
    values = [Bound(150), Bound(200, "above"), Bound(100)]
    assert S.median(values) == Bound(150)
    assert S.quantile(values, 0.75) == Bound(175, "above")  # halfway from 150 towards something > 200
    assert S.quantile(values, 1.0) == Bound(200, "above")
    assert S.quantile([Bound(50, "below"), Bound(80)], 0.5) == Bound(65, "below")
    assert S.median([Bound(50, "below"), Bound(200, "above"), Bound(300, "above")]) == Bound(200, "above")


def test_bootstrap_median_steps_with_a_censored_seed():
    # seeds reach the target at 100 and 150 steps; the third not within 200.
    e = S.steps_summary([Bound(100), Bound(150), Bound(200, "above")])
    assert e.point == Bound(150) and e.n == 3
    # the median of 3 draws is 100 when 2 or 3 draws are the first seed: 7/27 of resamples (> 2.5%)
    assert e.lo == Bound(100)
    assert e.hi == Bound(200, "above")  # likewise 7/27 have the censored seed as median
    assert e.censored == pytest.approx(7 / 27, abs=0.015)
    assert S.fmt_estimate(e, S.fmt_steps, S.fmt) == "150 (95% CI 100 to > 200; censored in 26% of resamples)"
    assert S.steps_summary([Bound(100), Bound(150), Bound(200, "above")]) == e  # seeded: the same every time


def test_bootstrap_of_one_seed_has_no_interval():
    e = S.steps_summary([Bound(90)])
    assert e.lo is None and e.hi is None and e.n == 1
    assert S.fmt_estimate(e, S.fmt_steps) == "90"


SCRATCH = np.array([[0.70, 0.88], [0.72, 0.90], [0.74, 0.92]])  # (seeds, budgets 100 and 1000)


def test_label_ratio_bootstraps_over_paired_seeds():
    e = S.label_ratio([100, 1000], SCRATCH, np.array([0.80, 0.81, 0.82]), labels=100)
    # means 0.72 / 0.90 and 0.81: halfway in log labels, sqrt(10) times the labels
    assert e.point.kind == "exact" and e.point.value == pytest.approx(math.sqrt(10))
    # every quantity moves with the mean seed index k: scratch +0.02 k, pretrained +0.01 k, so the
    # fraction of the way is (0.10 - 0.01 k) / 0.18; k = 2 and k = 0 each have 1/27 > 2.5% of resamples
    assert e.lo.value == pytest.approx(10 ** (0.08 / 0.18)) and e.hi.value == pytest.approx(10 ** (0.10 / 0.18))
    assert e.censored == 0


def test_label_ratio_says_when_resamples_are_censored():
    # pretrained minus scratch at 1000 per seed: -0.03, -0.01, +0.05; a resample is censored (scratch
    # never matches it) when the draws' sum is positive: abc, acc, bbc, bcc, ccc = 16/27 of resamples
    e = S.label_ratio([100, 1000], SCRATCH, np.array([0.85, 0.89, 0.97]), labels=100)
    assert e.point == Bound(10.0, "above")
    assert e.censored == pytest.approx(16 / 27, abs=0.015)
    assert e.lo.kind == "exact" and e.lo.value == pytest.approx(10 ** (0.15 / 0.18))  # all draws seed 0
    assert e.hi == Bound(10.0, "above")
    text = S.fmt_estimate(e, lambda b: S.fmt(b, ".1f", "x"))
    assert text == f"> 10.0x (95% CI 6.8x to > 10.0x; censored in {e.censored:.0%} of resamples)"
    assert "inf" not in text and "∞" not in text
