"""Racing: staged scoring, promotion against the study's top-k, export preference, kill -9 between stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from evomerge.benchmarks.kinds import Scored
from evomerge.estimate.estimators import fit_subset_estimator
from evomerge.estimate.irt import item_probabilities
from evomerge.search import racing
from evomerge.search.racing import StagedScorer
from evomerge.search.records import Ranking, TrialKey

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def staged_world():
    """Two benchmarks with staged estimators (8, 24, all of 200 items) and a candidate's full answers."""
    rng = np.random.default_rng(0)
    estimators, truth = {}, {}
    for name in ("x", "y"):
        a, b = np.abs(rng.standard_normal((200, 2))) + 0.3, rng.standard_normal(200)
        theta = rng.standard_normal((8, 2))
        rows = rng.random((9, 200)) < item_probabilities(np.vstack([theta, theta[:2].mean(0)]), a, b)
        names = [f"m{i}" for i in range(8)]
        estimators[name] = fit_subset_estimator(rows[:8], names, names[:3], [8, 24, "all"], "anchor-irt", seed=0)
        truth[name] = rows[8]
    return estimators, truth


def _scorer(staged_world, monkeypatch, threshold):
    estimators, truth = staged_world
    scored = {name: [] for name in estimators}

    def fake_score_records(model, tokenizer, bench, indices, batch_size, records):
        scored[bench].extend(indices)
        return Scored(truth[bench][indices])

    monkeypatch.setattr(racing, "score_records", fake_score_records)
    scorer = StagedScorer({n: n for n in estimators}, estimators, method="gmpirt", weights=[1.0, 1.0],
                          per_task=False, top_k=2)
    monkeypatch.setattr(scorer, "threshold", lambda: threshold)
    return scorer, scored


def test_a_contender_is_promoted_to_every_stage_scoring_each_item_once(staged_world, monkeypatch):
    scorer, scored = _scorer(staged_world, monkeypatch, threshold=None)
    values, attrs = scorer.score(None, None)
    estimators, truth = staged_world
    assert attrs[TrialKey.STAGE] == 2 and attrs[TrialKey.ITEMS] == 400
    for name in estimators:
        assert sorted(scored[name]) == list(range(200))  # nested stages: no item scored twice
        assert attrs["estimates"][name] == pytest.approx(truth[name].mean())  # the last stage is exact
        assert attrs["intervals"][name] == pytest.approx([truth[name].mean()] * 2)
    assert values == [pytest.approx(np.mean([truth[n].mean() for n in estimators]))]
    assert len(attrs[TrialKey.STAGE_FITNESS]) == 3


def test_a_baseline_is_scored_on_the_first_stage_only(staged_world, monkeypatch):
    scorer, scored = _scorer(staged_world, monkeypatch, threshold=None)  # no threshold yet: others are promoted
    values, attrs = scorer.score(None, None, promote=False)
    assert attrs[TrialKey.STAGE] == 0 and attrs[TrialKey.ITEMS] == 16
    assert all(len(indices) == 8 for indices in scored.values())


def test_a_candidate_that_cannot_reach_the_top_k_stops(staged_world, monkeypatch):
    scorer, scored = _scorer(staged_world, monkeypatch, threshold=1.01)
    values, attrs = scorer.score(None, None)
    assert attrs[TrialKey.STAGE] == 0 and attrs[TrialKey.ITEMS] == 16
    assert all(len(a) == 8 for a in attrs["answers"].values())
    low, high = attrs[TrialKey.FITNESS_INTERVAL]
    assert low <= values[0] <= high < 1.01


def test_threshold_is_the_top_k_fitness_of_every_worker(staged_world, tmp_path):
    storage = f"sqlite:///{tmp_path / 'race.db'}"
    mine = optuna.create_study(storage=storage, study_name="race", directions=["maximize", "maximize"])
    other_worker = optuna.load_study(study_name="race", storage=storage)
    estimators, _ = staged_world
    scorer = StagedScorer({n: n for n in estimators}, estimators, method="gmpirt", weights=[1.0, 3.0],
                          per_task=True, top_k=2)
    scorer.bind(mine)
    assert scorer.threshold() is None
    for values in ([0.2, 0.4], [0.8, 0.0], [0.1, 0.1]):  # weighted fitness 0.35, 0.2, 0.1
        trial = other_worker.ask()
        other_worker.tell(trial, values)
    assert scorer.threshold() == pytest.approx(0.2)


def _trial(number, value, items, interval=None):
    attrs = {TrialKey.ITEMS: items}
    if interval:
        attrs[TrialKey.FITNESS_INTERVAL] = interval
    return optuna.trial.create_trial(value=value, user_attrs=attrs)


def test_export_prefers_more_items_among_estimates_that_tie():
    noisy = _trial(0, 0.42, 30, [0.36, 0.48])
    measured = _trial(1, 0.40, 1800, [0.40, 0.40])
    worse = _trial(2, 0.30, 1800, [0.30, 0.30])
    ranking = Ranking({"t": 1.0})
    assert ranking.preferred([noisy, measured, worse]).trial is measured
    sure = _trial(3, 0.42, 30, [0.41, 0.43])
    assert ranking.preferred([sure, measured]).trial is sure
    assert ranking.preferred([_trial(4, 0.5, 30), measured]).trial.value == 0.5  # no interval stored: the best


def write_racing_space(zoo_dir: Path, path: Path, trials: int, name: str, stages) -> Path:
    from test_search_e2e import write_space

    write_space(zoo_dir, path, "cmaes", trials=trials, name=name)
    raw = yaml.safe_load(path.read_text())
    raw["estimator"].pop("subset_size")
    raw["evaluation"] = {"stages": stages, "top_k": 2}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _check_consistent(trials, sizes):
    for trial in trials:
        stage = trial.user_attrs[TrialKey.STAGE]
        answers = trial.user_attrs["answers"]
        assert all(len(a) == sizes[stage] for a in answers.values()), trial.number
        assert trial.user_attrs[TrialKey.ITEMS] == sizes[stage] * len(answers)
        low, high = trial.user_attrs[TrialKey.FITNESS_INTERVAL]
        assert low - 1e-9 <= float(np.mean(trial.values)) <= high + 1e-9  # per task: their mean


def test_racing_search_status_and_export(zoo_dir, tmp_path, capsys):
    from evomerge.cli import main
    from evomerge.trial_export import export_trial
    from evomerge.search.runs import open_existing_study

    space = write_racing_space(zoo_dir, tmp_path / "space.yaml", trials=8, name="race", stages=[5, 15, "all"])
    assert main(["search", str(space), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "race"
    study = open_existing_study(run_dir)
    trials = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)
    assert len(trials) == 8
    last = [t for t in trials if t.user_attrs[TrialKey.STAGE] == 2]
    n_items = len(last[0].user_attrs["answers"]["arith"]) if last else None
    _check_consistent(trials, [5, 15, n_items])
    baselines = [t for t in trials if "baseline" in t.user_attrs]
    assert baselines and all(t.user_attrs[TrialKey.STAGE] == 0 for t in baselines)  # reference points: first stage
    assert max(t.user_attrs[TrialKey.STAGE] for t in trials) == 2  # contenders reach the last stage
    # a trial raced onto every item is measured already: validation takes its estimates as they are
    from evomerge.search.validate import validate_top_trials

    from evomerge.search.candidates import make_builder
    from evomerge.search.runs import load_run_space

    builder = _RecordingBuilder(make_builder(load_run_space(run_dir)))
    top = validate_top_trials(run_dir, 3, progress=False, builder=builder)
    assert all(stage < 2 for stage in builder.rebuilt)
    exact = {t.number: t.user_attrs["estimates"] for t in trials if t.user_attrs[TrialKey.STAGE] == 2}
    for row in top:
        if row.number in exact:
            assert row.measured == exact[row.number]
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stage" in out and "3/3" in out and "items" in out
    exported = export_trial(run_dir, out_dir=tmp_path / "best", progress=False)
    assert "scored on" in (exported / "README.md").read_text()


class _RecordingBuilder:
    """Records the stage of every trial validation re-scores."""

    def __init__(self, builder):
        self.builder, self.tokenizer, self.rebuilt = builder, builder.tokenizer, []

    def rebuild(self, attrs):
        self.rebuilt.append(attrs[TrialKey.STAGE])
        return self.builder.rebuild(attrs)


def test_kill_between_stages_then_resume(zoo_dir, tmp_path):
    """A worker killed while a trial is between stages: the trial is failed on resume, never half-recorded."""
    from evomerge.cli import main
    from evomerge.search.runs import open_existing_study

    budget = 8
    space = write_racing_space(zoo_dir, tmp_path / "space.yaml", trials=budget, name="killed", stages=[5, 15])
    marker = tmp_path / "between-stages"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "_racing_kill_worker.py"), str(space), str(tmp_path / "runs"),
         str(marker), "1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not marker.exists() and worker.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), worker.stderr.read().decode()[-2000:] if worker.poll() is not None else "timeout"
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    run_dir = tmp_path / "runs" / "killed"
    in_flight = int(marker.read_text())
    trial = open_existing_study(run_dir).trials[in_flight]
    assert trial.state == optuna.trial.TrialState.RUNNING and "estimates" not in trial.user_attrs

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    trials = open_existing_study(run_dir).get_trials(deepcopy=False)
    assert trials[in_flight].state == optuna.trial.TrialState.FAIL
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == budget
    _check_consistent(done, [5, 15])


@pytest.mark.parametrize("optimizer, objectives", [("ng_cma", "mean"), ("nsga2", "per_task")])
def test_racing_with_other_optimizers_and_per_task_objectives(zoo_dir, tmp_path, optimizer, objectives):
    """Every optimizer sees one set of values per trial, whatever stage the trial reached."""
    from small_space import small_space

    from evomerge.cli import main
    from evomerge.search.runs import open_existing_study

    space = small_space(zoo_dir, tmp_path / "space.yaml", name="raced",
                        estimator={"subset_size": 5}, optimizer={"name": optimizer, "objectives": objectives,
                                                                  "trials": 5, "baselines": False},
                        evaluation={"stages": [5, 15, "all"], "top_k": 2})
    assert main(["search", str(space), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 0
    trials = [t for t in open_existing_study(tmp_path / "runs" / "raced").get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 5
    assert all(len(t.values) == (2 if objectives == "per_task" else 1) for t in trials)
    _check_consistent(trials, [5, 15, 60])
    assert {t.user_attrs[TrialKey.STAGE] for t in trials[:2]} == {2}  # fewer than top_k complete: promoted
