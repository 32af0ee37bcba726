"""Faults of the machine (a full disk, a read-only folder, permission denied) end with one line naming
the path and the cause, exit status 2, and lose nothing: completed trials stay, exports and reports are
whole or absent, and the run resumes once the cause is gone.

The disk is a small tmpfs the test mounts (the suite runs as root in CI); where mounting is not allowed
those tests skip, and the injected-error tests below still cover each cause.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.errors import MachineError
from evomerge.files import refusal, write_json

sys.path.insert(0, str(Path(__file__).parent))
from small_space import small_space  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_kb) -> folder``: a tmpfs of that size (unmounted after); skips where mounting fails."""
    mounted = []

    def mount(size_kb: int, name: str = "disk") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the injected-error tests cover it")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem; returns the filler file (delete it to free the disk)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:   # unbuffered: no partial write left to fail again at close
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("evomerge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def trials_of(run_dir: Path) -> list:
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{run_dir / 'study.db'}")
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def test_a_search_that_fills_its_disk_stops_with_one_line_and_resumes(zoo_dir, tmp_path, small_disk, capsys,
                                                                      monkeypatch):
    import evomerge.search.run as run_module

    disk = small_disk(4096)
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 8, "baselines": False})
    real, calls, filler = run_module.MergeSearch.objective, [], []

    def objective_then_fill(self, params):
        result = real(self, params)
        calls.append(params)
        if len(calls) == 4:
            filler.append(fill(disk))  # the disk fills while the 4th trial is being scored
        return result

    monkeypatch.setattr(run_module.MergeSearch, "objective", objective_then_fill)
    assert main(["search", str(space), "--run-dir", str(disk / "run"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("evomerge: error: no space left on device: ") and "study.db" in line and "free)" in line
    filler[0].unlink()  # space freed: the run resumes with every completed trial kept
    before = [t.number for t in trials_of(disk / "run") if t.state == TrialState.COMPLETE]
    assert len(before) == 3
    assert main(["resume", str(disk / "run"), "--no-progress"]) == 0
    after = trials_of(disk / "run")
    assert [t.number for t in after if t.state == TrialState.COMPLETE][:3] == before
    assert sum(t.state == TrialState.COMPLETE for t in after) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in after)  # the one in flight: failed


def test_a_calibration_on_a_full_disk_fails_in_one_line_and_continues_from_its_cache(zoo_dir, tmp_path, small_disk,
                                                                                  capsys, monkeypatch):
    import evomerge.search.calibration as calibration

    disk = small_disk(4096)
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 2, "baselines": False})
    real, scored, filler = calibration.score_records, [], []

    def score_then_fill(*args, **kwargs):
        scored.append(1)
        if len(scored) == 2:
            filler.append(fill(disk))  # full while the second calibration model is scored
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "score_records", score_then_fill)
    assert main(["search", str(space), "--run-dir", str(disk / "run"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("evomerge: error: no space left on device: ") and "run" in line
    assert not [p for p in (disk / "run").rglob("*") if ".tmp" in p.name]  # no torn or temporary file left
    filler[0].unlink()
    assert main(["resume", str(disk / "run"), "--no-progress"]) == 0
    assert len(scored) < 2 + 2 * 3  # the model scored before the fault came from the cache


def test_an_item_bank_the_disk_refuses_is_one_line_and_the_resume_keeps_the_calibration(zoo_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    """The item bank (``RUNS/.item-params/``, issue 26) is written like every other file: whole or absent."""
    real, scored = Path.write_bytes, []

    def refused_in_the_bank(self, data):
        if ".item-params" in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    import evomerge.search.calibration as calibration

    real_score = calibration.score_records
    monkeypatch.setattr(calibration, "score_records", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    monkeypatch.setattr(Path, "write_bytes", refused_in_the_bank)
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 2, "baselines": False})
    runs = tmp_path / "runs"
    assert main(["search", str(space), "--runs-root", str(runs), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"evomerge: error: no space left on device: {runs / '.item-params'}")
    assert not [p for p in runs.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(Path, "write_bytes", real)
    assert len(scored) == 3  # the first benchmark's endpoints, then its bank entry was refused
    assert main(["resume", str(runs / "faults"), "--no-progress"]) == 0
    assert len(scored) == 3 + 3  # the resume scored the second benchmark only: the first's answers were cached
    assert len(list((runs / ".item-params").glob("*.json"))) == 2


def test_an_export_that_cannot_fit_is_refused_before_writing(zoo_dir, tmp_path, small_disk, capsys):
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 2, "baselines": False})
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    disk = small_disk(400)
    assert main(["export", str(run_dir), "--out", str(disk / "merged")]) == 2
    line = one_error_line(capsys)
    assert f"no space left on device for an export: {disk / 'merged'} needs about" in line and "free" in line
    assert list(disk.iterdir()) == []  # nothing partial


def test_an_export_the_disk_refuses_midway_leaves_nothing(zoo_dir, tmp_path, small_disk, capsys, monkeypatch):
    """The early check passes (another process fills the disk meanwhile): the write fails, in one line."""
    import evomerge.export as export

    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 2, "baselines": False})
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    disk = small_disk(600)
    monkeypatch.setattr(export, "check_free_space", lambda *args: None)
    assert main(["export", str(run_dir), "--out", str(disk / "merged")]) == 2
    assert one_error_line(capsys).startswith(f"evomerge: error: no space left on device: {disk / 'merged'}")
    assert list(disk.iterdir()) == []


def test_a_report_on_a_full_disk_fails_in_one_line(zoo_dir, tmp_path, small_disk, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("plotly")
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 2, "baselines": False})
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    disk = small_disk(64)
    assert main(["report", str(run_dir), "--out", str(disk / "report")]) == 2
    assert one_error_line(capsys).startswith("evomerge: error: no space left on device: ")
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name]


def test_a_read_only_run_folder_is_one_line(zoo_dir, tmp_path, small_disk, capsys):
    disk = small_disk(2048)
    (disk / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="faults", optimizer={"trials": 2, "baselines": False})
    assert main(["search", str(space), "--run-dir", str(disk / "run"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("evomerge: error: read-only file system: ") and "run" in line


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_each_refusal_names_its_path_and_cause(tmp_path, monkeypatch, code, cause):
    """Injected where no tmpfs can be mounted (and for permission denied, which root never meets)."""
    real = Path.write_bytes

    def refused(self, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", refused)
    with pytest.raises(MachineError, match=f"^{cause}: {tmp_path / 'estimators' / 'arith.json'}"):
        write_json(tmp_path / "estimators" / "arith.json", {"a": 1})
    monkeypatch.setattr(Path, "write_bytes", real)
    assert list((tmp_path / "estimators").iterdir()) == []


def test_libraries_that_hide_the_oserror_are_recognised():
    assert refusal(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == "no space left on device"
    try:
        try:
            raise __import__("sqlite3").OperationalError("database or disk is full")
        except Exception as inner:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from inner
    except optuna.exceptions.StorageInternalError as outer:
        assert refusal(outer) == "no space left on device"
    assert refusal(KeyError("arith")) is None
