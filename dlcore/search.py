"""How a grid cell's hyperparameters are searched, and which values a search picked.

``SobolThenTPE`` is the sampler of every cell's Optuna study. ``keep_best`` and ``picks`` say which
values the search of a first-seed cell picked (``finetune.search_scope: cell``), live in the searcher
and after the fact from Tune's results, by the same rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, QMCSampler, TPESampler

from .tracking import outcome

STARTUP = 4  # samples of a cell drawn from the Sobol sequence before TPE takes over


class SobolThenTPE(BaseSampler):
    """The first ``n_startup`` trials of a study at the points of a scrambled Sobol sequence, the
    rest by TPE fitted to the trials finished by then.

    With few samples a random start leaves gaps and clumps (4 uniform draws fall one in each quarter
    of the range only 9% of the time); the first 2^m Sobol points always do. Optuna's QMCSampler
    learns its search space from the first finished trial, so it draws the first trial, and every
    trial asked while none has finished (under Tune, the whole first wave), at random; given the
    space up front, trial 0 is already Sobol point 0. Categorical keys have no place on the Sobol
    cube: the startup trials draw them at random (seeded).
    """

    def __init__(self, space: dict[str, BaseDistribution], n_startup: int, seed: int):
        self.space = {k: d for k, d in space.items() if not isinstance(d, CategoricalDistribution)}
        self.n_startup = n_startup
        with warnings.catch_warnings():  # QMCSampler is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.qmc = QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)
        # No random start of its own: TPE only ever sees trials after the Sobol ones.
        self.tpe = TPESampler(seed=seed, n_startup_trials=0)

    def _sampler(self, trial: optuna.trial.FrozenTrial) -> BaseSampler:
        return self.qmc if trial.number < self.n_startup else self.tpe

    def infer_relative_search_space(self, study, trial):
        return dict(self.space) if trial.number < self.n_startup else self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.qmc.before_trial(study, trial)
        self.tpe.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.qmc.after_trial(study, trial, state, values)
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.qmc.reseed_rng()
        self.tpe.reseed_rng()


def keep_best(picks: dict, key: str, value: float, values: dict, mode: str) -> None:
    """Keep in ``picks[key]`` the (validation value, searched values) of the best trial seen; of equal
    values the first stays."""
    if key not in picks or (value > picks[key][0] if mode == "max" else value < picks[key][0]):
        picks[key] = (value, values)


def picks(results: Iterable, cells: set[str], keys: Iterable[str], metric: str, mode: str) -> dict[str, tuple[float, dict]]:
    """Cell key -> (best ``best_<metric>``, searched values) of the completed trial each of ``cells``
    selects, from finished Tune results (``tune.Result``: config and last metrics). A cell with no
    completed trial has no entry."""
    out: dict = {}
    for r in results:
        job = (r.config or {}).get("job")
        if job and job["key"] in cells and outcome(r.metrics, errored=r.error is not None) == "completed":
            keep_best(out, job["key"], r.metrics[f"best_{metric}"], {k: job["train"][k] for k in keys}, mode)
    return out
