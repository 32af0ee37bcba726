"""The study's Optuna storage: opening it, surviving a database restart, and every use of Optuna's private API.

A study lives in an Optuna RDB storage: the run folder's SQLite file, or a
PostgreSQL server shared by workers on several machines. Every call to it is one
transaction, retried with backoff while the database is out of reach
(`with_retries`). Whatever evomerge needs from Optuna beyond its public API (the
storage under a study, a trial's id, stale-trial ids, one-transaction genome
writes, the marker of an enqueued trial) is reached through the functions of
this module only, and `tests/test_storage_api.py` pins each of them, so an Optuna
release that moves one fails one test instead of a search (pyproject bounds the
version to the releases that test passed on).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from optuna.distributions import BaseDistribution, check_distribution_compatibility, distribution_to_json
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge.console import say
from evomerge.errors import EvomergeError
from evomerge.files import machine_error, refusal, unwritable, writing

STUDY_DB = "study.db"
HEARTBEAT_INTERVAL_S = int(os.environ.get("EVOMERGE_HEARTBEAT_S", 60))
HEARTBEAT_GRACE_S = int(os.environ.get("EVOMERGE_HEARTBEAT_GRACE_S", 300))
"""A server database's trials beat every interval; one silent for the grace period is failed (its worker died)."""
DB_RETRY_S = float(os.environ.get("EVOMERGE_DB_RETRY_S", 300))
"""How long a worker retries (with backoff) a database that stopped answering before it gives up."""
SQLITE_TIMEOUT_S = 60
"""How long an SQLite write waits for another process's write to finish (several workers on one folder)."""

#: What a storage says while another worker creates its tables at the same moment.
CREATION_RACE_SIGNS = ("already exists", "unique constraint", "duplicate key", "database is locked")
_SQLITE_BUSY_SIGNS = ("database is locked", "database table is locked", "database is busy")


# -- opening -----------------------------------------------------------------
def storage_url(target: str | os.PathLike) -> str:
    """A run folder becomes ``sqlite:///<folder>/study.db``; a URL (``postgresql://...``) is kept."""
    text = str(target)
    if "://" in text:
        return text
    folder = Path(text)
    database = folder / STUDY_DB
    cause = None if database.exists() else unwritable(folder)
    if cause is not None:  # SQLite would only say "unable to open database file"
        raise machine_error(cause, database)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database.resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage; a server database (workers on several machines) also keeps a heartbeat.

    SQLite is one machine's file, where the pid check of stale trials already
    finds dead workers at once.
    """
    url = _with_driver(url)
    if url.startswith("sqlite:"):
        options = {"engine_kwargs": {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}}
    else:
        options = {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": HEARTBEAT_GRACE_S,
                   "engine_kwargs": {"pool_pre_ping": True}}
    attempts = 5
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RetryingRDBStorage(url, **options)
        except Exception as error:  # bad URL, missing driver, unreachable server, a disk that refuses
            cause = refusal(error)
            if cause is not None:
                raise machine_error(cause, database_name(url)) from error
            text = str(error).lower()
            if attempt < attempts - 1 and any(sign in text for sign in CREATION_RACE_SIGNS):
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the tables right now
                continue
            hint = ("; install the PostgreSQL driver: pip install 'evomerge[postgres]'"
                    if isinstance(error, ImportError) and "postgres" in url else "")
            raise EvomergeError(f"cannot open study storage {hidden_password(url)!r}: {error}{hint}") from None
    raise AssertionError("unreachable")


def _with_driver(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; evomerge's extra installs psycopg 3, so
    the URL names it when psycopg2 is absent (``postgresql+DRIVER://`` URLs are kept)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
                return "postgresql+psycopg://" + url[len(scheme):]
            return "postgresql://" + url[len(scheme):]
    return url


def hidden_password(url: str) -> str:
    """``url`` as it may be shown: any password replaced by ``***``."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: shown as given
        return url


# -- retries -----------------------------------------------------------------
def _driver_errors() -> tuple:
    errors: tuple = (sa_exc.OperationalError, sa_exc.InterfaceError)
    if importlib.util.find_spec("psycopg") is not None:
        import psycopg  # the optional PostgreSQL driver (extra `postgres`)

        errors += (psycopg.OperationalError, psycopg.InterfaceError)
    return errors


def transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the database is out of reach or busy for now:
    a server restarting or a dropped connection, an SQLite file locked by another process.
    Other errors (a missing table, bad data, a finished trial) are raised at once."""
    connection_errors = _driver_errors()
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        text = str(seen).lower()
        if isinstance(seen, sqlite3.Error) or "sqlite" in str(getattr(seen, "statement", "") or "").lower() \
                or "(sqlite3." in text:
            if any(sign in text for sign in _SQLITE_BUSY_SIGNS):
                return True
        elif isinstance(seen, connection_errors):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_gave_up = threading.Event()
"""Set once this process gave up on its database: later calls fail at once instead of waiting again."""


def gave_up() -> bool:
    """Whether this process gave up on its study database (its worker is to stop)."""
    return _gave_up.is_set()


def database_name(url: str) -> str:
    """How errors name a study database: an SQLite file's path, else the URL without its password."""
    url = str(url)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)
    return hidden_password(url)


def with_retries(call: Callable[[], Any], what: str, budget_s: float | None = None, where: str | None = None) -> Any:
    """``call()``, retried with growing pauses (0.5 s doubling to 15 s) while the database is
    unreachable, for at most ``budget_s`` (``EVOMERGE_DB_RETRY_S``, default 300 s); then one
    EvomergeError that says what failed and how to continue. A database that refuses the write
    (its disk full, read-only, no permission) is not retried: one `MachineError` names
    ``where`` (the database) and the cause."""
    budget = DB_RETRY_S if budget_s is None else budget_s
    started, pause, attempts = time.monotonic(), 0.5, 0
    while True:
        attempts += 1
        try:
            result = call()
            if attempts > 1:
                say(f"evomerge: the study database answers again ({what}, after {attempts - 1} retries)")
            _gave_up.clear()
            return result
        except EvomergeError:
            raise
        except Exception as error:
            cause = refusal(error)
            if cause is not None:
                raise machine_error(cause, where or "the study database") from error
            if not transient(error):
                raise
            elapsed = time.monotonic() - started
            text = str(error.__cause__ or error).strip()
            reason = text.splitlines()[0][:300] if text else type(error).__name__
            if _gave_up.is_set() or elapsed >= budget:
                _gave_up.set()
                raise EvomergeError(
                    f"the study database stayed unreachable: {what} failed for {elapsed:.0f} s over {attempts} "
                    f"attempts (retry budget EVOMERGE_DB_RETRY_S={budget:g} s); last error: {reason}. "
                    "The trial this worker ran stays in the study and is failed as stale (heartbeat) once the "
                    "database is back; start the worker again to continue the search") from None
            if attempts == 1:
                say(f"evomerge: the study database does not answer ({what}: {reason}); retrying for up to {budget:g} s")
            time.sleep(max(0.0, min(pause, budget - elapsed)))
            pause = min(pause * 2, 15.0)


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose every call (one transaction each) survives a database restart:
    see `with_retries`. Heartbeat writes are not retried (a missed beat is harmless)."""


def _retrying(name: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return with_retries(lambda: method(self, *args, **kwargs), name.strip("_").replace("_", " "),
                            where=database_name(self.url))
    return call


#: What Optuna's `_CachedStorage` calls on the storage beneath it, besides its public methods.
CACHE_CALLS = {"_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_stale_trial_ids"}
_NOT_RETRIED = {"record_heartbeat", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session",
                "upgrade", "get_current_version", "get_head_version", "get_all_versions"}
for _name, _method in vars(optuna.storages.RDBStorage).items():
    if (callable(_method) and not isinstance(_method, (staticmethod, classmethod)) and _name not in _NOT_RETRIED
            and (not _name.startswith("_") or _name in CACHE_CALLS)):
        setattr(RetryingRDBStorage, _name, _retrying(_name, _method))


# -- what Optuna keeps private -------------------------------------------------
def storage_of(study: Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (Optuna's cache over the RDB storage)."""
    return study._storage


def _backend(study: Study):
    storage = storage_of(study)
    return getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache


def trial_id(trial: Trial | FrozenTrial) -> int:
    """The storage's id of a trial (not its number within the study)."""
    return trial._trial_id


def rdb_engine(study: Study) -> sa.engine.Engine | None:
    """The SQLAlchemy engine under a study's storage (None for a storage that is no database)."""
    return getattr(_backend(study), "engine", None)


def storage_description(study: Study) -> str:
    """The study's storage URL with any password hidden (the storage's type where it has no URL)."""
    url = getattr(_backend(study), "url", None)
    return type(storage_of(study)).__name__ if url is None else hidden_password(str(url))


def stored_trial(study: Study, trial: Trial | FrozenTrial) -> FrozenTrial:
    """The trial as the storage holds it now (another worker may have finished it)."""
    return storage_of(study).get_trial(trial_id(trial))


def set_trial_attr(study: Study, trial_id_: int, key: str, value: Any) -> None:
    """Set a user attr of any trial of the study by its id, not only a trial this process asked."""
    storage_of(study).set_trial_user_attr(trial_id_, key, value)


def fail_trial(study: Study, trial_id_: int, attrs: Mapping[str, Any]) -> bool:
    """Store ``attrs`` on the trial and mark it FAIL; False when another worker finished it first."""
    storage = storage_of(study)
    try:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id_, key, value)
        return bool(storage.set_trial_state_values(trial_id_, TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False  # another worker took, finished or failed it first


def heartbeat_interval(study: Study) -> int | None:
    """The storage's heartbeat interval, or None where it keeps no heartbeat (SQLite)."""
    get_interval = getattr(storage_of(study), "get_heartbeat_interval", None)
    return get_interval() if get_interval is not None else None


def heartbeat_grace(study: Study) -> float | None:
    """How long a trial may miss its heartbeat before Optuna calls it stale."""
    interval = heartbeat_interval(study)
    if not interval:
        return None
    return getattr(_backend(study), "grace_period", None) or 2 * interval


def record_heartbeat(study: Study, trial: Trial) -> None:
    storage_of(study).record_heartbeat(trial_id(trial))


def stale_trial_ids(study: Study) -> list[int]:
    """Ids of RUNNING trials whose heartbeat stopped for the grace period (empty without a heartbeat)."""
    if not heartbeat_interval(study):
        return []
    return list(_backend(study)._get_stale_trial_ids(study._study_id))


def enqueued(trial: FrozenTrial) -> bool:
    """Whether the trial's genome was fixed by ``study.enqueue_trial`` rather than sampled."""
    return "fixed_params" in trial.system_attrs


def planned_genome(trial: FrozenTrial) -> dict[str, float]:
    """The trial's genome, also while it waits in the queue (its params are set only once it runs)."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


def study_id(study: Study) -> int:
    return study._study_id


# -- a genome in one transaction ---------------------------------------------------
class _HeldParamWrites:
    """A storage stand-in for the sampling step: param writes are held, the rest passes through."""

    def __init__(self, storage):
        self._storage = storage
        self.held: list[tuple[str, float, BaseDistribution]] = []

    def set_trial_param(self, trial_id_: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.held.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def suggest_genome(trial: Trial, distributions: Mapping[str, BaseDistribution]) -> None:
    """Sample every gene of ``trial`` (its sampler's values, or the enqueued ones) and commit them
    in one transaction: all of the genome or none of it.

    Optuna stores each suggested parameter with its own commit (about 3 ms of
    SQLAlchemy work each); a per-layer genome has hundreds of genes, so a trial
    would spend over a second on commits. Here ``trial._suggest`` (what
    ``Study.ask(fixed_distributions)`` does) samples as usual while the writes
    are held, then committed together.
    """
    with held_param_writes(trial):
        for name, distribution in distributions.items():
            trial._suggest(name, distribution)


@contextmanager
def held_param_writes(trial: Trial) -> Iterator[None]:
    """Hold the param writes of ``trial._suggest`` calls and commit them in one transaction on exit.

    On an exception nothing is written, so a trial never holds half a genome.
    """
    real = trial.storage
    holder = _HeldParamWrites(real)
    trial.storage = holder
    try:
        yield
    finally:
        trial.storage = real
    write_params(real, trial_id(trial), holder.held)


def _rdb_batch_support(storage):
    """(RDB backend, its scoped-session helper, its ORM models) when a one-transaction write
    is possible, else None (another storage: one commit per parameter)."""
    from optuna.storages._rdb import models  # private: pinned by tests/test_storage_api.py
    from optuna.storages._rdb.storage import _create_scoped_session

    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return None
    return backend, _create_scoped_session, models


def write_params(storage, trial_id_: int, held: list[tuple[str, float, BaseDistribution]]) -> None:
    """Commit one trial's held param writes together (one by one where batching is not available)."""
    if not held:
        return
    support = _rdb_batch_support(storage)
    if support is None:
        for name, value, distribution in held:
            storage.set_trial_param(trial_id_, name, value, distribution)
        return
    backend, scoped_session, models = support
    known = _known_distributions(storage, trial_id_)

    def commit() -> None:
        with scoped_session(backend.scoped_session, True) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id_, session)
            backend.check_trial_is_updatable(trial_id_, trial.state)
            for name, value, distribution in held:
                previous = (known or {}).get(name)
                if previous is None:  # first sight of this param in this process: Optuna's own check
                    backend._set_trial_param_without_commit(session, trial_id_, name, value, distribution)
                    continue
                check_distribution_compatibility(previous, distribution)
                session.add(models.TrialParamModel(trial_id=trial_id_, param_name=name, param_value=value,
                                                   distribution_json=distribution_to_json(distribution)))

    # one transaction: retried whole while the database is away
    with_retries(commit, "writing a trial's genome", where=database_name(backend.url))
    if known is not None:
        with storage._lock:
            for name, _, distribution in held:
                known.setdefault(name, distribution)


def _known_distributions(cached_storage, trial_id_: int) -> dict | None:
    """The `_CachedStorage`'s per-study param distributions (what its own set_trial_param checks against)."""
    if not hasattr(cached_storage, "_trial_id_to_study_id_and_number"):
        return None  # a storage without Optuna's cache
    with cached_storage._lock:
        found = cached_storage._trial_id_to_study_id_and_number.get(trial_id_)
        return None if found is None else cached_storage._studies[found[0]].param_distribution
