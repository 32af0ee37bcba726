"""Run folders: a first start that failed never blocks the folder, racing workers share one study,
and a storage URL is remembered only once a search opened its study (evomerge/search/runs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest

import evomerge.search.calibration as calibration_module
from evomerge.cli import main
from evomerge.search.runs import STORAGE_FILE, load_run_space, open_existing_study

sys.path.insert(0, str(Path(__file__).parent))
from small_space import small_space  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def complete(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.fixture
def scoring_calls(monkeypatch):
    """Counts full-benchmark scorings (calibration); `interrupt_after` raises Ctrl-C after that many."""
    calls = {"full": 0, "interrupt_after": None}
    real = calibration_module.score_records

    def counting(model, tokenizer, bench, indices=None, **kwargs):
        if indices is None:
            if calls["interrupt_after"] is not None and calls["full"] >= calls["interrupt_after"]:
                raise KeyboardInterrupt
            calls["full"] += 1
        return real(model, tokenizer, bench, indices=indices, **kwargs)

    monkeypatch.setattr(calibration_module, "score_records", counting)
    return calls


def test_a_first_start_killed_in_calibration_starts_again_and_may_change_its_space(
        zoo_dir, tmp_path, scoring_calls, capsys):
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    space = small_space(zoo_dir, tmp_path / "space.yaml")
    scoring_calls["interrupt_after"] = 2  # Ctrl-C in the first calibration, two models scored and cached
    assert main(["search", str(space), "--runs-root", str(runs), "--no-progress"]) == 130
    assert f"evomerge resume {run_dir}" in capsys.readouterr().err
    assert complete(open_existing_study(run_dir)) == []

    # a new space replaces the stored one while no trial exists; calibration goes on from its cache
    scoring_calls.update(full=0, interrupt_after=None)
    changed = small_space(zoo_dir, tmp_path / "space.yaml", optimizer={"name": "random"})
    assert main(["search", str(changed), "--runs-root", str(runs), "--no-progress"]) == 0
    assert scoring_calls["full"] == 2 * 3 - 2  # 3 models x 2 benchmarks, 2 cached
    assert len(complete(open_existing_study(run_dir))) == 3
    assert load_run_space(run_dir).optimizer == "random"
    assert "starting search 'r'" in capsys.readouterr().err

    # once trials exist the space is fixed, and that is said before any scoring
    scoring_calls["full"] = 0
    other = small_space(zoo_dir, tmp_path / "space.yaml", optimizer={"name": "random"},
                        merge={"params": {"weight": [0.0, 2.0]}})
    assert main(["search", str(other), "--runs-root", str(runs), "--no-progress"]) == 2
    assert "merge.params.weight" in capsys.readouterr().err
    assert scoring_calls["full"] == 0
    assert main(["resume", str(run_dir), "--trials", "4", "--no-progress"]) == 0
    assert len(complete(open_existing_study(run_dir))) == 4


def test_two_workers_racing_on_a_new_folder_share_one_study(zoo_dir, tmp_path):
    """Two worker processes started at once on a new folder (processes: torch and transformers
    keep process-wide state, which two searches in one process would share)."""
    from search_processes import run_search_workers

    space = small_space(zoo_dir, tmp_path / "space.yaml", optimizer={"trials": 4})
    outputs = run_search_workers(space, tmp_path / "runs")
    assert not any("database is locked" in output or "Traceback" in output for output in outputs), outputs
    run_dir = tmp_path / "runs" / "r"
    assert optuna.study.get_all_study_names(f"sqlite:///{run_dir / 'study.db'}") == ["r"]
    assert len(complete(open_existing_study(run_dir))) == 4  # the budget is the study's, exactly


def test_a_storage_is_remembered_only_by_a_search_that_opened_it(zoo_dir, tmp_path, capsys):
    space = small_space(zoo_dir, tmp_path / "space.yaml")
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    bad = "sqlite:////nonexistent/dir/x.db"
    assert main(["search", str(space), "--runs-root", str(runs), "--storage", bad, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot open study storage" in err and "Traceback" not in err
    assert not (run_dir / STORAGE_FILE).exists()

    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(["search", str(space), "--runs-root", str(runs), "--storage", shared, "--no-progress",
                 "--trials", "2"]) == 0
    assert (run_dir / STORAGE_FILE).read_text() == shared
    assert main(["status", str(run_dir), "--storage", bad]) == 2  # a read-only command: one error ...
    assert "cannot open study storage" in capsys.readouterr().err
    assert (run_dir / STORAGE_FILE).read_text() == shared        # ... and nothing remembered
    assert main(["status", str(run_dir)]) == 0
    assert "2 complete" in capsys.readouterr().out
    # exporting over a folder that is not an earlier export of this run is refused before any model loads
    import shutil

    base_copy = tmp_path / "base-copy"
    shutil.copytree(zoo_dir / "base", base_copy)
    assert main(["export", str(run_dir), "--out", str(base_copy)]) == 2
    assert "is not an earlier export of this run" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(base_copy), "--force"]) == 0
    assert main(["export", str(run_dir), "--out", str(base_copy)]) == 0  # now it is one
    assert (base_copy / "evomerge_export.json").is_file()
