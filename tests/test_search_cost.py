"""What a search costs: counted per phase in the study, calibration on less, item parameters reused, a
validation race (issue 26)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.estimate import ItemParams, ResponseMatrix, SubsetEstimator, responses_path
from evomerge.search import costs
from evomerge.search.calibration import estimator_path
from evomerge.search.costs import CostLedger, study_costs
from evomerge.search.item_bank import BANK_DIR
from evomerge.search.records import Ranking, StudyKey, complete_trials, sampled_validations
from evomerge.search.runs import load_run_space, open_existing_study
from evomerge.search.space import load_search_space
from evomerge.trial_export import export_trial

from small_space import small_space
from test_data_merging import data_space

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _search(space, runs) -> None:
    assert main(["search", str(space), "--runs-root", str(runs), "--no-progress"]) == 0


def test_a_search_records_and_prints_what_each_phase_costs(zoo_dir, tmp_path, capsys, monkeypatch):
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="cost",
                        estimator={"calibration_merges": 2, "calibration_items": 15})
    _search(space, tmp_path / "runs")
    study = open_existing_study(tmp_path / "runs" / "cost")
    spent = study_costs(study)
    # base and 2 experts on all 60 items of 2 benchmarks; 2 merges on the 10 subset items and 15 others
    assert spent["calibration"].items == 3 * 60 * 2 + 2 * (10 + 15) * 2
    assert spent["calibration"].models == 5 * 2 and spent["calibration"].seconds > 0
    scored = [t for t in complete_trials(study) if "duplicate_of" not in t.user_attrs]
    assert spent["trials"].items == 10 * 2 * len(scored) and spent["trials"].models == 3
    out = capsys.readouterr().out
    assert "what the run spent" in out and "calibration" in out and f"{spent['calibration'].items:,}" in out

    # workers sharing the study each keep their own figures: nothing is overwritten, the totals add up
    monkeypatch.setattr(costs, "worker_identity", lambda: {"host": "elsewhere", "pid": 7, "start": 1})
    other = CostLedger(study, "trials")
    other.add(items=40, seconds=2.0, models=2, flush=True)
    assert study_costs(study)["trials"].items == spent["trials"].items + 40
    assert main(["status", str(tmp_path / "runs" / "cost")]) == 0
    assert f"{spent['trials'].items + 40:,}" in capsys.readouterr().out
    with pytest.raises(Exception, match="unknown cost phase"):
        CostLedger(study, "lunch")


def test_data_statistics_and_learning_are_phases_of_their_own(zoo_dir, tmp_path, capsys):
    """A data-informed search counts the prompts its statistics and its learning read (16 per benchmark)."""
    sampled = {"calibration_merges": 2, "calibration_items": 15}
    regmean = data_space(zoo_dir, tmp_path / "regmean.yaml", "rm", "regmean", estimator=sampled, optimizer={"trials": 3})
    _search(regmean, tmp_path / "runs")
    spent = study_costs(open_existing_study(tmp_path / "runs" / "rm"))
    assert (spent["statistics"].items, spent["statistics"].models) == (2 * 16, 2)  # each expert, its task's prompts
    assert spent["calibration"].items == 3 * 60 * 2 + 2 * 25 * 2 and "learning" not in spent
    assert "statistics (prompts)" in capsys.readouterr().out
    assert main(["resume", str(tmp_path / "runs" / "rm"), "--trials", "4", "--no-progress"]) == 0
    assert study_costs(open_existing_study(tmp_path / "runs" / "rm"))["statistics"] == spent["statistics"]  # kept

    learned = data_space(zoo_dir, tmp_path / "learned.yaml", "learned", "task_arithmetic", estimator=sampled,
                         optimizer={"name": "cmaes", "trials": 3, "init": "learned", "baselines": False},
                         learn={"steps": 5, "batch": 4})
    _search(learned, tmp_path / "runs")
    study = open_existing_study(tmp_path / "runs" / "learned")
    spent = study_costs(study)
    assert (spent["learning"].items, spent["learning"].models) == (5 * 2 * 4, 1) and spent["learning"].seconds > 0
    assert "statistics" not in spent and spent["calibration"].items == 3 * 10 * 2  # the item bank's, from "rm"
    assert any(t.user_attrs.get("baseline", "").startswith("adamerging") for t in complete_trials(study))


def test_item_parameters_are_reused_by_the_next_study_on_the_same_benchmarks(zoo_dir, tmp_path):
    runs = tmp_path / "runs"
    first = small_space(zoo_dir, tmp_path / "first.yaml", name="first",
                        estimator={"calibration_merges": 2, "calibration_items": 15})
    _search(first, runs)
    bank = sorted((runs / BANK_DIR).glob("*.json"))
    assert [p.name.split("-")[0] for p in bank] == ["arith", "cipher"]
    # another study on the same benchmarks (another merge space): no item parameters to fit
    second = small_space(zoo_dir, tmp_path / "second.yaml", name="second",
                         merge={"method": "task_arithmetic", "params": {"weight": [0.0, 1.0]}},
                         estimator={"calibration_merges": 2, "calibration_items": 15})
    _search(second, runs)
    spent = study_costs(open_existing_study(runs / "second"))
    assert spent["calibration"].items == 3 * 10 * 2  # the endpoints on the 10 subset items, for their abilities
    for task in ("arith", "cipher"):
        mine = SubsetEstimator.load(estimator_path(runs / "second", task))
        theirs = SubsetEstimator.load(estimator_path(runs / "first", task))
        assert np.array_equal(mine.a, theirs.a) and list(mine.indices) == list(theirs.indices)
        assert mine.stages[0].anchor_weight_gmpirt == theirs.stages[0].anchor_weight_gmpirt
        matrix = ResponseMatrix.load(responses_path(runs / "second", task))
        assert not matrix.complete("base") and matrix.observed_row("base").sum() == 10
    # a space asking for other latent dimensions fits its own parameters
    other_dims = small_space(zoo_dir, tmp_path / "dims.yaml", name="dims",
                             estimator={"calibration_merges": 2, "calibration_items": 15, "dims": 1})
    _search(other_dims, runs)
    assert study_costs(open_existing_study(runs / "dims"))["calibration"].items == 3 * 60 * 2 + 2 * 25 * 2
    # `item_params: fit` fits its own, as before
    third = small_space(zoo_dir, tmp_path / "third.yaml", name="third",
                        estimator={"calibration_merges": 2, "calibration_items": 15, "item_params": "fit"})
    _search(third, runs)
    assert study_costs(open_existing_study(runs / "third"))["calibration"].items == 3 * 60 * 2 + 2 * 25 * 2


def test_item_parameters_from_a_file(zoo_dir, tmp_path):
    rng = np.random.default_rng(0)
    ids = [json.loads(line)["id"] for line in (zoo_dir / "bench" / "arith.jsonl").read_text().splitlines()[:60]]
    a, b = rng.normal(size=(1, 2, 60)), rng.normal(size=(1, 1, 60))  # tinyBenchmarks' layout
    anchors = rng.choice(60, 10, replace=False)
    np.savez(tmp_path / "arith.npz", A=a, B=b, item_ids=np.array(ids[::-1]), seen_examples=np.array(anchors),
             examples_weights=np.full(10, 0.1), optimal_lambda=np.array(0.8))
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="filed",
                        estimator={"calibration_merges": 0, "item_params": {"arith": str(tmp_path / "arith.npz")}})
    _search(space, tmp_path / "runs")
    run = tmp_path / "runs" / "filed"
    estimator = SubsetEstimator.load(estimator_path(run, "arith"))
    expected = ItemParams.load(tmp_path / "arith.npz").for_items(ids, "arith")
    assert np.allclose(estimator.a, expected.a) and np.allclose(estimator.b, 2 * b[0, 0, ::-1])
    assert sorted(estimator.indices) == sorted(59 - anchors)  # the file's anchors, matched by item id
    assert estimator.anchor_weight_gmpirt == 0.8  # no merge to cross-validate on: the file's lambda
    spent = study_costs(open_existing_study(run))
    assert spent["calibration"].items == 3 * 10 + 3 * 60  # arith: endpoints on its anchors; cipher: fitted
    bad = small_space(zoo_dir, tmp_path / "bad.yaml", estimator={"item_params": {"mmlu": str(tmp_path / "arith.npz")}})
    with pytest.raises(EvomergeError, match=r"estimator.item_params names \['mmlu'\], which are not benchmarks"):
        load_search_space(bad)


def test_validation_races_the_top_trials_on_a_sample_of_the_items(zoo_dir, tmp_path, capsys):
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="race", items=200,
                        optimizer={"name": "random", "trials": 5, "seed": 0})
    runs = tmp_path / "runs"
    _search(space, runs)
    run = runs / "race"
    assert main(["validate", str(run), "--top", "3", "--items", "60"]) == 0
    assert "estimated vs validated" in capsys.readouterr().out
    study = open_existing_study(run)
    sampled = sampled_validations(study)
    assert sampled, "a race of 60 items per benchmark over 190 others measures nothing in full"
    spent = study_costs(study)["validation"]
    assert 0 < spent.items <= 60 * 2
    for number, record in sampled.items():
        assert set(record["accuracy"]) == {"arith", "cipher"} and all(10 < n < 200 for n in record["items"].values())
        lines = (run / "validation" / f"trial{number}" / "arith.jsonl").read_text().splitlines()
        assert len(lines) == record["items"]["arith"] - 10  # one record per item the race scored
    ranking = Ranking.of(load_run_space(run))
    winner = ranking.winner(study)
    standing = {n: v for n, v in ranking.validated(study).items() if not sampled.get(n, {}).get("raced_out")}
    assert winner.trial.number == max(standing, key=lambda n: ranking.mean(standing[n]))
    assert "validated" in winner.reason and not sampled.get(winner.trial.number, {}).get("raced_out")
    exported = export_trial(run, out_dir=tmp_path / "best", validate_top=3, progress=False)
    assert "validated accuracy (a race on a sample of the items)" in (exported / "README.md").read_text()
    assert study_costs(open_existing_study(run))["validation"].items == spent.items  # nothing scored twice
    assert not any(k.startswith(StudyKey.FULL_ACCURACY) for k in study.user_attrs)


def test_a_benchmark_sample_is_what_the_whole_study_scores(zoo_dir, tmp_path, capsys):
    """``sample: N``: calibration, trials and the race see N items, the endpoints answer N each (a first study
    of a large benchmark costs what N items cost), and `eval --whole` scores every item of the space's files."""
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="sampled", items=120,
                        estimator={"calibration_merges": 2, "calibration_items": 15})
    raw = load_search_space(space).raw
    raw["benchmarks"] = [{**entry, "sample": 40} for entry in raw["benchmarks"]]
    space.write_text(json.dumps(raw))
    _search(space, tmp_path / "runs")
    run = tmp_path / "runs" / "sampled"
    study = open_existing_study(run)
    assert study_costs(study)["calibration"].items == 3 * 40 * 2 + 2 * (10 + 15) * 2  # 40, not 120, per endpoint
    assert all(SubsetEstimator.load(estimator_path(run, entry["name"])).n_total == 40 for entry in raw["benchmarks"])
    assert main(["validate", str(run), "--top", "2"]) == 0
    assert all(sum(v["items"].values()) <= 2 * 40 for v in sampled_validations(open_existing_study(run)).values())
    expert = str(zoo_dir / "experts" / raw["benchmarks"][0]["name"])
    capsys.readouterr()
    assert main(["eval", expert, "--space", str(run), "--records", str(tmp_path / "a")]) == 0
    assert "accuracy on the benchmarks' samples (80 items;" in " ".join(capsys.readouterr().out.split())
    assert main(["eval", expert, "--space", str(run), "--whole", "--records", str(tmp_path / "b")]) == 0
    assert "full-benchmark accuracy (240 items)" in " ".join(capsys.readouterr().out.split())
