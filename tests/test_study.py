"""Studies: stored genomes and attrs, resume to the budget, config checks, stale trials, kill -9."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

import evomerge.search.workers as workers_module
from evomerge.errors import EvomergeError
from evomerge.search.driver import SearchDriver
from evomerge.search.optimizers import make_optimizer
from evomerge.search.records import Ranking, best_trials
from evomerge.search.storage import storage_url
from evomerge.search.study import open_study
from evomerge.search.workers import fail_stale_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"w0": (0.0, 1.0), "w1": (0.0, 1.0)}
CONFIG = {"optimizer": "tpe", "genome_space": SPACE, "tasks": ["arith", "copy"], "n_trials": 10}
WORKER = Path(__file__).with_name("_toy_search_worker.py")


def toy(params):
    value = 1 - (params["w0"] - 0.6) ** 2 - (params["w1"] - 0.2) ** 2
    answers = np.array([1, 0, 1], dtype=bool)
    return [value], {"answers": {"arith": "101"}, "correct": answers, "estimate": np.float32(value)}


def complete(study):
    return study.get_trials(states=(TrialState.COMPLETE,))


def search(run_dir, name, n_trials, optimizer="tpe", objective=toy, config=None):
    config = dict(config or CONFIG, n_trials=n_trials)
    study = open_study(run_dir, name, ["maximize"], config)
    driver = SearchDriver(study, make_optimizer(optimizer, SPACE, ["maximize"], seed=5), progress=False)
    driver.run(objective, n_trials)
    return study


def test_storage_url(tmp_path):
    assert storage_url(tmp_path / "run") == f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    assert (tmp_path / "run").is_dir()
    assert storage_url("postgresql://u@db/evo") == "postgresql://u@db/evo"


def test_trials_store_genome_values_and_attrs(tmp_path):
    search(tmp_path, "s", 4)
    reloaded = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    trial = complete(reloaded)[0]
    assert set(trial.params) == set(SPACE)
    assert isinstance(trial.distributions["w0"], optuna.distributions.FloatDistribution)
    assert trial.user_attrs["answers"] == {"arith": "101"}
    assert trial.user_attrs["correct"] == [True, False, True]
    assert trial.user_attrs["wall_time_s"] >= 0
    assert trial.user_attrs["worker"]["pid"] == os.getpid()
    assert reloaded.user_attrs["evomerge_config"]["tasks"] == ["arith", "copy"]


@pytest.mark.parametrize("optimizer", ["tpe", "ng_de"])
def test_resume_continues_exactly_to_a_larger_budget(tmp_path, optimizer):
    config = dict(CONFIG, optimizer=optimizer)
    first = search(tmp_path, "s", 8, optimizer=optimizer, config=config)
    best_before = first.best_value
    genomes_before = {tuple(t.params.values()) for t in complete(first)}
    study = search(tmp_path, "s", 14, optimizer=optimizer, config=config)
    trials = complete(study)
    assert len(trials) == 14
    assert sorted(t.number for t in trials) == list(range(14))
    assert study.best_value >= best_before
    new_genomes = {tuple(t.params.values()) for t in trials} - genomes_before
    assert len(new_genomes) == 6  # no point re-proposed after the resume
    # resuming at the budget does nothing
    study = search(tmp_path, "s", 14, optimizer=optimizer, config=config)
    assert len(study.trials) == 14


def test_changed_config_is_refused_but_budget_may_grow(tmp_path):
    search(tmp_path, "s", 3)
    changed = dict(CONFIG, genome_space={"w0": (0.0, 1.0), "w1": (0.0, 2.0)})
    with pytest.raises(EvomergeError, match=r"changed: genome_space\.w1"):
        open_study(tmp_path, "s", ["maximize"], changed)
    with pytest.raises(EvomergeError, match="changed: tasks"):
        open_study(tmp_path, "s", ["maximize"], dict(CONFIG, tasks=["arith"]))
    with pytest.raises(EvomergeError, match="directions"):
        open_study(tmp_path, "s", ["minimize"], CONFIG)
    study = open_study(tmp_path, "s", ["maximize"], dict(CONFIG, n_trials=50))
    assert study.user_attrs["evomerge_config"]["n_trials"] == 50


def test_a_study_without_results_takes_a_new_config(tmp_path):
    """A first start that failed or was killed before any trial completed never blocks the study."""
    first = open_study(tmp_path, "s", ["maximize"], CONFIG)
    first.enqueue_trial({"w0": 0.5, "w1": 0.5})
    assert open_study(tmp_path, "s", ["maximize"], CONFIG).trials[0].state == TrialState.WAITING  # kept
    changed = dict(CONFIG, genome_space={"w0": (0.0, 1.0), "w1": (0.0, 2.0)})
    study = open_study(tmp_path, "s", ["maximize"], changed)
    assert study.user_attrs["evomerge_config"]["genome_space"]["w1"] == [0.0, 2.0]
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # enqueued under the old config
    study = open_study(tmp_path, "s", ["maximize", "maximize"], changed)  # directions too
    assert len(study.directions) == 2 and study.trials == []
    with pytest.raises(EvomergeError, match="cannot open study storage"):
        open_study("nosuchdriver://x/y", "s", ["maximize"], CONFIG)


def test_workers_racing_to_create_a_study_end_with_one(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        studies = list(pool.map(lambda _: open_study(tmp_path, "s", ["maximize"], CONFIG), range(4)))
    assert len({s._study_id for s in studies}) == 1
    assert optuna.study.get_all_study_names(storage_url(tmp_path)) == ["s"]


def test_failed_objective_fails_the_trial_and_search_goes_on(tmp_path):
    calls = []

    def flaky(params):
        calls.append(params)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if len(calls) == 4:
            raise EvomergeError("benchmark 'arith': item 'q7' has no answer")
        return toy(params)

    study = search(tmp_path, "s", 5, objective=flaky)
    assert len(complete(study)) == 5
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs["error"] for t in failed] == ["OutOfMemoryError: CUDA out of memory",
                                                       "EvomergeError: benchmark 'arith': item 'q7' has no answer"]
    assert len(best_trials(study)) == 1


def test_a_bug_in_a_late_trial_stops_the_run_with_its_traceback(tmp_path):
    """A programming error is never swallowed as one more failed trial: the trial is marked failed
    (its message kept) and the run stops with the error itself."""
    calls = []

    def buggy(params):
        calls.append(params)
        if len(calls) == 4:
            raise KeyError("task 'arith' has no estimator")
        return toy(params)

    with pytest.raises(KeyError, match="no estimator"):
        search(tmp_path, "s", 10, objective=buggy)
    study = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    assert study.trials[3].user_attrs["error"] == "KeyError: \"task 'arith' has no estimator\""


def test_a_broken_input_stops_after_three_failures(tmp_path):
    def broken(params):
        raise EvomergeError("benchmark 'arith' has no estimator")

    with pytest.raises(EvomergeError, match="first 3 trials all failed.*no estimator"):
        search(tmp_path, "s", 10, objective=broken)


def test_wrong_number_of_values_fails_the_trial(tmp_path):
    with pytest.raises(EvomergeError, match="2 values for 1 objectives"):
        search(tmp_path, "s", 5, objective=lambda p: ([1.0, 2.0], {}))


def test_only_dead_workers_of_this_host_are_stale(tmp_path):
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    workers = {
        "dead": {"host": socket.gethostname(), "pid": int(dead.stdout), "start": None},
        "alive": {"host": socket.gethostname(), "pid": os.getpid(), "start": None},
        "elsewhere": {"host": "another-machine", "pid": int(dead.stdout), "start": None},
    }
    for kind, worker in workers.items():
        trial = study.ask({"w0": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("kind", kind)
    assert fail_stale_trials(study) == [0]
    states = {t.user_attrs["kind"]: t.state for t in study.trials}
    assert states == {"dead": TrialState.FAIL, "alive": TrialState.RUNNING, "elsewhere": TrialState.RUNNING}
    assert "died" in study.trials[0].user_attrs["error"]


def test_a_trial_orphaned_before_naming_its_worker_is_failed_after_a_grace(tmp_path, monkeypatch):
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    study.ask({"w0": optuna.distributions.FloatDistribution(0, 1)})  # no worker attr: died right after ask
    assert fail_stale_trials(study) == []  # could still be a live worker about to name itself
    monkeypatch.setattr(workers_module, "UNNAMED_GRACE_S", -1.0)
    assert fail_stale_trials(study) == [0]
    assert "before naming itself" in study.trials[0].user_attrs["error"]


def test_a_trial_orphaned_before_naming_its_worker_holds_no_budget(tmp_path):
    """A kill between creating a trial and naming its worker must not end the resume one trial short."""
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    SearchDriver(study, make_optimizer("random", SPACE, "maximize"), progress=False).run(toy, 2)
    study.ask({"w0": optuna.distributions.FloatDistribution(0, 1)})  # the orphan, younger than the grace
    resumed = open_study(tmp_path, "s", ["maximize"], CONFIG)
    SearchDriver(resumed, make_optimizer("random", SPACE, "maximize"), progress=False).run(toy, 3)
    assert len(complete(resumed)) == 3


def test_the_driver_records_its_worker_on_each_trial(tmp_path):
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    SearchDriver(study, make_optimizer("random", SPACE, "maximize"), progress=False).run(toy, 1)
    assert study.trials[0].user_attrs["worker"]["pid"] == os.getpid()


def test_best_trials_multi_objective(tmp_path):
    study = open_study(tmp_path, "m", ["maximize", "maximize"], CONFIG)
    driver = SearchDriver(study, make_optimizer("random", SPACE, ["maximize", "maximize"], seed=0), progress=False)
    driver.run(lambda p: ([p["w0"], 1 - p["w0"]], {}), 6)
    assert len(best_trials(study)) == 6  # every point of this line is Pareto optimal


def test_progress_bar_runs(tmp_path):
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    SearchDriver(study, make_optimizer("random", SPACE, "maximize"), progress=True).run(toy, 3)
    assert len(complete(study)) == 3


def _start_worker(run_dir, optimizer, n_trials, mode):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(run_dir), optimizer, str(n_trials), mode, "0.2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("optimizer", ["tpe", "ng_cma"])
def test_kill_9_then_resume_reaches_the_budget(tmp_path, optimizer):
    budget = 14
    worker = _start_worker(tmp_path, optimizer, budget, "new")
    deadline = time.monotonic() + 60
    log = tmp_path / "evaluated.jsonl"
    # the 7th genome logged means 6 trials are told and the 7th is inside its objective
    while not log.exists() or len(log.read_text().splitlines()) < 7:
        assert worker.poll() is None, worker.stdout.read().decode()
        assert time.monotonic() < deadline, "the worker completed too few trials"
        time.sleep(0.02)
    time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    before = optuna.load_study(study_name="toy", storage=storage_url(tmp_path))
    before_complete = complete(before)
    assert 6 <= len(before_complete) < budget
    best_before = before.best_value
    evaluated_before = (tmp_path / "evaluated.jsonl").read_text().splitlines()

    resumed = _start_worker(tmp_path, optimizer, budget, "resume")
    output = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, output

    study = optuna.load_study(study_name="toy", storage=storage_url(tmp_path))
    trials = study.trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len(complete(study)) == budget
    lost = [t for t in trials if t.state != TrialState.COMPLETE]
    assert len(lost) <= 1  # the one killed mid-objective, unless the kill fell between trials
    assert all(t.state == TrialState.FAIL and "died" in t.user_attrs["error"] for t in lost)
    genomes = [tuple(t.params.values()) for t in complete(study)]
    assert len(genomes) == len(set(genomes))
    assert study.best_value >= best_before
    # after the resume the optimizer proposed only new points
    evaluated_after = (tmp_path / "evaluated.jsonl").read_text().splitlines()[len(evaluated_before):]
    assert len(evaluated_after) == budget - len(before_complete)
    assert not set(evaluated_after) & set(evaluated_before)
    assert {tuple(json.loads(line).values()) for line in evaluated_after}.isdisjoint(
        tuple(t.params.values()) for t in before_complete
    )


def test_per_task_ranking_uses_benchmark_weights():
    study = optuna.create_study(directions=["maximize", "maximize"])
    for values in ([0.9, 0.1], [0.2, 0.7]):
        study.add_trial(optuna.trial.create_trial(values=values))
    ranked = Ranking({"a": 1.0, "b": 1.0}).ranked(study)
    assert [t.number for t in ranked] == [0, 1]                                      # plain mean: 0.50 vs 0.45
    assert [t.number for t in Ranking({"a": 1.0, "b": 2.0}).ranked(study)] == [1, 0]  # weighted: 0.37 vs 0.53


def test_a_genome_already_evaluated_is_not_scored_again(tmp_path):
    """Optuna's CMA-ES proposes trial 2's genome again at trial 12 (seed 0, two enqueued trials)."""
    genes = {f"g{i}": (0.0, 1.2) for i in range(30)}
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    for k in range(2):
        study.enqueue_trial({name: 0.5 + 0.1 * k for name in genes})
    calls = []

    def objective(params):
        calls.append(params)
        return [sum(params.values())], {"estimates": {"t": 0.5}}

    SearchDriver(study, make_optimizer("cmaes", genes, ["maximize"], seed=0), progress=False).run(objective, 13)
    duplicates = [t for t in complete(study) if "duplicate_of" in t.user_attrs]
    assert [(t.number, t.user_attrs["duplicate_of"]) for t in duplicates] == [(12, 2)]
    assert len(calls) == 12  # 13 complete trials, 12 scored
    source = study.trials[2]
    assert duplicates[0].values == source.values and duplicates[0].user_attrs["estimates"] == {"t": 0.5}


@pytest.fixture
def python_sigint_handler():
    """Python's Ctrl-C handler, even where the test runner was started in the background (which
    ignores SIGINT, so no KeyboardInterrupt would come); restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["ask", "tell"])
def test_ctrl_c_during_the_storage_writes_leaves_no_running_trial(tmp_path, monkeypatch, where, python_sigint_handler):
    study = open_study(tmp_path, "s", ["maximize"], CONFIG)
    real = getattr(study, where)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # lands in the middle of the optimizer's ask / tell
        return real(*args, **kwargs)

    monkeypatch.setattr(study, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        SearchDriver(study, make_optimizer("random", SPACE, "maximize"), progress=True).run(toy, 3)
    (trial,) = study.get_trials(deepcopy=False)
    if where == "ask":
        assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == "interrupted"
    else:
        assert trial.state == TrialState.COMPLETE  # the tell finished, then the interrupt


def test_progress_outside_a_terminal_is_plain_lines_only(capsys):
    """In a log file the bar is a plain line per tenth of the way, and rich's finished bar is not printed."""
    from evomerge.console import progress_bar

    with progress_bar("search", 10) as bar:
        for done in range(1, 11):
            bar.update(done, "best: 0.5")
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "search: 5/10" in text and "search: 10/10" in text and "left" in text
    assert "━" not in text
