"""The estimate check on the (quick) model zoo: runs end to end, writes its table, CLI errors."""

import json

import numpy as np
import pytest

from evomerge.estimate.check import main, run_estimate_check
from evomerge.estimate.estimators import METHODS, SubsetEstimator
from evomerge.estimate.responses import ResponseMatrix, responses_path


@pytest.fixture
def zoo(request):
    try:
        return request.getfixturevalue("zoo_dir")
    except pytest.FixtureLookupError:
        pytest.skip("zoo_dir fixture (tests/conftest.py) not available yet")


def test_estimate_check_on_the_zoo(zoo, tmp_path):
    out = tmp_path / "check"
    table = run_estimate_check(zoo, out, n_heldout=1, sizes=(10,), seed=0, quiet=True, n_timing=1)
    tasks = table.facts["tasks"]
    manifest = json.loads((zoo / "zoo.json").read_text())
    assert tasks == list(manifest.get("bench") or manifest["tasks"])  # composite benchmarks too (zoo v4)
    assert [r["benchmark"] for r in table.rows] == tasks + ["mean", "worst"]
    worst = table.rows[-1]
    for m in METHODS:  # the worst row names the task with the largest error
        assert worst["mae"][m] == max(r["mae"][m] for r in table.rows[: len(tasks)])
        assert worst["worst_task"][m] in tasks
    assert [r["benchmark"] for r in table.coverage] == tasks + ["all"]
    assert all(0.0 <= v <= 1.0 for r in table.coverage for v in r["coverage"].values())
    for row in table.rows:
        assert set(row["mae"]) == set(METHODS)
        assert all(0.0 <= v <= 1.0 for v in row["mae"].values())
        assert row["item_ratio"] > 1
    assert table.rows[-2]["time_ratio"] and table.rows[-2]["time_ratio"] > 1
    assert table.facts["subset_vs_full_answer_mismatches"] == 0
    assert json.loads((out / "estimate_check.json").read_text())["rows"]
    text = (out / "estimate_check.md").read_text()
    assert "| mean |" in text and "| worst |" in text and "interval coverage" in text
    matrix = ResponseMatrix.load(responses_path(out, tasks[0]))
    assert matrix.model_names[0] == "base" and "heldout00" in matrix.model_names
    est = SubsetEstimator.load(out / "estimators" / f"{tasks[0]}-n10.json")
    assert len(est.indices) == 10
    # the expert endpoint beats the base on its own task (the zoo is meaningful); lang: the task the quick
    # profile's short fine-tunes learn best (see test_zoo)
    lang = ResponseMatrix.load(responses_path(out, "lang"))
    assert lang.row("expert:lang").mean() > lang.row("base").mean()
    # a rerun reuses the stored responses and gives the same table
    again = run_estimate_check(zoo, out, n_heldout=1, sizes=(10,), seed=0, quiet=True, n_timing=0)
    assert np.allclose([r["mae"]["gmpirt"] for r in again.rows], [r["mae"]["gmpirt"] for r in table.rows])
    assert again.rows[-2]["time_ratio"] is None


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["--zoo", str(tmp_path / "nozoo"), "--out", str(tmp_path / "o")]) == 2
    assert "not a model zoo" in capsys.readouterr().err
    assert main(["--zoo", str(tmp_path), "--sizes", "ten"]) == 2
    assert "--sizes" in capsys.readouterr().err


@pytest.mark.parametrize("separator", [[], ["--"]])
def test_evomerge_cli_passes_options_through(tmp_path, capsys, separator):
    from evomerge.cli import main as evomerge_main

    assert evomerge_main(["estimate-check", *separator, "--zoo", str(tmp_path / "nozoo")]) == 2
    assert "not a model zoo" in capsys.readouterr().err
