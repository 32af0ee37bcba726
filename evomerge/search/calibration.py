"""A study's calibration, stored in the study's own database, and the lock one worker calibrates under.

Workers on several machines share nothing but the storage URL: the calibration
(every benchmark's full responses of the calibration models, and the fitted
subset estimators) therefore lives in two tables of that database, next to
Optuna's own, so every worker scores trials with the very same items and
estimators. Plain SQL through the storage's SQLAlchemy engine works the same on
SQLite and PostgreSQL (a blob column, no size limit that matters: responses are
a few kB, an estimator some hundred kB).

* ``evomerge_calibration(study, key, data)``: ``inputs`` (what the calibration
  was made from, JSON), ``responses/<benchmark>`` (an ``.npz``, stored after every
  scored model so a worker taking over continues), ``estimators/<benchmark>``
  (JSON) and ``complete`` (written last).
* ``evomerge_locks(name, owner, beat)``: the calibration lock. A row is taken
  by an INSERT (the primary key lets one worker win); its holder bumps ``beat``
  every few seconds. A waiter takes the lock over (a compare-and-set UPDATE)
  when the holder is a dead process of its own host, or when ``beat`` has not
  moved for ``LOCK_GRACE_S`` on the waiter's own clock, so the machines' clocks
  never need to agree.

The run folder's ``responses/`` and ``estimators/`` stay a cache of this.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import sqlalchemy as sa


LOCK_BEAT_S = float(os.environ.get("EVOMERGE_LOCK_BEAT_S", 5))
LOCK_GRACE_S = float(os.environ.get("EVOMERGE_LOCK_GRACE_S", 60))
"""A calibrating worker whose beat stood still this long (seen from a waiter) is taken for dead."""
POLL_S = 0.5

_metadata = sa.MetaData()
_calibration = sa.Table(
    "evomerge_calibration", _metadata,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
_locks = sa.Table(
    "evomerge_locks", _metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("beat", sa.BigInteger, nullable=False),
)


def rdb_engine(study) -> sa.engine.Engine | None:
    """The SQLAlchemy engine under a study's storage (None for a storage that is no database)."""
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    return getattr(storage, "engine", None)


class CalibrationStore:
    """The calibration of one study, in its storage's database."""

    def __init__(self, engine: sa.engine.Engine, study_name: str, retry: Callable | None = None):
        self.engine, self.study = engine, study_name
        self._lock = "calibration"
        self._retry = retry or (lambda fn, what: fn())
        self._retry(self._create_tables, "creating the calibration tables")

    @classmethod
    def of(cls, study, create: bool = True) -> "CalibrationStore | None":
        """The store of ``study`` (None where its storage is no database, or, with ``create=False``,
        where no worker stored a calibration in it yet: readers never create tables)."""
        from evomerge.search.study import with_retries

        engine = rdb_engine(study)
        if engine is None or not (create or sa.inspect(engine).has_table(_calibration.name)):
            return None
        return cls(engine, study.study_name, with_retries)

    def _create_tables(self) -> None:
        for attempt in range(5):
            try:
                _metadata.create_all(self.engine, checkfirst=True)
                return
            except sa.exc.SQLAlchemyError as error:  # another worker creates them at this very moment
                if attempt == 4 or not any(s in str(error).lower() for s in ("already exists", "duplicate", "unique")):
                    raise
                time.sleep(0.2 * (attempt + 1))

    # ------------------------------------------------------------ blobs
    def get(self, key: str) -> bytes | None:
        def read():
            with self.engine.connect() as connection:
                row = connection.execute(sa.select(_calibration.c.data).where(
                    _calibration.c.study == self.study, _calibration.c.key == key)).first()
            return None if row is None else bytes(row[0])
        return self._retry(read, f"reading the study's calibration ({key})")

    def put(self, key: str, data: bytes) -> None:
        def write():
            with self.engine.begin() as connection:
                connection.execute(_calibration.delete().where(
                    _calibration.c.study == self.study, _calibration.c.key == key))
                connection.execute(_calibration.insert().values(study=self.study, key=key, data=data))
        self._retry(write, f"storing the study's calibration ({key})")

    def clear(self) -> None:
        def delete():
            with self.engine.begin() as connection:
                connection.execute(_calibration.delete().where(_calibration.c.study == self.study))
        self._retry(delete, "clearing the study's calibration")

    def get_json(self, key: str) -> Any:
        data = self.get(key)
        return None if data is None else json.loads(data.decode())

    def put_json(self, key: str, value: Any) -> None:
        self.put(key, json.dumps(value, sort_keys=True).encode())

    def get_responses(self, benchmark: str):
        from evomerge.estimate import ResponseMatrix

        data = self.get(f"responses/{benchmark}")
        if data is None:
            return None
        import numpy as np

        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return ResponseMatrix(arrays["correct"].astype(bool), list(arrays["model_names"]),
                                  list(arrays["item_ids"]), str(arrays["benchmark"]))

    def put_responses(self, benchmark: str, matrix) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.savez_compressed(buffer, correct=matrix.correct, model_names=np.array(matrix.model_names, dtype=str),
                            item_ids=np.array(matrix.item_ids, dtype=str), benchmark=np.array(matrix.benchmark))
        self.put(f"responses/{benchmark}", buffer.getvalue())

    def estimators(self, inputs: Mapping | None = None) -> dict | None:
        """The stored estimators by benchmark once the calibration is complete (and, with
        ``inputs``, made from those inputs), else None."""
        from evomerge.estimate import SubsetEstimator

        if inputs is not None and self.get_json("inputs") != json.loads(json.dumps(inputs, sort_keys=True)):
            return None
        complete = self.get_json("complete")
        if complete is None:
            return None
        return {name: SubsetEstimator.from_dict(self.get_json(f"estimators/{name}")) for name in complete}

    # ------------------------------------------------------------ lock
    def _lock_name(self) -> str:
        return f"{self._lock}:{self.study}"

    def _holder(self) -> tuple[str, int] | None:
        def read():
            with self.engine.connect() as connection:
                row = connection.execute(sa.select(_locks.c.owner, _locks.c.beat).where(
                    _locks.c.name == self._lock_name())).first()
            return None if row is None else (row[0], int(row[1]))
        return self._retry(read, "reading the calibration lock")

    def _try_acquire(self, owner: str) -> bool:
        def insert():
            try:
                with self.engine.begin() as connection:
                    connection.execute(_locks.insert().values(name=self._lock_name(), owner=owner, beat=0))
                return True
            except sa.exc.IntegrityError:
                return False
        return self._retry(insert, "taking the calibration lock")

    def _compare_and_set(self, old: tuple[str, int], owner: str, beat: int, retry: bool = True) -> bool:
        def update():
            with self.engine.begin() as connection:
                result = connection.execute(_locks.update().where(
                    _locks.c.name == self._lock_name(), _locks.c.owner == old[0], _locks.c.beat == old[1],
                ).values(owner=owner, beat=beat))
            return result.rowcount == 1
        return self._retry(update, "updating the calibration lock") if retry else update()

    def _release(self, owner: str) -> None:
        def delete():
            with self.engine.begin() as connection:
                connection.execute(_locks.delete().where(_locks.c.name == self._lock_name(), _locks.c.owner == owner))
        self._retry(delete, "releasing the calibration lock")

    @contextmanager
    def locked(self, worker: Mapping[str, Any], wait: Callable[[str], None] | None = None,
               done: Callable[[], bool] = lambda: False, name: str = "calibration") -> Iterator[bool]:
        """Hold the study's lock ``name`` for the block (yields True), or yield False at once when
        ``done()`` turns true while waiting for another worker's calibration.

        ``wait(holder)`` is called once when another worker holds the lock.
        """
        self._lock = name
        me = json.dumps(dict(worker), sort_keys=True)
        seen: tuple[str, int] | None = None
        seen_since = time.monotonic()
        said = False
        while True:
            if done():
                yield False
                return
            if self._try_acquire(me):
                break
            holder = self._holder()
            if holder is None:
                continue  # released between the two statements
            if holder != seen:
                seen, seen_since = holder, time.monotonic()
            dead = _dead_on_this_host(holder[0]) or time.monotonic() - seen_since > LOCK_GRACE_S
            if dead and self._compare_and_set(holder, me, 0):
                if wait is not None:
                    wait(f"took the calibration over from worker {describe_worker(holder[0])}, which stopped")
                break
            if not said and wait is not None:
                wait(f"waiting for worker {describe_worker(holder[0])}, which calibrates this study")
                said = True
            time.sleep(POLL_S)
        stop = threading.Event()
        beats = threading.Thread(target=self._beat, args=(me, stop), daemon=True)
        beats.start()
        try:
            yield True
        finally:
            stop.set()
            beats.join()
            self._release(me)

    def _beat(self, me: str, stop: threading.Event) -> None:
        beat = 0
        while not stop.wait(LOCK_BEAT_S):
            try:
                if self._compare_and_set((me, beat), me, beat + 1, retry=False):
                    beat += 1
            except Exception:  # a missed beat only risks a takeover
                pass


def describe_worker(owner: str) -> str:
    try:
        worker = json.loads(owner)
        return f"pid {worker.get('pid')} on {worker.get('host')}"
    except (ValueError, AttributeError):
        return owner


def _dead_on_this_host(owner: str) -> bool:
    from evomerge.search.study import _is_alive, worker_host

    try:
        worker = json.loads(owner)
    except ValueError:
        return False
    return isinstance(worker, dict) and worker.get("host") == worker_host() and not _is_alive(worker)



def worker_slot(study) -> int:
    """This process's number among the workers of ``study`` (0: the first, or the only one).

    Slots are rows of the lock table (``worker:<study>:<n>``); a worker takes the lowest
    free one, or one whose holder is a dead process of its own host, and keeps it until
    it exits. A worker with a slot above 0 knows it has company even when it starts at
    the very moment the others do, before any of them runs a trial: its optimizer then
    draws its own seed instead of proposing the same genomes (`optimizers.py`).
    """
    import atexit

    from evomerge.search.study import worker_identity

    store = CalibrationStore.of(study)
    if store is None:
        return 0
    me = json.dumps(worker_identity(), sort_keys=True)
    for slot in range(10_000):
        store._lock = f"worker:{slot}"
        if store._try_acquire(me):
            atexit.register(_release_quietly, store, f"worker:{slot}", me)
            return slot
        holder = store._holder()
        if holder is not None and (holder[0] == me or (_dead_on_this_host(holder[0])
                                                         and store._compare_and_set(holder, me, 0))):
            if holder[0] != me:
                atexit.register(_release_quietly, store, f"worker:{slot}", me)
            return slot
    return 10_000


def _release_quietly(store: CalibrationStore, lock: str, me: str) -> None:
    try:
        store._lock = lock
        with store.engine.begin() as connection:
            connection.execute(_locks.delete().where(_locks.c.name == store._lock_name(), _locks.c.owner == me))
    except Exception:  # the database is gone: a later worker of this host takes the slot over
        pass
