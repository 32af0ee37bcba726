"""A study: created once, continued by every later start, by any worker, only with the config it began with.

The Optuna storage is the single source of truth of a search: every trial stores
its genome (params with float distributions), its fitness values and its record
(`evomerge.search.records`); the study's user attrs hold the search config, so a
resume can check that nothing but the budget changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.study import Study
from optuna.trial import TrialState

from evomerge.errors import EvomergeError
from evomerge.search.records import StudyKey, TrialKey, genome_key, jsonable
from evomerge.search.storage import fail_trial, open_storage, planned_genome, storage_url, trial_id
from evomerge.search.workers import fail_stale_trials

#: Config keys that may change on resume (the budget may grow).
RESUMABLE_KEYS = ("n_trials", "budget")
VALID_DIRECTIONS = ("maximize", "minimize")


def validate_directions(directions: Sequence[str] | str) -> list[str]:
    """Normalise directions to a list of ``"maximize"``/``"minimize"``."""
    if isinstance(directions, str):
        directions = [directions]
    result = [str(d).lower() for d in directions]
    if not result or any(d not in VALID_DIRECTIONS for d in result):
        raise EvomergeError(
            f"objective directions must be a non-empty list of {VALID_DIRECTIONS}, got {list(directions)!r}"
        )
    return result


def study_directions(study: Study) -> list[str]:
    return [d.name.lower() for d in study.directions]


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): config}


def config_differences(stored: Mapping, new: Mapping, ignore: Sequence[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ, ignoring top-level keys in ``ignore``."""
    a = _flatten({k: v for k, v in stored.items() if k not in ignore})
    b = _flatten({k: v for k, v in jsonable(new).items() if k not in ignore})
    return sorted(key for key in a.keys() | b.keys() if a.get(key, "<absent>") != b.get(key, "<absent>"))


def open_study(
    target: str | os.PathLike,
    name: str,
    directions: Sequence[str] | str,
    config: Mapping[str, Any],
) -> Study:
    """Create the study ``name``, or continue it.

    ``target`` is a run folder (SQLite ``study.db`` inside) or an Optuna RDB
    URL shared by several workers. ``config`` must be JSON-like. A study that
    holds results (a COMPLETE trial, or one a live worker is running) must have
    been created with the same directions and config, except for the keys in
    ``RESUMABLE_KEYS`` (the budget may grow). A study holding no result yet
    (a first start that failed or was killed before any trial completed) takes
    the new config: trials enqueued under the old one are failed, and the study
    is re-created when the directions differ.
    Workers racing to create the study end with one. Stale trials of dead
    workers of this host are failed here.
    """
    dirs = validate_directions(directions)
    config = jsonable(dict(config))
    url = storage_url(target)
    storage = open_storage(url)
    study = _create_or_load(storage, name, dirs)
    fail_stale_trials(study)
    stored_dirs = study_directions(study)
    stored = study.user_attrs.get(StudyKey.CONFIG)
    if stored_dirs == dirs and stored == config:
        return study
    if not holds_results(study):
        if stored_dirs != dirs:  # Optuna fixes directions at creation
            optuna.delete_study(study_name=name, storage=storage)
            study = _create_or_load(storage, name, dirs)
        elif stored is not None and config_differences(stored, config):
            fail_waiting_trials(study, "enqueued under an earlier config of this study")
        study.set_user_attr(StudyKey.CONFIG, config)
        return study
    if stored_dirs != dirs:
        raise EvomergeError(f"study {name!r} in {url} was created with directions {stored_dirs}, not {dirs}")
    changed = config_differences(stored or {}, config)
    if changed:
        raise EvomergeError(
            f"study {name!r} in {url} holds trials of a different config (changed: {', '.join(changed)}); "
            "only the trial budget may change once a trial is complete: start a new study (another name) instead"
        )
    study.set_user_attr(StudyKey.CONFIG, config)  # record the new budget
    return study


def load_study(target: str | os.PathLike, name: str) -> Study:
    """An existing study, to read it (no config check, nothing enqueued, nothing written)."""
    url = storage_url(target)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise EvomergeError(f"no study {name!r} in {url} yet; start it with `evomerge search`") from None


def _create_or_load(storage: optuna.storages.BaseStorage, name: str, directions: list[str]) -> Study:
    """The study ``name``, created when missing; of two workers creating it at once, one wins."""
    try:
        return optuna.create_study(storage=storage, study_name=name, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage)


def fail_waiting_trials(study: Study, reason: str) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fail_trial(study, trial_id(trial), {TrialKey.ERROR: reason})


def holds_results(study: Study) -> bool:
    """Whether the study has a COMPLETE trial, or a RUNNING one (a live worker's: call after
    ``fail_stale_trials``). Enqueued and failed trials are not results."""
    states = (TrialState.COMPLETE, TrialState.RUNNING)
    return bool(study.get_trials(deepcopy=False, states=states))


def enqueue_first(study: Study, trials: Sequence[tuple[Mapping[str, float], Mapping[str, Any]]]) -> bool:
    """Enqueue ``(genome, user_attrs)`` pairs as the first trials, unless the study already holds
    trials to run or results (a restart after a kill during calibration keeps its enqueued ones)."""
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)):
        return False
    for genome, user_attrs in trials:
        study.enqueue_trial(dict(genome), user_attrs=dict(user_attrs))
    return True


def enqueue_missing(study: Study, trials: Sequence[tuple[Mapping[str, float], Mapping[str, Any]]]) -> int:
    """Enqueue each ``(genome, user_attrs)`` no trial of the study has yet (waiting, running or complete);
    returns how many were enqueued (a genome learned after the search began joins it this way)."""
    have = {genome_key(planned_genome(t)) for t in study.get_trials(
        deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))}
    count = 0
    for genome, user_attrs in trials:
        if genome_key(genome) not in have:
            study.enqueue_trial(dict(genome), user_attrs=dict(user_attrs))
            have.add(genome_key(genome))
            count += 1
    return count
