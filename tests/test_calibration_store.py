"""The calibration stored in the study's database (evomerge/search/calibration_store.py) and the study
locks and worker slots workers coordinate with (evomerge/search/workers.py), on SQLite;
tests/test_workers_postgres.py runs them on PostgreSQL."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import optuna

import evomerge.search.workers as workers
from evomerge.estimate import ResponseMatrix
from evomerge.search.calibration_store import CalibrationStore
from evomerge.search.study import open_study
from evomerge.search.workers import StudyLock, claim_worker_slot, worker_host, worker_identity


def make_study(tmp_path):
    return open_study(tmp_path, "s", ["maximize"], {"x": 1})


def dead_worker() -> dict:
    process = subprocess.Popen(["true"])
    process.wait()
    return {"host": worker_host(), "pid": process.pid, "start": None}


def test_blobs_responses_and_inputs_round_trip(tmp_path):
    store = CalibrationStore.of(make_study(tmp_path))
    matrix = ResponseMatrix(np.array([[True, False, True]]), ["base"], ["a", "b", "c"], "toy")
    store.put_responses("toy", matrix)
    back = store.get_responses("toy")
    assert back.model_names == ["base"] and back.item_ids == ["a", "b", "c"]
    assert (back.correct == matrix.correct).all()
    store.put_json("inputs", {"k": 1})
    store.put_json("complete", [])
    assert store.estimators({"k": 1}) == {}
    assert store.estimators({"k": 2}) is None  # made from other inputs: not this calibration
    store.clear()
    assert store.get("inputs") is None and store.get_responses("toy") is None


def test_a_dead_holder_of_this_host_is_taken_over_at_once(tmp_path):
    lock = StudyLock.of(make_study(tmp_path), "calibration")
    assert lock.try_acquire(json.dumps(dead_worker(), sort_keys=True))
    said = []
    with lock.held(worker_identity(), wait=said.append) as mine:
        assert mine
        assert json.loads(lock.holder()[0])["pid"] == worker_identity()["pid"]
    assert said and said[0].startswith("took the calibration over")
    assert lock.holder() is None  # released


def test_a_silent_holder_elsewhere_is_taken_over_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "LOCK_GRACE_S", 1.0)
    monkeypatch.setattr(workers, "POLL_S", 0.1)
    lock = StudyLock.of(make_study(tmp_path), "calibration")
    lock.try_acquire(json.dumps({"host": "elsewhere", "pid": 1, "start": None}))
    said = []
    with lock.held(worker_identity(), wait=said.append) as mine:
        assert mine
    assert said[0].startswith("waiting for worker pid 1 on elsewhere") and "took the calibration over" in said[1]


def test_a_lock_this_process_left_unreleased_is_taken_at_once(tmp_path, monkeypatch):
    """A search of this process stopped by a full disk could not release its lock; the next search of
    the same process (a resume from Python) takes it without waiting for the grace period."""
    monkeypatch.setattr(workers, "LOCK_GRACE_S", 3600.0)
    monkeypatch.setattr(workers, "POLL_S", 0.05)
    lock = StudyLock.of(make_study(tmp_path), "calibration")
    me = worker_identity()
    lock.try_acquire(json.dumps(dict(me), sort_keys=True))  # held, never released
    said = []
    with lock.held(me, wait=said.append) as mine:
        assert mine
        polls = []
        with lock.held(me, done=lambda: polls.append(1) or len(polls) > 3) as again:
            assert not again  # while this process holds it, nobody here takes it over
    assert "took the calibration over" in said[0]


def test_a_waiter_stops_waiting_once_the_calibration_is_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "POLL_S", 0.1)
    lock = StudyLock.of(make_study(tmp_path), "calibration")
    lock.try_acquire(json.dumps({"host": "elsewhere", "pid": 1, "start": None}))
    polls = []
    with lock.held(worker_identity(), done=lambda: polls.append(1) or len(polls) > 3) as mine:
        assert not mine


def test_worker_slots(tmp_path):
    study = make_study(tmp_path)
    assert claim_worker_slot(study) == 0 and claim_worker_slot(study) == 0  # this process keeps its slot
    slot0 = StudyLock.of(study, "worker:0")
    assert slot0.compare_and_set(slot0.holder(), json.dumps(dead_worker(), sort_keys=True), 0)
    assert claim_worker_slot(study) == 0  # a dead worker's slot of this host is taken over
    assert slot0.compare_and_set(slot0.holder(), json.dumps({"host": "elsewhere", "pid": 1}), 0)
    assert claim_worker_slot(study) == 1  # a live worker elsewhere holds slot 0
    assert isinstance(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}"),
                      optuna.Study)


def test_a_damaged_stored_matrix_is_one_clear_error(tmp_path):
    """The stored responses are the run folder's .npz format (one definition, `ResponseMatrix.to_bytes`),
    read with the same one-line error."""
    import pytest

    from evomerge.errors import EvomergeError

    store = CalibrationStore.of(make_study(tmp_path))
    store.put("responses/arith", b"not an npz")
    with pytest.raises(EvomergeError, match="cannot read responses of benchmark 'arith' stored in study 's'"):
        store.get_responses("arith")
