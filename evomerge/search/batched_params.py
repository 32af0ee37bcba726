"""Write a new trial's whole genome to an Optuna RDB storage in one transaction.

Optuna stores each suggested parameter with its own commit (about 3 ms of
SQLAlchemy work each). A per-layer genome has hundreds of genes, so a trial
would spend over a second on commits. Inside `batched_param_writes(trial)`,
`trial._suggest` still samples every gene as usual, but the writes are held
and committed together at the end: all of the genome or none of it.

The batch uses Optuna's RDB internals (`_create_scoped_session`, its ORM
models, `_set_trial_param_without_commit`) and checks each param against the
distribution seen before, as Optuna does. With any other storage, or an Optuna version
without them, it falls back to Optuna's one-commit-per-parameter path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from optuna.distributions import BaseDistribution, check_distribution_compatibility, distribution_to_json
from optuna.trial import Trial


class _HeldParamWrites:
    """A storage stand-in for the sampling step: param writes are held, the rest passes through."""

    def __init__(self, storage):
        self._storage = storage
        self.held: list[tuple[str, float, BaseDistribution]] = []

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.held.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def _rdb_batch_support(storage):
    """(RDB backend, its scoped-session helper, its ORM models) when a one-transaction write
    is possible, else None."""
    try:
        from optuna.storages import RDBStorage
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:  # pragma: no cover - other Optuna layouts
        return None
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, RDBStorage) or not hasattr(backend, "_set_trial_param_without_commit"):
        return None
    return backend, _create_scoped_session, models


def write_params(storage, trial_id: int, held: list[tuple[str, float, BaseDistribution]]) -> None:
    """Commit one trial's held param writes together (one by one where batching is not available)."""
    if not held:
        return
    support = _rdb_batch_support(storage)
    if support is None:
        for name, value, distribution in held:
            storage.set_trial_param(trial_id, name, value, distribution)
        return
    backend, scoped_session, models = support
    known = _known_distributions(storage, trial_id)

    def commit() -> None:
        with scoped_session(backend.scoped_session, True) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            backend.check_trial_is_updatable(trial_id, trial.state)
            for name, value, distribution in held:
                previous = (known or {}).get(name)
                if previous is None:  # first sight of this param in this process: Optuna's own check
                    backend._set_trial_param_without_commit(session, trial_id, name, value, distribution)
                    continue
                check_distribution_compatibility(previous, distribution)
                session.add(models.TrialParamModel(trial_id=trial_id, param_name=name, param_value=value,
                                                   distribution_json=distribution_to_json(distribution)))

    from evomerge.search.study import with_retries

    with_retries(commit, "writing a trial's genome")  # one transaction: retried whole while the database is away
    if known is not None:
        with storage._lock:
            for name, _, distribution in held:
                known.setdefault(name, distribution)


def _known_distributions(cached_storage, trial_id: int) -> dict | None:
    """The `_CachedStorage`'s per-study param distributions (what its own set_trial_param checks against)."""
    try:
        with cached_storage._lock:
            study_id, _ = cached_storage._trial_id_to_study_id_and_number[trial_id]
            return cached_storage._studies[study_id].param_distribution
    except (AttributeError, KeyError):
        return None


@contextmanager
def batched_param_writes(trial: Trial) -> Iterator[None]:
    """Hold the param writes of `trial._suggest` calls and commit them in one transaction on exit.

    On an exception nothing is written, so a trial never holds half a genome.
    """
    real = trial.storage
    holder = _HeldParamWrites(real)
    trial.storage = holder
    try:
        yield
    finally:
        trial.storage = real
    write_params(real, trial._trial_id, holder.held)
