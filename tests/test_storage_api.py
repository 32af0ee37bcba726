"""The study's storage: every piece of Optuna's private API evomerge uses is pinned here, and a trial's
genome is written to the RDB storage in one transaction, with Optuna's checks kept."""

import re
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from packaging.version import Version

from evomerge.search import storage
from evomerge.search.storage import held_param_writes

optuna.logging.set_verbosity(optuna.logging.WARNING)
GENOME = {f"g{i}": FloatDistribution(0.0, 1.0) for i in range(50)}


def _suggest_all(trial, genome=GENOME):
    storage.suggest_genome(trial, genome)


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
        with held_param_writes(trial):
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


def test_optunas_private_api_is_where_evomerge_expects_it(tmp_path):
    """What `evomerge.search.storage` reaches beyond Optuna's public API: an Optuna release that moves
    any of it fails here, not in a user's search (pyproject bounds the version to releases that pass)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rdb = optuna.storages.RDBStorage
    for name in ("_set_trial_param_without_commit", "check_trial_is_updatable", "_get_stale_trial_ids",
                 *storage.CACHE_CALLS):
        assert callable(getattr(rdb, name, None)), f"optuna.storages.RDBStorage.{name} is gone"
    assert callable(_create_scoped_session)
    assert hasattr(models.TrialModel, "find_or_raise_by_id") and hasattr(models, "TrialParamModel")
    assert callable(getattr(optuna.trial.Trial, "_suggest", None))
    assert "x0" in __import__("inspect").signature(optuna.samplers.CmaEsSampler).parameters  # optimizer.init

    study = optuna.create_study(storage=storage.open_storage(f"sqlite:///{tmp_path / 's.db'}"), study_name="s")
    cached = storage.storage_of(study)
    assert isinstance(getattr(cached, "_backend", None), rdb)            # Optuna's cache over the RDB storage
    assert hasattr(cached, "_lock") and hasattr(cached, "_studies")
    study.enqueue_trial({"g0": 0.5})
    trial = study.ask()
    assert storage.trial_id(trial) == study.trials[0]._trial_id
    storage.suggest_genome(trial, {"g0": GENOME["g0"]})
    assert cached._trial_id_to_study_id_and_number[storage.trial_id(trial)][0] == storage.study_id(study)
    assert "g0" in cached._studies[storage.study_id(study)].param_distribution
    assert storage.enqueued(study.trials[0])                              # the "fixed_params" system attr
    assert storage.stale_trial_ids(study) == [] and storage.heartbeat_interval(study) is None
    assert storage.rdb_engine(study) is not None
    assert storage.storage_description(study).endswith("s.db")


def test_pyproject_bounds_optuna_to_the_tested_releases():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (spec,) = [d for d in pyproject["project"]["dependencies"] if re.match(r"optuna\b", d)]
    upper = re.search(r"<\s*([0-9.]+)", spec)
    assert upper, f"{spec}: the private API pinned above needs an upper bound"
    assert Version(optuna.__version__) < Version(upper.group(1))
