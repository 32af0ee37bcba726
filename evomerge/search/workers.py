"""The processes that run a study's trials: who they are, whether they live, and what they share.

Several workers (on one machine or many) may run one study. Each trial names
its worker (host, pid and the process's start time, so a recycled pid is not
taken for the dead worker). Trials left RUNNING by a dead worker of this host
are failed at once; on a shared server database a heartbeat lets any worker
fail the trials of workers that died on other machines.

Workers share nothing but the storage, so what they coordinate lives in a table
of its database next to Optuna's own, ``evomerge_locks(name, owner, beat)``:

* a `StudyLock` (the calibration, the enqueueing of baselines) is a row taken
  by an INSERT (the primary key lets one worker win); its holder bumps ``beat``
  every few seconds, and a waiter takes the lock over (a compare-and-set UPDATE)
  when the holder is a dead process of its own host, or when ``beat`` has not
  moved for ``LOCK_GRACE_S`` on the waiter's own clock, so clocks never need to agree;
* worker slots (``worker:<study>:<n>`` rows): each worker holds the lowest free
  one until it exits, so a worker starting at the same moment as others knows it
  has company before any of them runs a trial (its optimizer then draws its own seed).
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import sqlalchemy as sa
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge.search.records import TrialKey
from evomerge.search.storage import (database_name, fail_trial, heartbeat_grace, heartbeat_interval, rdb_engine,
                                     record_heartbeat, stale_trial_ids, stored_trial, trial_id, with_retries)

UNNAMED_GRACE_S = 10
"""A RUNNING trial still naming no worker this long after its start was orphaned between its
creation and the write of its worker (milliseconds later): it is failed as stale. Younger, it
may be another worker's trial an instant old: it holds budget."""
LOCK_BEAT_S = float(os.environ.get("EVOMERGE_LOCK_BEAT_S", 5))
LOCK_GRACE_S = float(os.environ.get("EVOMERGE_LOCK_GRACE_S", 60))
"""A lock holder whose beat stood still this long (seen from a waiter) is taken for dead."""
POLL_S = 0.5
MAX_SLOTS = 10_000


# -- identity and liveness ------------------------------------------------------
def process_start_ticks(pid: int) -> int | None:
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
    return {"host": worker_host(), "pid": pid, "start": process_start_ticks(pid)}


def is_alive(worker: Mapping[str, Any]) -> bool:
    """Whether the process ``worker`` names still runs (call for workers of this host only)."""
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
    return start is None or process_start_ticks(pid) in (None, start)


def describe_worker(owner: str) -> str:
    """'pid 123 on host' for a worker identity stored as JSON."""
    try:
        worker = json.loads(owner)
        return f"pid {worker.get('pid')} on {worker.get('host')}"
    except (ValueError, AttributeError):
        return owner


def dead_on_this_host(owner: str) -> bool:
    """Whether a worker identity stored as JSON names a dead process of this host."""
    try:
        worker = json.loads(owner)
    except ValueError:
        return False
    return isinstance(worker, dict) and worker.get("host") == worker_host() and not is_alive(worker)


def worker_salt(joins_others: bool) -> int:
    """0 for the only worker of a study (a resume stays reproducible); else unique to this process,
    so workers running together propose different genomes."""
    return zlib.crc32(f"{worker_host()}:{os.getpid()}".encode()) if joins_others else 0


# -- stale trials -------------------------------------------------------------------
def age_seconds(trial: FrozenTrial) -> float:
    started = trial.datetime_start
    return float("inf") if started is None else (datetime.datetime.now() - started).total_seconds()


_in_flight_here: set[int] = set()
"""Ids of the trials this process is running now (a RUNNING trial of this process not among them was
left by an earlier search of the same process, stopped by a fault)."""


_locks_held_here: set[tuple[str, str]] = set()
"""(lock row, owner) of the study locks this process holds now (one of its own not among them was
left by an earlier search of the same process, stopped by a fault before it could release it)."""


def left_by_this_process(worker: Mapping[str, Any], trial: FrozenTrial) -> bool:
    return worker == worker_identity() and trial_id(trial) not in _in_flight_here


def fail_stale_trials(study: Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is dead; return their numbers.

    Same host: the worker's pid is checked at once (this very process: the trials it is
    not running now). Other hosts: Optuna's heartbeat (RDB server storage) fails them
    once they miss it for the grace period.
    """
    host = worker_host()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(TrialKey.WORKER)
        if isinstance(worker, Mapping):
            if left_by_this_process(worker, trial):
                reason = "stale: an earlier search of this process stopped while running it"
            elif worker.get("host") != host or is_alive(worker):
                continue
            else:
                reason = f"stale: worker pid {worker.get('pid')} on {host} died"
        elif age_seconds(trial) > UNNAMED_GRACE_S:
            reason = "stale: its worker died before naming itself"
        else:
            continue
        if fail_trial(study, trial_id(trial), {TrialKey.ERROR: reason}):
            failed.append(trial.number)
    stale = stale_trial_ids(study)
    if stale:
        numbers = {trial_id(t): t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reason = f"stale: no heartbeat for {heartbeat_grace(study)} s (its worker died)"
        for stale_id in stale:
            if fail_trial(study, stale_id, {TrialKey.ERROR: reason}) and stale_id in numbers:
                failed.append(numbers[stale_id])
    return failed


def holds_budget(trial: FrozenTrial) -> bool:
    """Whether the trial counts against the budget: COMPLETE, or RUNNING and either naming its worker
    or created an instant ago (an orphan older than `UNNAMED_GRACE_S` is about to be failed)."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.RUNNING and (
        TrialKey.WORKER in trial.user_attrs or age_seconds(trial) <= UNNAMED_GRACE_S)


class InFlight:
    """While a trial runs: this process counts it as its own, and (server databases) its heartbeat beats."""

    def __init__(self, study: Study, trial: Trial):
        self._study, self._trial = study, trial
        self._interval = heartbeat_interval(study)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        _in_flight_here.add(trial_id(self._trial))
        if self._interval:
            with_retries(lambda: record_heartbeat(self._study, self._trial), "recording a heartbeat")
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self._interval):
            try:
                record_heartbeat(self._study, self._trial)
            except Exception:  # a missed beat only risks being failed as stale later
                pass

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _in_flight_here.discard(trial_id(self._trial))


def finished_elsewhere(study: Study, trial: Trial) -> FrozenTrial:
    """The trial as another worker finished it (SQLite has no row locks: two may pop one enqueued trial)."""
    return stored_trial(study, trial)


# -- locks and slots ----------------------------------------------------------------
_metadata = sa.MetaData()
_locks = sa.Table(
    "evomerge_locks", _metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("beat", sa.BigInteger, nullable=False),
)


def create_tables(engine: sa.engine.Engine, metadata: sa.MetaData) -> None:
    """Create evomerge's own tables beside Optuna's; of workers creating them at once, one wins."""
    for attempt in range(5):
        try:
            metadata.create_all(engine, checkfirst=True)
            return
        except sa.exc.SQLAlchemyError as error:  # another worker creates them at this very moment
            if attempt == 4 or not any(s in str(error).lower() for s in ("already exists", "duplicate", "unique")):
                raise
            time.sleep(0.2 * (attempt + 1))


class StudyLock:
    """One named lock of a study, a row of ``evomerge_locks`` (see the module's docstring)."""

    def __init__(self, engine: sa.engine.Engine, study_name: str, name: str):
        self.engine = engine
        self.row = f"{name}:{study_name}"
        self.label = name
        self.where = database_name(str(engine.url))
        with_retries(lambda: create_tables(engine, _metadata), "creating the lock table", where=self.where)

    @classmethod
    def of(cls, study: Study, name: str) -> "StudyLock | None":
        """The lock ``name`` of ``study`` (None where its storage is no database)."""
        engine = rdb_engine(study)
        return None if engine is None else cls(engine, study.study_name, name)

    def holder(self) -> tuple[str, int] | None:
        def read():
            with self.engine.connect() as connection:
                row = connection.execute(sa.select(_locks.c.owner, _locks.c.beat).where(
                    _locks.c.name == self.row)).first()
            return None if row is None else (row[0], int(row[1]))
        return with_retries(read, f"reading the {self.label} lock", where=self.where)

    def try_acquire(self, owner: str) -> bool:
        def insert():
            try:
                with self.engine.begin() as connection:
                    connection.execute(_locks.insert().values(name=self.row, owner=owner, beat=0))
                return True
            except sa.exc.IntegrityError:
                return False
        return with_retries(insert, f"taking the {self.label} lock", where=self.where)

    def compare_and_set(self, old: tuple[str, int], owner: str, beat: int, retry: bool = True) -> bool:
        def update():
            with self.engine.begin() as connection:
                result = connection.execute(_locks.update().where(
                    _locks.c.name == self.row, _locks.c.owner == old[0], _locks.c.beat == old[1],
                ).values(owner=owner, beat=beat))
            return result.rowcount == 1
        return with_retries(update, f"updating the {self.label} lock", where=self.where) if retry else update()

    def release(self, owner: str, retry: bool = True) -> None:
        def delete():
            with self.engine.begin() as connection:
                connection.execute(_locks.delete().where(_locks.c.name == self.row, _locks.c.owner == owner))
        with_retries(delete, f"releasing the {self.label} lock", where=self.where) if retry else delete()

    def left_here(self, owner: str) -> bool:
        """Whether ``owner`` is this very process, not holding the lock now: an earlier search of the
        process took it and could not release it (a full disk stopped that search), so nobody holds it."""
        try:
            worker = json.loads(owner)
        except ValueError:
            return False
        return worker == worker_identity() and (self.row, owner) not in _locks_held_here

    def take_over_if_dead(self, me: str) -> bool:
        """Take the lock when its holder is a dead process of this host (or already this worker)."""
        holder = self.holder()
        if holder is None:
            return False
        return holder[0] == me or (dead_on_this_host(holder[0]) and self.compare_and_set(holder, me, 0))

    @contextmanager
    def held(self, worker: Mapping[str, Any], wait: Callable[[str], None] | None = None,
             done: Callable[[], bool] = lambda: False) -> Iterator[bool]:
        """Hold the lock for the block (yields True), or yield False at once when ``done()`` turns
        true while another worker holds it. ``wait(message)`` is called once when waiting begins."""
        me = json.dumps(dict(worker), sort_keys=True)
        seen: tuple[str, int] | None = None
        seen_since = time.monotonic()
        said = False
        while True:
            if done():
                yield False
                return
            if self.try_acquire(me):
                break
            holder = self.holder()
            if holder is None:
                continue  # released between the two statements
            if holder != seen:
                seen, seen_since = holder, time.monotonic()
            dead = (dead_on_this_host(holder[0]) or self.left_here(holder[0])
                    or time.monotonic() - seen_since > LOCK_GRACE_S)
            if dead and self.compare_and_set(holder, me, 0):
                if wait is not None:
                    wait(f"took the {self.label} over from worker {describe_worker(holder[0])}, which stopped")
                break
            if not said and wait is not None:
                wait(f"waiting for worker {describe_worker(holder[0])}, which holds the {self.label} of this study")
                said = True
            time.sleep(POLL_S)
        stop = threading.Event()
        beats = threading.Thread(target=self._beat, args=(me, stop), daemon=True)
        beats.start()
        _locks_held_here.add((self.row, me))
        try:
            yield True
        finally:
            _locks_held_here.discard((self.row, me))
            stop.set()
            beats.join()
            self.release(me)

    def _beat(self, me: str, stop: threading.Event) -> None:
        beat = 0
        while not stop.wait(LOCK_BEAT_S):
            try:
                if self.compare_and_set((me, beat), me, beat + 1, retry=False):
                    beat += 1
            except Exception:  # a missed beat only risks a takeover
                pass


@contextmanager
def study_lock(study: Study, name: str, wait: Callable[[str], None] | None = None,
               done: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """Hold the study's lock ``name`` (see `StudyLock.held`); a storage that is no database
    (one process) needs no lock: the block just runs."""
    lock = StudyLock.of(study, name)
    if lock is None:
        yield not done()
        return
    with lock.held(worker_identity(), wait=wait, done=done) as mine:
        yield mine


def claim_worker_slot(study: Study) -> int:
    """This process's number among the workers of ``study`` (0: the first, or the only one).

    A worker takes the lowest free slot, or one whose holder is a dead process of
    its own host, and keeps it until it exits.
    """
    if rdb_engine(study) is None:
        return 0
    me = json.dumps(worker_identity(), sort_keys=True)
    for slot in range(MAX_SLOTS):
        lock = StudyLock.of(study, f"worker:{slot}")
        took = lock.try_acquire(me)
        if took or lock.take_over_if_dead(me):
            atexit.register(_release_quietly, lock, me)
            return slot
    return MAX_SLOTS


def _release_quietly(lock: StudyLock, me: str) -> None:
    try:
        lock.release(me, retry=False)
    except Exception:  # the database is gone: a later worker of this host takes the slot over
        pass
