"""End to end on the quick zoo: search, status, export round-trip, kill -9 and resume, the demo command."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.merge import MergeCore, Recipe
from evomerge.trial_export import export_trial
from evomerge.search.runs import open_existing_study, start_run

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_space(zoo_dir: Path, path: Path, optimizer: str, trials: int, name: str) -> Path:
    tasks = json.loads((zoo_dir / "zoo.json").read_text())["tasks"]
    space = {
        "name": name,
        "models": {
            "base": str(zoo_dir / "base"),
            "experts": {t: str(zoo_dir / "experts" / t) for t in tasks},
        },
        "merge": {
            "method": "ties",
            "granularity": "layer_group",
            "layer_groups": 2,
            "split_modules": True,
            "params": {"weight": [0.0, 1.5], "density": [0.3, 1.0]},
        },
        "benchmarks": [{"name": t, "path": str(zoo_dir / "bench" / f"{t}.jsonl")} for t in tasks],
        "estimator": {"method": "gmpirt", "strategy": "anchor", "subset_size": 20, "calibration_merges": 2},
        "optimizer": {"name": optimizer, "trials": trials, "seed": 0},
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def complete(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def test_search_status_export_round_trip(zoo_dir, tmp_path, capsys):
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "cmaes", trials=5, name="e2e")
    runs = tmp_path / "runs"
    assert main(["search", str(space_file), "--runs-root", str(runs), "--no-progress"]) == 0
    run_dir = runs / "e2e"
    study = open_existing_study(run_dir)
    trials = complete(study)
    assert len(trials) == 5
    for trial in trials:
        attrs = trial.user_attrs
        assert set(attrs["estimates"]) == set(attrs["answers"])
        assert all(len(a) == 20 and set(a) <= {"0", "1"} for a in attrs["answers"].values())
        assert 0.0 <= trial.values[0] <= 1.0
        Recipe.from_dict(attrs["recipe"]).validate(3)
    # the first trials are the enqueued baselines: uniform merges, then the base and each expert alone
    assert len({round(v, 6) for k, v in trials[0].params.items() if k.startswith("weight")}) == 1
    labels = [t.user_attrs.get("baseline") for t in sorted(trials, key=lambda t: t.number)]
    assert labels == ["uniform weight 1, density 0.7", "uniform weight 0.5, density 1", "base",
                      "expert arith", "expert cipher"]

    # searching again with the budget met resumes and adds nothing
    assert main(["search", str(space_file), "--runs-root", str(runs), "--no-progress"]) == 0
    assert len(complete(open_existing_study(run_dir))) == 5
    assert main(["status", str(run_dir), "--top", "2"]) == 0
    status = capsys.readouterr().out
    assert "best trials" in status and "expert cipher" in status and "base" in status  # baselines listed too

    best = max(trials, key=lambda t: t.values[0])
    out = export_trial(run_dir, out_dir=tmp_path / "export", max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1, "export should be sharded at 100KB"
    for name in ("README.md", "mergekit.yaml", "evomerge_recipe.json", "config.json"):
        assert (out / name).exists(), name
    assert f"trial: {best.number}" in (out / "README.md").read_text()
    yaml.safe_load((out / "mergekit.yaml").read_text())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    core = MergeCore(str(zoo_dir / "base"), [str(zoo_dir / "experts" / t) for t in ("arith", "cipher", "lang")])
    model, _ = core.new_model()
    core.merge_into(model, Recipe.from_dict(best.user_attrs["recipe"]), seed=best.user_attrs["merge_seed"])
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(EvomergeError, match="not a complete trial"):
        export_trial(run_dir, trial_number=999)


def test_bad_space_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: {base: /nowhere, experts: {a: /nowhere}}\nmerge: {method: soup}\n")
    assert main(["search", str(bad), "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "merge.method 'soup' is unknown" in err and "Traceback" not in err


def test_missing_model_is_one_line_error(zoo_dir, tmp_path, capsys):
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "tpe", trials=2, name="missing")
    raw = yaml.safe_load(space_file.read_text())
    raw["models"]["experts"]["arith"] = str(tmp_path / "no-such-model")
    space_file.write_text(yaml.safe_dump(raw))
    assert main(["search", str(space_file), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_kill_minus_nine_then_resume(zoo_dir, tmp_path):
    # a budget well above the kill point: a quick-zoo trial takes ~0.1 s, so the worker
    # must not be able to finish while the test polls the study
    budget = 30
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "ng_cma", trials=budget, name="killed")
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "evomerge.cli", "search", str(space_file), "--runs-root", str(runs), "--no-progress"]
    worker = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = runs / "killed" / "study.db"
    deadline = time.time() + 240
    done_before = []
    try:
        while time.time() < deadline and worker.poll() is None:
            time.sleep(0.2)
            if db.exists():
                try:
                    done_before = complete(open_existing_study(runs / "killed"))
                except Exception:  # the database may be mid-creation
                    continue
                if len(done_before) >= 4:
                    break
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
        assert len(done_before) >= 4, "search did not get going"
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    study = open_existing_study(runs / "killed")
    before = complete(study)
    best_before = max(t.values[0] for t in before)
    assert len(before) < budget

    space, run_dir = start_run(space_file, runs)
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    trials = open_existing_study(run_dir).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == budget, [(t.number, t.state.name, t.params == {}, dict(t.user_attrs)) for t in trials
                             if t.state != optuna.trial.TrialState.COMPLETE]
    assert len({t.number for t in trials}) == len(trials)
    genomes = {tuple(round(v, 9) for v in t.params.values()) for t in done}
    assert len(genomes) == len(done), "a genome was evaluated twice"
    lost = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert len(lost) <= 1
    assert max(t.values[0] for t in done) >= best_before
    assert np.all([t.number for t in before] == sorted(t.number for t in before))


def test_demo_command_searches_exports_and_compares(zoo_dir, tmp_path, monkeypatch, capsys):
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "tpe", trials=3, name="demo")
    monkeypatch.chdir(tmp_path)  # the demo writes runs/demo/ under the working directory
    assert main(["demo", "--space", str(space_file), "--validate-top", "2"]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "runs" / "demo" / "best" / "mergekit.yaml").is_file()
    assert "evolved merge mean accuracy" in captured.err.splitlines()[-1]  # the verdict comes last on stderr
    assert "evolved (exported)" in captured.out + captured.err  # the comparison table
    # each phase says when it starts and what it took; outside a terminal the bar logs its time left
    for phase in ("calibration", "search", "validation", "final table"):
        assert f"{phase}: started" in captured.err and re.search(rf"{phase}: done in \d+ (s|min)", captured.err), phase
    assert re.search(r"search: 3/3, \d+ s elapsed", captured.err)


def test_demo_zoo_seed_points_the_space_at_its_own_zoo_and_run(tmp_path, monkeypatch):
    from evomerge.demo import seeded_space
    from evomerge.search.space import load_search_space

    monkeypatch.chdir(tmp_path)
    space = seeded_space(REPO / "search_spaces" / "demo.yaml", 2)
    assert space == Path("runs") / "demo-seed2.yaml"
    loaded = load_search_space(space)
    assert loaded.name == "demo-seed2" and loaded.zoo == str(tmp_path / "runs" / "zoo-seed2")
    assert loaded.base == str(tmp_path / "runs" / "zoo-seed2" / "base")
    assert all("/runs/zoo-seed2/" in b.path for b in loaded.benchmarks)


def test_per_task_objectives_search_and_export(zoo_dir, tmp_path):
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "nsga2", trials=4, name="multi")
    raw = yaml.safe_load(space_file.read_text())
    raw["optimizer"]["objectives"] = "per_task"
    space_file.write_text(yaml.safe_dump(raw))
    assert main(["search", str(space_file), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 0
    study = open_existing_study(tmp_path / "runs" / "multi")
    assert len(study.directions) == len(raw["benchmarks"])
    assert len(complete(study)) == 4
    exported = export_trial(tmp_path / "runs" / "multi", out_dir=tmp_path / "best")
    assert (exported / "evomerge_recipe.json").is_file()


def test_validate_top_trials_then_export_the_best_measured(zoo_dir, tmp_path, capsys):
    from evomerge.benchmarks import accuracy, load_benchmark
    from evomerge.search.records import validated_accuracies
    from evomerge.search.validate import records_path

    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "random", trials=4, name="val")
    run_dir = tmp_path / "runs" / "val"
    assert main(["search", str(space_file), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert main(["validate", str(run_dir), "--top", "3", "--all-items"]) == 0
    assert "estimated vs validated" in capsys.readouterr().out
    measured = validated_accuracies(open_existing_study(run_dir))
    assert len(measured) == 3
    for number, scores in measured.items():  # each item's answer, to see why it failed
        records = [json.loads(line) for line in records_path(run_dir, number, "arith").read_text().splitlines()]
        assert len(records) == 500 and np.mean([r["correct"] for r in records]) == pytest.approx(scores["arith"])
        assert set(records[0]) >= {"id", "prompt", "generation", "extracted", "target", "correct"}

    exported = export_trial(run_dir, out_dir=tmp_path / "best", validate_top=3, progress=False)
    best = max(measured, key=lambda n: sum(measured[n].values()))
    card = (exported / "README.md").read_text()
    assert f"trial: {best}" in card and "measured accuracy (all items)" in card
    for figure in ("figures/genome.png", "figures/fitness.png"):  # the card shows the genome and the search
        assert f"]({figure})" in card and (exported / figure).read_bytes().startswith(b"\x89PNG")
    # the stored figure is what the exported checkpoint scores
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    bench = load_benchmark(zoo_dir / "bench" / "lang.jsonl", name="lang")
    assert accuracy(model, tokenizer, bench) == pytest.approx(measured[best]["lang"], abs=1e-9)


def test_generate_benchmark_through_search_validate_and_eval(zoo_dir, zoo_answer_benches, tmp_path, capsys):
    """Generated answers feed calibration, the estimator, trials, validation and eval like the other kinds."""
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "random", trials=3, name="gen")
    raw = yaml.safe_load(space_file.read_text())
    raw["benchmarks"] = [{"name": "arith", "path": str(zoo_answer_benches["arith"]), "scoring": "generate",
                          "max_new_tokens": 6, "extract": "last_number", "compare": "numeric"},
                         {"name": "lang", "path": str(zoo_dir / "bench" / "lang.jsonl")}]
    raw["estimator"]["calibration_merges"] = 1
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = tmp_path / "runs" / "gen"
    assert main(["search", str(space_file), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 0
    study = open_existing_study(run_dir)
    assert len(complete(study)) == 3 and all(len(t.user_attrs["answers"]["arith"]) == 20 for t in complete(study))
    assert main(["validate", str(run_dir), "--top", "1", "--all-items"]) == 0
    (validated,) = (run_dir / "validation").iterdir()
    records = [json.loads(line) for line in (validated / "arith.jsonl").read_text().splitlines()]
    assert len(records) == 500 and {r["finish"] for r in records} <= {"eos", "stop", "length"}
    assert main(["eval", str(zoo_dir / "experts" / "arith"), "--space", str(run_dir),
                 "--records", str(tmp_path / "answers")]) == 0
    evaluated = [json.loads(line) for line in (tmp_path / "answers" / "arith" / "arith.jsonl").read_text().splitlines()]
    assert len(evaluated) == 500 and any(r["correct"] for r in evaluated)
    assert all(r["correct"] == (r["extracted"] is not None and float(r["extracted"]) == float(r["target"]))
               for r in evaluated)
