"""Workers on several machines sharing one study on a real PostgreSQL server (tests/postgres_server.py).

Each worker is a process with its own run folder and its own host name
(EVOMERGE_WORKER_HOST), as on separate machines: a dead worker's trial is failed
by the heartbeat, not by a pid check. `.ci/run` installs the server (Debian's
postgresql) and sets EVOMERGE_REQUIRE_POSTGRES=1, so there these tests never skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.search.calibration_store import CalibrationStore
from evomerge.search.records import TrialKey
from evomerge.search.runs import SPACE_FILE, STORAGE_FILE
from evomerge.search.storage import open_storage
from evomerge.search import workers as worker_module
from evomerge.search.workers import fail_stale_trials

sys.path.insert(0, str(Path(__file__).parent))
from postgres_server import PostgresServer, server_binaries  # noqa: E402
from small_space import small_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_pg_worker.py"


@pytest.fixture(scope="module")
def postgres():
    if server_binaries() is None:
        if os.environ.get("EVOMERGE_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL server binaries not found (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg (extra evomerge[postgres]) is not installed")
    with PostgresServer() as server:
        yield server


def start_worker(space: Path, run_dir: Path, url: str, host: str, stall_at: int = 0, sleep_s: float = 0.0,
                 **env) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                   "EVOMERGE_WORKER_HOST": host, "EVOMERGE_HEARTBEAT_S": "1", "EVOMERGE_HEARTBEAT_GRACE_S": "3",
                   "EVOMERGE_LOCK_BEAT_S": "1", "EVOMERGE_LOCK_GRACE_S": "5", **env}
    command = [sys.executable, str(WORKER), str(space), str(run_dir), url, str(stall_at), str(sleep_s)]
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(worker: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        output = worker.communicate(timeout=timeout)[0].decode()
    finally:
        if worker.poll() is None:
            worker.kill()
    return worker.returncode, output


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def trials_of(url: str, name: str = "r", states=None) -> list:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return study.get_trials(deepcopy=False, states=states)


def complete_count(url: str) -> int:
    try:
        return len(trials_of(url, states=(TrialState.COMPLETE,)))
    except KeyError:  # the study is not created yet
        return 0


def test_three_workers_one_killed_share_one_calibration_and_the_budget(postgres, zoo_dir, tmp_path, capsys):
    url = postgres.new_database("three")
    budget = 10
    space = small_space(zoo_dir, tmp_path / "space.yaml", optimizer={"name": "random", "trials": budget})
    folders = [tmp_path / f"machine{i}" / "r" for i in range(3)]
    workers = [start_worker(space, folders[i], url, f"machine{i}", stall_at=2 if i == 2 else 0, sleep_s=0.3)
               for i in range(3)]
    try:
        wait_for(lambda: (folders[2] / "stalled").exists() or workers[2].poll() is not None, 180, "the stall")
        assert workers[2].poll() is None, finish(workers[2])[1][-3000:]
        workers[2].send_signal(signal.SIGKILL)  # mid-trial: its RUNNING trial only the heartbeat can fail
        workers[2].wait()
        results = [finish(worker) for worker in workers[:2]]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert [code for code, _ in results] == [0, 0], [output[-3000:] for _, output in results]
    outputs = "\n".join(output for _, output in results)
    assert "Traceback" not in outputs

    trials = trials_of(url)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == budget
    stale = [t for t in trials if t.user_attrs.get("worker", {}).get("host") == "machine2"
             and t.state != TrialState.COMPLETE]
    assert len(stale) == 1 and stale[0].state == TrialState.FAIL
    assert stale[0].user_attrs[TrialKey.ERROR].startswith("stale: no heartbeat"), stale[0].user_attrs
    searched = [t for t in done if TrialKey.BASELINE not in t.user_attrs]
    genomes = [tuple(sorted(t.params.items())) for t in searched]
    assert len(set(genomes)) == len(genomes), "a genome was evaluated twice"
    baselines = [t.user_attrs[TrialKey.BASELINE] for t in trials if TrialKey.BASELINE in t.user_attrs]
    assert len(baselines) == len(set(baselines)) > 0, "baselines enqueued more than once"

    # one worker calibrated, the others loaded its estimators: every folder caches the very same files
    calibrated = [o for _, o in results if "calibrating the" in o]
    assert len(calibrated) <= 1
    estimator_files = sorted(p.name for p in (folders[0] / "estimators").iterdir())
    assert estimator_files
    for name in estimator_files:
        contents = {(folder / "estimators" / name).read_text() for folder in folders}
        assert len(contents) == 1, name
    study = optuna.load_study(study_name="r", storage=open_storage(url))
    stored = CalibrationStore.of(study).estimators()
    for name in estimator_files:
        assert stored[name.removesuffix(".json")].to_dict() == json.loads((folders[0] / "estimators" / name).read_text())

    # a fourth machine holds nothing but the URL and the space
    fourth = tmp_path / "machine3" / "r"
    fourth.mkdir(parents=True)
    (fourth / SPACE_FILE).write_text((folders[0] / SPACE_FILE).read_text())
    (fourth / STORAGE_FILE).write_text(url)
    capsys.readouterr()
    assert main(["status", str(fourth)]) == 0
    assert f"{budget} complete" in capsys.readouterr().out
    assert main(["export", str(fourth), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "config.json").is_file()
    assert sorted(p.name for p in fourth.iterdir()) == [SPACE_FILE, STORAGE_FILE]


def test_server_restart_mid_search_then_an_unreachable_server(postgres, zoo_dir, tmp_path, monkeypatch):
    url = postgres.new_database("restart")
    budget = 12
    space = small_space(zoo_dir, tmp_path / "space.yaml", optimizer={"name": "random", "trials": budget})
    folders = [tmp_path / f"machine{i}" / "r" for i in range(2)]
    workers = [start_worker(space, folders[i], url, f"machine{i}", sleep_s=0.4, EVOMERGE_DB_RETRY_S="60")
               for i in range(2)]
    try:
        wait_for(lambda: complete_count(url) >= 3 or any(w.poll() is not None for w in workers), 180, "3 trials")
        before = {t.number for t in trials_of(url, states=(TrialState.COMPLETE,))}
        postgres.restart(down_s=2.0)
        results = [finish(worker) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for _, output in results:
        print(output)
    assert [code for code, _ in results] == [0, 0]
    assert any("retrying" in output for _, output in results), [output[-2000:] for _, output in results]
    done = {t.number for t in trials_of(url, states=(TrialState.COMPLETE,))}
    assert len(done) == budget and before <= done

    # a server that stays down: the worker gives up after its retry budget with one clear line
    more = small_space(zoo_dir, tmp_path / "more.yaml", optimizer={"name": "random", "trials": budget + 40})
    worker = start_worker(more, tmp_path / "machine9" / "r", url, "", sleep_s=0.4, EVOMERGE_DB_RETRY_S="3")
    try:
        wait_for(lambda: complete_count(url) > budget or worker.poll() is not None, 120, "a trial of the new worker")
        postgres.stop()
        code, output = finish(worker, timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
        postgres.start()
    assert code == 2, output[-3000:]
    assert "the study database stayed unreachable" in output and "Traceback" not in output, output[-3000:]
    # its trial in flight stays RUNNING in the study, recoverable: failed as stale, the budget untouched
    study = optuna.load_study(study_name="r", storage=open_storage(url))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(running) <= 1
    # the server may stop between a trial's creation and the write of its worker: that orphan names no
    # worker and is failed once UNNAMED_GRACE_S has passed since its start, which the test does not wait for
    monkeypatch.setattr(worker_module, "UNNAMED_GRACE_S", 0)
    assert fail_stale_trials(study) == [t.number for t in running]


def _superuser(postgres):
    import psycopg

    return psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=evomerge dbname=postgres", autocommit=True)


def test_a_server_that_turns_read_only_or_fills_its_disk_stops_the_worker_in_one_line(postgres, zoo_dir, tmp_path):
    """Not retried for the whole retry budget (that is for a server out of reach): one line naming the
    database and the cause, exit 2, and the completed trials stay."""
    space = small_space(zoo_dir, tmp_path / "space.yaml", optimizer={"name": "random", "trials": 40})
    # read-only: every new session of the database refuses writes
    url = postgres.new_database("ro")
    worker = start_worker(space, tmp_path / "a" / "r", url, "machine-a", sleep_s=0.3, EVOMERGE_DB_RETRY_S="120")
    try:
        wait_for(lambda: complete_count(url) >= 2 or worker.poll() is not None, 180, "2 trials")
        with _superuser(postgres) as connection:
            connection.execute('ALTER DATABASE "ro" SET default_transaction_read_only = on')
            connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'ro'")
        started = time.time()
        code, output = finish(worker, timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert f"evomerge: error: the database is read-only: {url}" in output, output[-3000:]
    assert time.time() - started < 60  # not the 120 s retry budget
    assert complete_count(url) >= 2

    # disk full: the database lives in a tablespace on a small tmpfs, which fills up
    disk = postgres.folder / "tablespace"  # inside the server's own folder: its user can reach it
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here for the disk-full half")
    try:
        if postgres.runas is not None:
            os.chown(disk, postgres.runas.pw_uid, postgres.runas.pw_gid)
        with _superuser(postgres) as connection:
            connection.execute(f"CREATE TABLESPACE tiny LOCATION '{disk}'")
            connection.execute('CREATE DATABASE "full" TABLESPACE tiny')
        url = postgres.url("full")
        worker = start_worker(space, tmp_path / "b" / "r", url, "machine-b", sleep_s=0.3, EVOMERGE_DB_RETRY_S="120")
        try:
            wait_for(lambda: complete_count(url) >= 2 or worker.poll() is not None, 180, "2 trials")
            with open(disk / "filler", "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass
            code, output = finish(worker, timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert code == 2 and "Traceback" not in output, output[-3000:]
        assert f"evomerge: error: no space left on device: {url}" in output, output[-3000:]
        (disk / "filler").unlink()
        assert complete_count(url) >= 2
    finally:
        with _superuser(postgres) as connection:
            connection.execute('DROP DATABASE IF EXISTS "full" WITH (FORCE)')
            connection.execute("DROP TABLESPACE IF EXISTS tiny")
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
