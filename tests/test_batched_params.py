"""A trial's genome is written to the RDB storage in one transaction, with Optuna's checks kept."""

import optuna
import pytest
from optuna.distributions import FloatDistribution

from evomerge.search.batched_params import batched_param_writes

optuna.logging.set_verbosity(optuna.logging.WARNING)
GENOME = {f"g{i}": FloatDistribution(0.0, 1.0) for i in range(50)}


def _suggest_all(trial, genome=GENOME):
    with batched_param_writes(trial):
        for name, distribution in genome.items():
            trial._suggest(name, distribution)


def _rdb_study(tmp_path):
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s",
                               sampler=optuna.samplers.RandomSampler(seed=0))


def test_genome_is_stored_and_reloadable(tmp_path):
    study = _rdb_study(tmp_path)
    for _ in range(3):  # the first trial takes Optuna's per-param check path, later ones the batch
        trial = study.ask()
        _suggest_all(trial)
        study.tell(trial, sum(trial.params.values()))
    reloaded = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert [t.params for t in reloaded.trials] == [t.params for t in study.trials]
    assert all(len(t.params) == len(GENOME) for t in reloaded.trials)


def test_a_failure_while_sampling_writes_nothing(tmp_path):
    study = _rdb_study(tmp_path)
    trial = study.ask()
    with pytest.raises(RuntimeError):
        with batched_param_writes(trial):
            trial._suggest("g0", GENOME["g0"])
            raise RuntimeError("killed mid-genome")
    assert optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}").trials[0].params == {}


def test_incompatible_distribution_is_still_refused(tmp_path):
    study = _rdb_study(tmp_path)
    first = study.ask()
    _suggest_all(first)
    study.tell(first, 0.0)
    second = study.ask()
    with pytest.raises(ValueError):
        _suggest_all(second, {"g0": optuna.distributions.CategoricalDistribution(["a", "b"])})


def test_other_storages_fall_back_to_optuna(tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))  # in-memory storage
    trial = study.ask()
    _suggest_all(trial)
    study.tell(trial, 1.0)
    assert len(study.trials[0].params) == len(GENOME)
