"""The cell sampler through Ray's OptunaSearch, as the runner uses it."""

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from scipy.stats import qmc

from dlcore.search import STARTUP, SobolThenTPE

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

