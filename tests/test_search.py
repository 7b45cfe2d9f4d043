"""The cell sampler through Ray's OptunaSearch, as the runner uses it, and the picks of a search."""

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray import tune
from ray.tune import Result
from ray.tune.search.optuna import OptunaSearch
from scipy.stats import qmc

from dlcore.search import STARTUP, SobolThenTPE, picks

LOW, HIGH = 1e-5, 1e-1
SPACE = {"lr": tune.loguniform(LOW, HIGH)}


def searcher(seed: int) -> OptunaSearch:
    space = OptunaSearch.convert_search_space(SPACE)
    return OptunaSearch(space, metric="val_acc", mode="max", sampler=SobolThenTPE(space, STARTUP, seed))


def log_position(lr: float) -> float:
    """Where lr lies in the log range, in [0, 1)."""
    return (math.log(lr) - math.log(LOW)) / (math.log(HIGH) - math.log(LOW))


@pytest.mark.parametrize("seed", range(10))
def test_first_samples_are_scrambled_sobol_points_one_per_quarter(seed):
    s = searcher(seed)
    # All asked before any finished, as Tune asks a first wave: QMCSampler on its own would draw these at random.
    lrs = [s.suggest(f"t{i}")["lr"] for i in range(STARTUP)]
    sobol = qmc.Sobol(1, scramble=True, seed=seed).random(STARTUP)[:, 0]
    assert [log_position(lr) for lr in lrs] == pytest.approx(list(sobol), abs=1e-9)
    # space-filling: 4 uniform draws land one per quarter only 4!/4^4 = 9% of the time; these always do
    assert sorted(int(4 * log_position(lr)) for lr in lrs) == [0, 1, 2, 3]
    again = searcher(seed)
    assert [again.suggest(f"t{i}")["lr"] for i in range(STARTUP)] == lrs  # the seed fixes them


def test_after_the_startup_samples_tpe_proposes_from_the_finished_trials():
    seed = 3
    s = searcher(seed)
    told = []
    for i in range(STARTUP):
        lr = s.suggest(f"t{i}")["lr"]
        value = 1 - abs(math.log10(lr) + 3)  # best at lr = 1e-3
        s.on_trial_complete(f"t{i}", {"val_acc": value})
        told.append((lr, value))
    nxt = s.suggest("next")["lr"]

    # what Optuna's own TPE proposes after the same finished trials
    dist = FloatDistribution(LOW, HIGH, log=True)
    ref = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=0))
    for lr, value in told:
        ref.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions={"lr": dist}, value=value))
    assert nxt == ref.ask({"lr": dist}).params["lr"]
    fifth = qmc.Sobol(1, scramble=True, seed=seed).random(2 * STARTUP)[STARTUP, 0]
    assert log_position(nxt) != pytest.approx(fifth)  # not the Sobol sequence any more


def result(key: str, lr: float, best: float | None, test: bool = True, error: bool = False) -> Result:
    """A finished trial as Tune's ResultGrid holds it: config and last metrics."""
    metrics = {"config": {"job": {"key": key, "train": {"lr": lr, "steps": 20}}}, "done": True}
    if best is not None:
        metrics["best_val_acc"] = best
    if test:
        metrics.update(test_loss=1.0, test_acc=0.5)
    return Result(metrics=metrics, checkpoint=None, error=RuntimeError("x") if error else None, path="")


def test_picks_are_the_completed_trial_with_the_best_validation_value():
    results = [
        result("a/seed=0", 1e-3, 0.80),
        result("a/seed=0", 2e-3, 0.90),
        result("a/seed=0", 3e-3, 0.95, test=False),  # stopped early: never picked
        result("a/seed=0", 4e-3, 0.99, error=True),  # failed
        result("a/seed=0", 5e-3, 0.90),  # ties the best: the first stays
        result("b/seed=0", 1e-4, None, test=False, error=True),
        result("a/seed=1", 9e-3, 0.99),  # a follow-up: not a cell that searched
        Result(metrics={}, checkpoint=None, error=RuntimeError("before any report"), path=""),
    ]
    assert picks(results, {"a/seed=0", "b/seed=0"}, ["lr"], "val_acc", "max") == {"a/seed=0": (0.90, {"lr": 2e-3})}
    assert picks(results, {"a/seed=0"}, ["lr"], "val_acc", "min") == {"a/seed=0": (0.80, {"lr": 1e-3})}
