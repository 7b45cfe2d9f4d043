"""Statistics over seeds that a reviewer accepts: Student-t intervals of a mean and of paired
differences, a seeded percentile bootstrap for derived quantities, and censored values.

A seed fixes the label subset, so two arms with the same seed saw the same labelled images: arms
are compared by pairing seeds. Quantities that a sweep only bounds (scratch never reaches the
pretrained accuracy within its largest budget; a run never reaches the target within its steps)
are ``Bound``s, never infinities. Pure functions of numbers; nothing here reads MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

KINDS = ("below", "exact", "above")  # in the order they sort at equal values


@dataclass(frozen=True)
class Bound:
    """A value that may be censored: ``exact``; ``above``: the true value is larger than ``value``
    (not reached within it); ``below``: the true value is at most ``value`` (there at the first look)."""

    value: float
    kind: str = "exact"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Bound kind '{self.kind}' is not one of {list(KINDS)}")

    @property
    def censored(self) -> bool:
        return self.kind != "exact"

    def scaled(self, factor: float) -> Bound:
        """The bound of ``value * factor``, for a positive factor."""
        return Bound(self.value * factor, self.kind)


def _order(b: Bound) -> tuple[float, int]:
    return b.value, KINDS.index(b.kind)


def fmt(b: Bound, spec: str = ",.0f", unit: str = "") -> str:
    """'316', '> 3,000', '≤ 100' (with ``unit`` after the number, e.g. 'x')."""
    text = format(b.value, spec) + unit
    return {"exact": text, "above": f"> {text}", "below": f"≤ {text}"}[b.kind]


def fmt_steps(b: Bound) -> str:
    """Steps to a target: '90', '≤ 50', or 'not within 200 steps'."""
    return f"not within {b.value:,.0f} steps" if b.kind == "above" else fmt(b)


# ---- means and paired differences ---------------------------------------------------------


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t interval; the half-width is nan for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2:
        return float(x.mean()), float("nan")
    half = st.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


@dataclass(frozen=True)
class Paired:
    """Mean of the per-seed differences a - b, the half-width of its 95% Student-t interval, and
    how many seeds were paired."""

    mean: float
    half_width: float
    n: int


def paired_diff(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float]) -> Paired:
    """a - b over the seeds present in both (same seed: same label subset)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    mean, half = mean_ci([a_by_seed[s] - b_by_seed[s] for s in seeds])
    return Paired(mean, half, len(seeds))


# ---- censored quantities ------------------------------------------------------------------


def labels_to_match(xs: Sequence[float], ys: Sequence[float], goal: float) -> Bound:
    """Labels a curve (accuracy ``ys`` at label counts ``xs``) needs to reach ``goal``, interpolated
    linearly in log(labels) between the two budgets that bracket it. ``below`` the smallest budget
    when it is there from the start; ``above`` the largest when it never gets there."""
    pts = sorted(zip(xs, ys))
    if pts[0][1] >= goal:
        return Bound(float(pts[0][0]), "below")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 < goal <= y1:
            f = (goal - y0) / (y1 - y0)
            return Bound(float(math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0)))))
    return Bound(float(pts[-1][0]), "above")


def steps_to_target(curve: Sequence[tuple[int, float]], target: float, budget: int | None = None) -> Bound:
    """Step at which a (step, accuracy) curve first reaches ``target``, interpolated linearly between
    the two evaluations that bracket it. Without a step-0 evaluation a curve already there at its
    first one is known only to be ``below`` that step; one that never gets there is ``above`` its
    step budget (default: its last evaluation)."""
    pts = sorted(curve)
    if not pts:
        raise ValueError("steps_to_target of an empty curve")
    prev = None
    for step, acc in pts:
        if acc >= target:
            if prev is None:
                return Bound(float(step), "exact" if step == 0 else "below")
            s0, a0 = prev
            return Bound(s0 + (target - a0) / (acc - a0) * (step - s0))
        prev = (step, acc)
    return Bound(float(budget if budget is not None else pts[-1][0]), "above")


def quantile(values: Sequence[Bound], q: float) -> Bound:
    """The q-quantile, linear between the two nearest order statistics (numpy's default). Where a
    censored value takes part, the result keeps its direction: interpolating towards a lower bound
    gives a lower bound. Between a ``below`` and an ``above`` nothing is known of the interpolated
    value; the nearer order statistic is returned."""
    b = sorted(values, key=_order)
    pos = q * (len(b) - 1)
    lo, hi, f = b[math.floor(pos)], b[math.ceil(pos)], pos - math.floor(pos)
    kinds = {lo.kind, hi.kind} - {"exact"}
    if len(kinds) == 2:
        return lo if f <= 0.5 else hi
    return Bound(lo.value + f * (hi.value - lo.value), kinds.pop() if kinds else "exact")


def median(values: Sequence[Bound]) -> Bound:
    return quantile(values, 0.5)


# ---- bootstrap over seeds -----------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A derived quantity over seeds: its value on all seeds, the percentile-bootstrap interval
    (None with fewer than 2 seeds) and the share of resamples in which it was censored."""

    point: Bound
    lo: Bound | None
    hi: Bound | None
    censored: float
    n: int


def bootstrap(units: Sequence, statistic: Callable[[list], Bound], resamples: int = 10_000, seed: int = 0,
              level: float = 0.95) -> Estimate:
    """Percentile bootstrap: ``statistic`` of ``resamples`` draws of len(units) units with replacement.

    ``statistic`` must depend on the multiset of units only (a mean, a median): each distinct multiset
    is computed once, which with 3 seeds is 10 values instead of 10,000.
    """
    point = statistic(list(units))
    n = len(units)
    if n < 2:
        return Estimate(point, None, None, float(point.censored), n)
    draws = np.sort(np.random.default_rng(seed).integers(0, n, size=(resamples, n)), axis=1)
    cache: dict[tuple, Bound] = {}
    values = []
    for row in map(tuple, draws.tolist()):
        if row not in cache:
            cache[row] = statistic([units[i] for i in row])
        values.append(cache[row])
    tail = (1 - level) / 2
    return Estimate(point, quantile(values, tail), quantile(values, 1 - tail),
                    sum(v.censored for v in values) / resamples, n)


def label_ratio(budgets: Sequence[int], scratch: np.ndarray, arm: np.ndarray, labels: int, **kw) -> Estimate:
    """Label-efficiency ratio: labels the baseline needs to match the arm's mean accuracy at
    ``labels``, divided by ``labels``; bootstrapped over seeds.

    scratch: (seeds, budgets) test accuracy of the baseline at ``budgets``; arm: (seeds,) test
    accuracy of the arm at ``labels``; row i of both is the same seed.
    """
    rows = np.column_stack([np.asarray(scratch, float), np.asarray(arm, float)])  # (seeds, budgets + 1)

    def ratio(units: list) -> Bound:
        means = np.mean(units, axis=0)
        return labels_to_match(budgets, means[:-1], means[-1]).scaled(1 / labels)

    return bootstrap(list(rows), ratio, **kw)


def steps_summary(per_seed: Sequence[Bound], **kw) -> Estimate:
    """Median over seeds of each seed's steps to a target, bootstrapped over seeds."""
    return bootstrap(list(per_seed), median, **kw)


def fmt_estimate(e: Estimate, one: Callable[[Bound], str], ends: Callable[[Bound], str] | None = None) -> str:
    """'316 (95% CI 278 to > 1,000; censored in 12% of resamples)'; the point alone with one seed."""
    ends = ends or one
    text = one(e.point)
    if e.lo is None:
        return text
    share = "< 1%" if e.censored < 0.01 else f"{e.censored:.0%}"
    note = f"; censored in {share} of resamples" if e.censored else ""
    return f"{text} (95% CI {ends(e.lo)} to {ends(e.hi)}{note})"
