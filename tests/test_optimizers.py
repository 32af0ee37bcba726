"""Every optimizer family finds the top of a toy quadratic through the one ask/tell interface."""

import math

import numpy as np
import optuna
import pytest

from evomerge.errors import EvomergeError
from evomerge.search.optimizers import available_optimizers, make_optimizer
from evomerge.search.driver import SearchDriver
from evomerge.search.records import best_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"attn_0": (0.0, 1.0), "mlp_0": (-1.0, 1.0), "density": (0.1, 0.9)}
TARGET = {"attn_0": 0.7, "mlp_0": -0.25, "density": 0.4}


def distance2(params):
    return sum((params[k] - TARGET[k]) ** 2 for k in SPACE)


def run(name, directions, objective, n_trials=40, seed=3, options=None):
    study = optuna.create_study(directions=directions)
    optimizer = make_optimizer(name, SPACE, directions, seed=seed, budget=n_trials, options=options)
    SearchDriver(study, optimizer, progress=False).run(objective, n_trials)
    return study


# A random search with 40 trials reaches about -0.03 here; all of these should at least match it.
@pytest.mark.parametrize("name", ["cmaes", "tpe", "nsga2", "random", "ng_cma", "ng_ngopt", "ng_de", "ng_OnePlusOne"])
def test_each_optimizer_maximises_a_quadratic(name):
    if name == "cmaes":
        pytest.importorskip("cmaes")
    options = {"population_size": 8} if name == "nsga2" else None
    study = run(name, ["maximize"], lambda p: ([-distance2(p)], {}), options=options)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 40
    assert study.best_value > -0.08
    for trial in trials:  # every genome stays inside its bounds
        assert all(SPACE[k][0] <= v <= SPACE[k][1] for k, v in trial.params.items())


@pytest.mark.parametrize("name", ["tpe", "ng_cma"])
def test_minimise_direction(name):
    study = run(name, ["minimize"], lambda p: ([distance2(p)], {}))
    assert study.best_value < 0.08
    assert best_trials(study)[0].value == min(t.value for t in study.trials)


@pytest.mark.parametrize("name", ["nsga2", "tpe", "ng_de"])
def test_multi_objective_pareto_front(name):
    options = {"population_size": 10} if name == "nsga2" else None

    def two_tasks(params):  # the tasks pull attn_0 opposite ways: a real trade-off
        return [1 - (params["attn_0"] - 0.1) ** 2, 1 - (params["attn_0"] - 0.9) ** 2], {}

    study = run(name, ["maximize", "maximize"], two_tasks, n_trials=40, options=options)
    front = best_trials(study)
    assert len(front) >= 3
    values = [t.values for t in front]
    for a in values:  # nobody on the front is dominated
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in values)
    # the front spans the trade-off between the two task optima
    xs = sorted(t.params["attn_0"] for t in front)
    assert xs[0] < 0.4 and xs[-1] > 0.6


def test_nevergrad_rebuilt_from_storage_continues_the_same_sequence():
    first = optuna.create_study(direction="maximize")
    original = make_optimizer("ng_cma", SPACE, ["maximize"], seed=11, budget=30)
    SearchDriver(first, original, progress=False).run(lambda p: ([-distance2(p)], {}), 12)
    next_trial = original.ask()  # what the uninterrupted optimizer proposes next

    copy = optuna.create_study(direction="maximize")
    copy.add_trials(first.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    rebuilt = make_optimizer("ng_cma", SPACE, ["maximize"], seed=11, budget=30)
    rebuilt.bind(copy)
    resumed_trial = rebuilt.ask()
    assert resumed_trial.params == pytest.approx(next_trial.params, abs=1e-9)
    stored = [t.params for t in copy.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len(stored) == 12
    assert all(resumed_trial.params != genome for genome in stored)


def test_nevergrad_takes_enqueued_genome_first():
    study = optuna.create_study(direction="maximize")
    seed_genome = {"attn_0": 0.5, "mlp_0": 0.0, "density": 0.5}
    study.enqueue_trial(seed_genome)
    SearchDriver(study, make_optimizer("ng_de", SPACE, "maximize", seed=1), progress=False).run(
        lambda p: ([-distance2(p)], {}), 5
    )
    assert study.trials[0].params == seed_genome
    assert len({tuple(t.params.values()) for t in study.trials}) == 5


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(EvomergeError) as error:
        make_optimizer("sgd", SPACE, ["maximize"])
    for name in available_optimizers():
        assert name in str(error.value)
    with pytest.raises(EvomergeError, match="unknown optimizer"):
        make_optimizer("ng_NoSuchOptimizer", SPACE, ["maximize"])


def test_single_objective_optimizer_refuses_several_objectives():
    with pytest.raises(EvomergeError, match="one objective only.*nsga2"):
        make_optimizer("cmaes", SPACE, ["maximize", "maximize"])


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "non-empty"),
        ({"w": (1.0, 0.0)}, "'w'.*low < high"),
        ({"w": (0.5, 0.5)}, "'w'.*low < high"),
        ({"w": (0.0, math.inf)}, "'w'.*finite"),
        ({"w": ("a", 1.0)}, "'w'.*two numbers"),
        ({"w": (0.0, 1.0, 2.0)}, "'w'.*two numbers"),
    ],
)
def test_bad_bounds_are_explained(space, message):
    with pytest.raises(EvomergeError, match=message):
        make_optimizer("tpe", space, ["maximize"])


def test_bad_direction_and_mismatched_study():
    with pytest.raises(EvomergeError, match="directions"):
        make_optimizer("tpe", SPACE, ["up"])
    optimizer = make_optimizer("tpe", SPACE, ["maximize"])
    with pytest.raises(EvomergeError, match="differ"):
        optimizer.bind(optuna.create_study(direction="minimize"))


def test_bad_options_are_explained():
    with pytest.raises(EvomergeError, match="bad options"):
        make_optimizer("tpe", SPACE, ["maximize"], options={"no_such_option": 1}).bind(
            optuna.create_study(direction="maximize")
        )


def test_numpy_bounds_accepted():
    optimizer = make_optimizer("random", {"w": (np.float32(0), np.int64(2))}, "maximize")
    assert optimizer.genome_space == {"w": (0.0, 2.0)}


def test_nevergrad_keeps_its_first_budget_on_resume():
    study = optuna.create_study(direction="maximize")
    SearchDriver(study, make_optimizer("ng_ngopt", SPACE, "maximize", seed=2, budget=10), progress=False).run(
        lambda p: ([-distance2(p)], {}), 6
    )
    resumed = make_optimizer("ng_ngopt", SPACE, "maximize", seed=2, budget=100)
    resumed.bind(study)
    assert resumed.budget == 10
