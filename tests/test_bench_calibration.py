"""tools/bench_calibration.py on a synthetic estimate-check folder: each design's answers and error rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.estimate import ResponseMatrix, responses_path

from tool_modules import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_calibration")


def _check_folder(folder: Path, n_items: int = 120, n_extra: int = 4, n_heldout: int = 5) -> Path:
    """Answers of 2-dim IRT models named as estimate-check names them, and its facts."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2.0, (n_items, 2)), rng.normal(0, 1, n_items)
    names = ["base", "expert:x", "expert:y"] + [f"extra{i:02d}" for i in range(n_extra)] \
        + [f"heldout{i:02d}" for i in range(n_heldout)]
    matrix = ResponseMatrix.empty([f"i{k}" for k in range(n_items)], "synthetic")
    for name in names:
        theta = rng.normal(0, 1, 2)
        p = 1 / (1 + np.exp(-(a @ theta - b)))
        matrix = matrix.with_model(name, rng.random(n_items) < p)
    matrix.save(responses_path(folder, "synthetic"))
    (folder / "estimate_check.json").write_text(json.dumps({"facts": {"strategy": "anchor-irt", "dims": 2}}))
    return folder


def _rows(bench, check: Path, *args: str) -> dict[str, dict]:
    """The tool's rows by design, run on ``check`` with ``args``."""
    out = check.parent / "rows.json"
    assert bench.main(["--checks", str(check), *args, "--out", str(out)]) == 0
    return {r["design"]: r for r in json.loads(out.read_text())["rows"]}


def test_designs_answers_and_rows(bench, tmp_path, capsys):
    check = _check_folder(tmp_path / "check")
    rows = _rows(bench, check, "--designs", "all:4,2x30,endpoints", "--seeds", "0,1", "--sizes", "10")
    assert rows["all:4"]["answers"] == 7 * 120           # 3 endpoints and 4 merges on every item
    assert rows["2x30"]["answers"] == 3 * 120 + 2 * (10 + 30)  # 2 merges on the subset and 30 others each
    assert rows["endpoints"]["answers"] == 3 * 120
    assert all(0.0 <= r["all"] <= 1.0 and r["seeds"] == [0, 1] for r in rows.values())
    assert "| 2x30 | 10 |" in capsys.readouterr().out


def test_bad_designs_are_named(bench, tmp_path):
    for bad in ("4y60", "4x60+again", "all:4+refit"):
        with pytest.raises(EvomergeError, match="use all:N, NxM, NxM\\+refit or endpoints"):
            bench.parse_design(bad)
    check = _check_folder(tmp_path / "check", n_extra=2)
    with pytest.raises(EvomergeError, match="needs 4 extra models"):
        bench.main(["--checks", str(check), "--designs", "all:4", "--seeds", "0", "--sizes", "10"])
    with pytest.raises(EvomergeError, match="no estimate_check.json"):
        bench.main(["--checks", str(tmp_path / "nowhere"), "--designs", "all:2", "--seeds", "0", "--sizes", "10"])


def test_a_benchmark_sample_calibrates_on_its_items_only(bench, tmp_path):
    """``--sample N``: the study a benchmark entry's ``sample: N`` makes, its error still against every item."""
    check = _check_folder(tmp_path / "check")
    rows = _rows(bench, check, "--designs", "all:4,2x20", "--seeds", "0", "--sizes", "10", "--sample", "60")
    assert rows["all:4"]["answers"] == 7 * 60 and rows["2x20"]["answers"] == 3 * 60 + 2 * (10 + 20)
    assert rows["all:4"]["sample"] == 60


def test_trials_refitted_in_are_the_other_folds_held_out_merges(bench, tmp_path, monkeypatch):
    """``NxM+refit``: each held-out merge is predicted by a fit that holds the other folds' merges on the subset's
    items only (a search's trials), never its own answers; their answers are not calibration's."""
    check = _check_folder(tmp_path / "check", n_heldout=8)
    real, seen = bench.fit_design, []

    def spy(matrix, fit_names, endpoint_names, sizes, strategy, seed, dims, items, params, trial_names=()):
        estimator, answers = real(matrix, fit_names, endpoint_names, sizes, strategy, seed, dims, items, params,
                                  trial_names=trial_names)
        seen.append((list(trial_names), answers))
        return estimator, answers

    monkeypatch.setattr(bench, "fit_design", spy)
    rows = _rows(bench, check, "--designs", "2x30,2x30+refit", "--seeds", "0", "--sizes", "10")
    assert rows["2x30+refit"]["answers"] == rows["2x30"]["answers"] == 3 * 120 + 2 * (10 + 30)
    plain, folds = seen[0], seen[1:]
    assert plain[0] == [] and len(folds) == bench.REFIT_FOLDS
    heldout = [f"heldout{i:02d}" for i in range(8)]
    for trials, _ in folds:  # four folds of two: each fit holds the six others
        assert len(trials) == 6 and set(trials) < set(heldout)
    assert sorted(n for n in heldout for trials, _ in folds if n not in trials) == heldout
    with pytest.raises(EvomergeError, match="calibration on less only"):
        real(ResponseMatrix.load(responses_path(check, "synthetic")), ["base"], ["base"], [10], "anchor-irt", 0, 2,
             None, None, trial_names=["heldout00"])


def test_several_estimators_get_a_row_each_and_an_unknown_one_is_named(bench, tmp_path):
    check = _check_folder(tmp_path / "check")
    rows = _rows(bench, check, "--designs", "2x30", "--methods", "gmpirt,margin", "--seeds", "0", "--sizes", "10")
    # no margins in these answers: margin is gmp-IRT's value
    assert set(rows) == {"2x30 gmpirt", "2x30 margin"} and rows["2x30 margin"]["all"] == rows["2x30 gmpirt"]["all"]
    with pytest.raises(EvomergeError, match="unknown estimator 'irt'"):
        bench.main(["--checks", str(check), "--designs", "2x30", "--methods", "irt", "--seeds", "0", "--sizes", "10"])
