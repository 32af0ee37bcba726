"""The calibration stored in the study's database and the lock one worker calibrates under
(evomerge/search/calibration.py), on SQLite; tests/test_workers_postgres.py runs it on PostgreSQL."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import optuna

import evomerge.search.calibration as calibration
from evomerge.estimate import ResponseMatrix
from evomerge.search.calibration import CalibrationStore, worker_slot
from evomerge.search.study import open_study, worker_host, worker_identity


def make_store(tmp_path) -> CalibrationStore:
    study = open_study(tmp_path, "s", ["maximize"], {"x": 1})
    return CalibrationStore.of(study)


def dead_worker() -> dict:
    process = subprocess.Popen(["true"])
    process.wait()
    return {"host": worker_host(), "pid": process.pid, "start": None}


def test_blobs_responses_and_inputs_round_trip(tmp_path):
    store = make_store(tmp_path)
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
    store = make_store(tmp_path)
    assert store._try_acquire(json.dumps(dead_worker(), sort_keys=True))
    said = []
    with store.locked(worker_identity(), wait=said.append) as mine:
        assert mine
        assert json.loads(store._holder()[0])["pid"] == worker_identity()["pid"]
    assert said and said[0].startswith("took the calibration over")
    assert store._holder() is None  # released


def test_a_silent_holder_elsewhere_is_taken_over_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "LOCK_GRACE_S", 1.0)
    monkeypatch.setattr(calibration, "POLL_S", 0.1)
    store = make_store(tmp_path)
    store._try_acquire(json.dumps({"host": "elsewhere", "pid": 1, "start": None}))
    said = []
    with store.locked(worker_identity(), wait=said.append) as mine:
        assert mine
    assert said[0].startswith("waiting for worker pid 1 on elsewhere") and "took the calibration over" in said[1]


def test_a_waiter_stops_waiting_once_the_calibration_is_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "POLL_S", 0.1)
    store = make_store(tmp_path)
    store._try_acquire(json.dumps({"host": "elsewhere", "pid": 1, "start": None}))
    polls = []
    with store.locked(worker_identity(), done=lambda: polls.append(1) or len(polls) > 3) as mine:
        assert not mine


def test_worker_slots(tmp_path):
    study = open_study(tmp_path, "s", ["maximize"], {"x": 1})
    store = CalibrationStore.of(study)
    assert worker_slot(study) == 0 and worker_slot(study) == 0  # this process keeps its slot
    store._lock = "worker:0"
    assert store._compare_and_set(store._holder(), json.dumps(dead_worker(), sort_keys=True), 0)
    assert worker_slot(study) == 0  # a dead worker's slot of this host is taken over
    store._lock = "worker:0"
    assert store._compare_and_set(store._holder(), json.dumps({"host": "elsewhere", "pid": 1}), 0)
    assert worker_slot(study) == 1  # a live worker elsewhere holds slot 0
    assert isinstance(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}"),
                      optuna.Study)
