"""Studies: the Optuna storage is the single source of truth of a search.

Every trial stores its genome (params with float distributions), its fitness
values and whatever user attrs the objective returns; the study's user attrs
hold the search config, so a resume can check that nothing but the budget
changed. The budget counts COMPLETE trials, so a resumed or restarted search
continues exactly to it. Trials left RUNNING by a dead worker of this host are
failed on start (the worker's host, pid and process start time are stored on
each trial); on shared RDB servers a heartbeat also lets Optuna fail the
trials of workers that died on other machines.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge.errors import EvomergeError
from evomerge.search.optimizers import SearchOptimizer, validate_directions

STUDY_DB = "study.db"
CONFIG_ATTR = "evomerge_config"
WORKER_ATTR = "worker"
ERROR_ATTR = "error"
WALL_TIME_ATTR = "wall_time_s"
DUPLICATE_ATTR = "duplicate_of"
"""On a trial whose genome an earlier COMPLETE trial already had: that trial's number (its result is reused)."""
_OWN_ATTRS = (WORKER_ATTR, ERROR_ATTR, WALL_TIME_ATTR, DUPLICATE_ATTR)
#: Config keys that may change on resume (the budget may grow).
RESUMABLE_KEYS = ("n_trials", "budget")
HEARTBEAT_INTERVAL_S = int(os.environ.get("EVOMERGE_HEARTBEAT_S", 60))
HEARTBEAT_GRACE_S = int(os.environ.get("EVOMERGE_HEARTBEAT_GRACE_S", 300))
"""A server database's trials beat every interval; one silent for the grace period is failed (its worker died)."""
DB_RETRY_S = float(os.environ.get("EVOMERGE_DB_RETRY_S", 300))
"""How long a worker retries (with backoff) a database that stopped answering before it gives up."""
SQLITE_TIMEOUT_S = 60
"""How long an SQLite write waits for another process's write to finish (several workers on one folder)."""
STALE_CHECK_S = 1.0
UNNAMED_GRACE_S = 60
"""A RUNNING trial still naming no worker this long after its start was orphaned between
its creation and the (immediately following) write of its worker: fail it."""

ObjectiveFn = Callable[[dict[str, float]], tuple[Sequence[float], Mapping[str, Any]]]


# -- storage -----------------------------------------------------------------
def storage_url(target: str | os.PathLike) -> str:
    """A run folder becomes ``sqlite:///<folder>/study.db``; a URL (``postgresql://...``) is kept."""
    text = str(target)
    if "://" in text:
        return text
    folder = Path(text)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / STUDY_DB).resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage; a server database (workers on several machines) also keeps a heartbeat.

    SQLite is one machine's file, where the pid check of ``fail_stale_trials``
    already finds dead workers at once.
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
        except Exception as error:  # bad URL, missing driver, unreachable server
            text = str(error).lower()
            if attempt < attempts - 1 and any(sign in text for sign in _CREATION_RACE_SIGNS):
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the tables right now
                continue
            hint = ("; install the PostgreSQL driver: pip install 'evomerge[postgres]'"
                    if isinstance(error, ImportError) and "postgres" in url else "")
            raise EvomergeError(f"cannot open study storage {_hidden_password(url)!r}: {error}{hint}") from None
    raise AssertionError("unreachable")


def _with_driver(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; evomerge's extra installs psycopg 3, so
    the URL names it when psycopg2 is absent (``postgresql+DRIVER://`` URLs are kept)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            import importlib.util

            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
                return "postgresql+psycopg://" + url[len(scheme):]
            return "postgresql://" + url[len(scheme):]
    return url


def _hidden_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


#: What a storage says while another worker creates its tables at the same moment.
_CREATION_RACE_SIGNS = ("already exists", "unique constraint", "duplicate key", "database is locked")
_SQLITE_BUSY_SIGNS = ("database is locked", "database table is locked", "database is busy")


def _transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the database is out of reach or busy for now:
    a server restarting or a dropped connection, an SQLite file locked by another process.
    Other errors (a missing table, bad data, a finished trial) are raised at once."""
    import sqlite3

    import sqlalchemy.exc as sa_exc

    connection_errors: tuple = (sa_exc.OperationalError, sa_exc.InterfaceError)
    try:
        import psycopg

        connection_errors += (psycopg.OperationalError, psycopg.InterfaceError)
    except ImportError:
        pass
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


def with_retries(call: Callable[[], Any], what: str, budget_s: float | None = None) -> Any:
    """``call()``, retried with growing pauses (0.5 s doubling to 15 s) while the database is
    unreachable, for at most ``budget_s`` (``EVOMERGE_DB_RETRY_S``, default 300 s); then one
    EvomergeError that says what failed and how to continue."""
    from evomerge.console import say

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
        except Exception as error:
            if not _transient(error):
                raise
            elapsed = time.monotonic() - started
            reason = str(error.__cause__ or error).strip().splitlines()[0][:300] if str(error.__cause__ or error).strip() else type(error).__name__
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
    import functools

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return with_retries(lambda: method(self, *args, **kwargs), name.strip("_").replace("_", " "))
    return call


#: What Optuna's `_CachedStorage` calls on the storage beneath it, besides its public methods.
_CACHE_CALLS = {"_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_stale_trial_ids"}
_NOT_RETRIED = {"record_heartbeat", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session",
                "upgrade", "get_current_version", "get_head_version", "get_all_versions"}
for _name, _method in vars(optuna.storages.RDBStorage).items():
    if (callable(_method) and not isinstance(_method, (staticmethod, classmethod)) and _name not in _NOT_RETRIED
            and (not _name.startswith("_") or _name in _CACHE_CALLS)):
        setattr(RetryingRDBStorage, _name, _retrying(_name, _method))



# -- config ------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Turn numpy scalars/arrays, tuples and paths into JSON types (Optuna stores attrs as JSON)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise EvomergeError(f"cannot store {type(value).__name__} value {value!r} in the study (not JSON)")


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
    b = _flatten({k: v for k, v in _jsonable(new).items() if k not in ignore})
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
    config = _jsonable(dict(config))
    url = storage_url(target)
    storage = open_storage(url)
    study = _create_or_load(storage, name, dirs)
    fail_stale_trials(study)
    stored_dirs = validate_directions([d.name.lower() for d in study.directions])
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored_dirs == dirs and stored == config:
        return study
    if not holds_results(study):
        if stored_dirs != dirs:  # Optuna fixes directions at creation
            optuna.delete_study(study_name=name, storage=storage)
            study = _create_or_load(storage, name, dirs)
        elif stored is not None and config_differences(stored, config):
            _fail_waiting_trials(study, "enqueued under an earlier config of this study")
        study.set_user_attr(CONFIG_ATTR, config)
        return study
    if stored_dirs != dirs:
        raise EvomergeError(f"study {name!r} in {url} was created with directions {stored_dirs}, not {dirs}")
    changed = config_differences(stored or {}, config)
    if changed:
        raise EvomergeError(
            f"study {name!r} in {url} holds trials of a different config (changed: {', '.join(changed)}); "
            "only the trial budget may change once a trial is complete: start a new study (another name) instead"
        )
    study.set_user_attr(CONFIG_ATTR, config)  # record the new budget
    return study


def _create_or_load(storage: optuna.storages.BaseStorage, name: str, directions: list[str]) -> Study:
    """The study ``name``, created when missing; of two workers creating it at once, one wins."""
    try:
        return optuna.create_study(storage=storage, study_name=name, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage)


def _fail_waiting_trials(study: Study, reason: str) -> None:
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, reason)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass  # another worker took or failed it first


def holds_results(study: Study) -> bool:
    """Whether the study has a COMPLETE trial, or a RUNNING one (a live worker's: call after
    ``fail_stale_trials``). Enqueued and failed trials are not results."""
    states = (TrialState.COMPLETE, TrialState.RUNNING)
    return bool(study.get_trials(deepcopy=False, states=states))


# -- workers and stale trials ------------------------------------------------
def _process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` (Linux), so a recycled pid is not taken for the dead worker."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def worker_host() -> str:
    """This machine's name as workers record it (``EVOMERGE_WORKER_HOST`` overrides the hostname:
    containers on several machines that share one hostname must each set a distinct one)."""
    return os.environ.get("EVOMERGE_WORKER_HOST") or socket.gethostname()


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": worker_host(), "pid": pid, "start": _process_start_ticks(pid)}



def _is_alive(worker: Mapping[str, Any]) -> bool:
    pid = int(worker.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    start = worker.get("start")
    return start is None or _process_start_ticks(pid) in (None, start)


def fail_stale_trials(study: Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is dead; return their numbers.

    Same host: the worker's pid is checked at once. Other hosts: Optuna's
    heartbeat (RDB storage) fails them once they miss it for the grace period.
    """
    host = worker_host()
    storage = study._storage
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if isinstance(worker, Mapping):
            if worker.get("host") != host or _is_alive(worker):
                continue
            reason = f"stale: worker pid {worker.get('pid')} on {host} died"
        elif _age_seconds(trial) > UNNAMED_GRACE_S:
            reason = "stale: its worker died before naming itself"
        else:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, reason)
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    interval = _heartbeat_interval(storage)
    if interval:
        backend = getattr(storage, "_backend", storage)
        grace = getattr(backend, "grace_period", None) or 2 * interval
        for trial_id in backend._get_stale_trial_ids(study._study_id):
            try:
                storage.set_trial_user_attr(trial_id, ERROR_ATTR, f"stale: no heartbeat for {grace} s (its worker died)")
                if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    failed.append(storage.get_trial(trial_id).number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first
    return failed


def _age_seconds(trial: FrozenTrial) -> float:
    started = trial.datetime_start
    return float("inf") if started is None else (datetime.datetime.now() - started).total_seconds()


def _heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval, or None where it keeps no heartbeat."""
    get_interval = getattr(storage, "get_heartbeat_interval", None)
    return get_interval() if get_interval is not None else None


class _Heartbeat:
    """Records the trial's heartbeat while its objective runs (RDB storage only)."""

    def __init__(self, study: Study, trial: Trial):
        storage = study._storage
        self._interval = _heartbeat_interval(storage)
        self._storage, self._trial_id = storage, trial._trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self._interval:
            with_retries(lambda: self._storage.record_heartbeat(self._trial_id), "recording a heartbeat")
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a missed beat only risks being failed as stale later
                pass

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def enqueue_first(study: Study, trials: Sequence[tuple[Mapping[str, float], Mapping[str, Any]]]) -> bool:
    """Enqueue ``(genome, user_attrs)`` pairs as the first trials, unless the study already holds
    trials to run or results (a restart after a kill during calibration keeps its enqueued ones)."""
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)):
        return False
    for genome, user_attrs in trials:
        study.enqueue_trial(dict(genome), user_attrs=dict(user_attrs))
    return True


# -- results -----------------------------------------------------------------
def complete_trials(study: Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """The fitness over several benchmarks: their accuracies weighted by the space's benchmark weights."""
    return float(np.dot(weights, values) / np.sum(weights))


def fitness(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """One number per trial: its value, or with one objective per benchmark their weighted mean."""
    if weights is not None and len(weights) == len(values) > 1:
        return weighted_mean(values, weights)
    return float(np.mean(values))


def ranked_trials(study: Study, weights: Sequence[float] | None = None) -> list[FrozenTrial]:
    """Complete trials, best first.

    Several objectives (one per benchmark) rank by their mean, weighted by the
    benchmarks' ``weights`` from the search space when given.
    """
    return sorted(complete_trials(study), key=lambda t: -fitness(t.values, weights))


def best_trials(study: Study) -> list[FrozenTrial]:
    """Single objective: ``[best]`` (or ``[]``); several: the Pareto front."""
    if not complete_trials(study):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return list(study.best_trials)


def best_value(study: Study) -> float | None:
    """Best single-objective value so far, None before the first COMPLETE trial."""
    best = best_trials(study)
    return best[0].value if best and len(study.directions) == 1 else None


def status_table(study: Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, values, duration, best-so-far flag, error and genome."""
    best = {t.number for t in best_trials(study)}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "values": list(trial.values) if trial.values is not None else None,
            "best": trial.number in best,
            "duration_s": duration,
            "error": trial.user_attrs.get(ERROR_ATTR),
            "params": dict(trial.params),
        })
    return rows


# -- the search loop ---------------------------------------------------------
@dataclass
class SearchSummary:
    n_complete: int
    n_new_complete: int
    n_new_failed: int
    best: list[FrozenTrial]


class SearchDriver:
    """Runs ask -> objective -> tell until the study holds ``n_trials`` COMPLETE trials.

    A failing objective fails its trial (the message lands in the ``error``
    user attr) and the search goes on, unless the first ``max_initial_failures``
    trials of this run all fail: then the objective is broken and we raise.
    """

    def __init__(self, study: Study, optimizer: SearchOptimizer, *, progress: bool = True,
                 max_initial_failures: int = 3, label_attrs: Sequence[str] = ()):
        self.study = study
        self.optimizer = optimizer
        self.progress = progress
        self.max_initial_failures = max_initial_failures
        self.label_attrs = tuple(label_attrs)  # a trial's own name (set when enqueued): never copied to a duplicate
        optimizer.bind(study)

    def _budget_left(self, n_trials: int) -> int:
        """Trials still to start: COMPLETE ones and other workers' in-flight ones count.

        A RUNNING trial that names no worker was either created an instant ago or
        orphaned by a kill in that instant (it is failed after UNNAMED_GRACE_S).
        It does not hold budget: at worst one extra trial runs, where counting it
        would end a resumed search one trial short.
        """
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        trials = self.study.get_trials(deepcopy=False, states=states)
        return n_trials - sum(1 for t in trials if t.state == TrialState.COMPLETE or WORKER_ATTR in t.user_attrs)

    def run(self, objective_fn: ObjectiveFn, n_trials: int,
            callbacks: Sequence[Callable[[Study, FrozenTrial], None]] = ()) -> SearchSummary:
        """Evaluate genomes until ``n_trials`` COMPLETE trials exist in the study."""
        if n_trials < 1:
            raise EvomergeError(f"the trial budget must be at least 1, got {n_trials}")
        n_done_before = len(complete_trials(self.study))
        new_complete = new_failed = 0
        said_waiting = False
        with _progress_display(self.progress, n_trials, n_done_before) as show:
            show(self.study)
            while True:
                self._fail_stale()
                if self._budget_left(n_trials) <= 0:
                    running = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                    if len(complete_trials(self.study)) >= n_trials or not running:
                        break
                    if not said_waiting:  # a worker dying now leaves a trial to run again
                        from evomerge.console import say

                        say(f"the budget is taken: waiting for {running} trial(s) of other workers to finish")
                        said_waiting = True
                    time.sleep(STALE_CHECK_S)
                    continue
                frozen = self._run_one(objective_fn, n_trials)
                if frozen is None:
                    continue  # surplus: other workers had filled the budget
                if frozen.state == TrialState.COMPLETE:
                    new_complete += 1
                else:
                    new_failed += 1
                    if new_complete == 0 and new_failed >= self.max_initial_failures:
                        raise EvomergeError(
                            f"the first {new_failed} trials all failed; last error: "
                            f"{frozen.user_attrs.get(ERROR_ATTR)}"
                        )
                for callback in callbacks:
                    callback(self.study, frozen)
                show(self.study)
        return SearchSummary(len(complete_trials(self.study)), new_complete, new_failed, best_trials(self.study))

    def _fail_stale(self) -> None:
        """Fail the trials of dead workers (same host: pid; others: heartbeat), at most once a second."""
        now = time.monotonic()
        if now - getattr(self, "_stale_checked", -math.inf) >= STALE_CHECK_S:
            self._stale_checked = now
            fail_stale_trials(self.study)

    def _surplus(self, trial: Trial, n_trials: int) -> bool:
        """Whether the budget was full when ``trial`` was created: COMPLETE trials and the
        in-flight trials created before it (named, or just created) already make ``n_trials``.
        Two workers that both saw one trial left both ask; the later one steps back."""
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        taken = sum(1 for t in self.study.get_trials(deepcopy=False, states=states)
                    if t.state == TrialState.COMPLETE
                    or (t.number < trial.number and (WORKER_ATTR in t.user_attrs or _age_seconds(t) <= UNNAMED_GRACE_S)))
        return taken >= n_trials

    def _run_one(self, objective_fn: ObjectiveFn, n_trials: int | None = None) -> FrozenTrial | None:
        """One trial (None: it was surplus and is failed unrun). Its storage writes (ask, tell)
        finish before a Ctrl-C takes effect, and a trial interrupted anywhere else is failed
        before the interrupt goes on: none is left RUNNING."""
        trial, told = None, False
        try:
            with _sigint_deferred():
                trial = self.optimizer.ask({WORKER_ATTR: worker_identity()})
            with _Heartbeat(self.study, trial):  # from its creation: a worker dying anywhere leaves a stale beat
                if n_trials is not None and self._surplus(trial, n_trials):
                    with _sigint_deferred():
                        trial.set_user_attr(ERROR_ATTR, "surplus: other workers had filled the budget (not run)")
                        self.optimizer.tell(trial, None)
                        told = True
                    return None
                started = time.perf_counter()
                stored = self._stored_result(trial)
                try:
                    if stored is not None:
                        values, user_attrs = stored
                    else:
                        values, user_attrs = objective_fn(dict(trial.params))
                    values = self._checked_values(values)
                    user_attrs = {str(key): _jsonable(value) for key, value in (user_attrs or {}).items()}
                except EvomergeError as error:
                    if _gave_up.is_set():
                        raise  # the database is gone: this worker stops (its trial is failed as stale)
                    values, user_attrs = None, {ERROR_ATTR: f"{type(error).__name__}: {error}"[:2000]}
                except Exception as error:
                    values, user_attrs = None, {ERROR_ATTR: f"{type(error).__name__}: {error}"[:2000]}
                with _sigint_deferred():
                    for key, value in {**user_attrs, WALL_TIME_ATTR: time.perf_counter() - started}.items():
                        trial.set_user_attr(key, value)
                    frozen, told = self.optimizer.tell(trial, values), True
            return frozen
        except optuna.exceptions.UpdateFinishedTrialError:
            # SQLite has no row locks: another worker popped the same enqueued trial and finished it first
            return self.study._storage.get_trial(trial._trial_id)
        except BaseException:  # Ctrl-C or a kill signal turned exception: leave no RUNNING trial behind
            if trial is not None and not told and not _gave_up.is_set():
                with _sigint_deferred():
                    try:
                        trial.set_user_attr(ERROR_ATTR, "interrupted")
                        self.optimizer.tell(trial, None)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        pass
            raise

    def _stored_result(self, trial: Trial) -> tuple[list[float], dict] | None:
        """The values and attrs of a COMPLETE trial with this very genome, or None.

        Optuna's CMA-ES can propose a genome twice (its per-trial seed collides); the
        objective is deterministic in the genome, so the stored result is what scoring
        again would give, and the optimizer is told the true value of its own sample.
        The new trial records which one it reuses (user attr ``duplicate_of``).
        """
        key = genome_key(trial.params)
        for done in complete_trials(self.study):
            if done.number != trial.number and genome_key(done.params) == key:
                attrs = {k: v for k, v in done.user_attrs.items() if k not in _OWN_ATTRS + self.label_attrs}
                return list(done.values), {**attrs, DUPLICATE_ATTR: done.number}
        return None

    def _checked_values(self, values: Sequence[float] | float) -> list[float]:
        if isinstance(values, (int, float)):
            values = [values]
        values = [float(v) for v in values]
        n = len(self.study.directions)
        if len(values) != n:
            raise EvomergeError(f"objective returned {len(values)} values for {n} objectives")
        if not all(math.isfinite(v) for v in values):
            raise EvomergeError(f"objective returned a non-finite value: {values}")
        return values


def genome_key(params: Mapping[str, float]) -> tuple:
    """A genome as a hashable key: the same genome (up to float noise) gives the same key."""
    return tuple(sorted((name, round(float(value), 12)) for name, value in params.items()))


@contextmanager
def _sigint_deferred():
    """Within: a Ctrl-C waits for the block to finish, then interrupts (main thread only).

    Storage writes of ask and tell take milliseconds; deferring the interrupt over them
    means a trial is never left half-created or RUNNING by a Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])  # Python's default handler raises KeyboardInterrupt


class _progress_display:
    """A rich progress bar with ETA and the best value so far; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.enabled, self.total, self.completed = enabled, total, completed
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[best]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task("search", total=self.total, completed=self.completed, best="")
        return self._show

    def _show(self, study: Study) -> None:
        if self._progress is None:
            return
        best = best_trials(study)
        if not best:
            text = "best: -"
        elif len(study.directions) == 1:
            text = f"best: {best[0].value:.4g} (trial {best[0].number})"
        else:
            text = f"pareto front: {len(best)} trials"
        self._progress.update(self._task, completed=len(complete_trials(study)), best=text)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


def trial_summary(trial: FrozenTrial) -> str:
    """One line for logs: number, values, genome."""
    genome = json.dumps({k: round(v, 4) for k, v in trial.params.items()})
    return f"trial {trial.number}: values={trial.values} genome={genome}"
