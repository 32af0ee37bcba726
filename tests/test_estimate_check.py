"""The estimate check on the (quick) model zoo: runs end to end, writes its table, CLI errors."""

import json

import numpy as np
import pytest

from evomerge.cli import main as evomerge_main
from evomerge.estimate.check import main, run_estimate_check
from evomerge.estimate.estimators import METHODS, SubsetEstimator
from evomerge.estimate.responses import ResponseMatrix, responses_path, score_model
from evomerge.search.calibration import random_genome
from evomerge.search.candidates import make_builder
from evomerge.search.space import load_search_space
from evomerge.search.space_check import space_models
from small_space import small_space


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
    assert evomerge_main(["estimate-check", *separator, "--zoo", str(tmp_path / "nozoo")]) == 2
    assert "not a model zoo" in capsys.readouterr().err


def test_a_check_on_a_search_space_scores_random_genomes_of_its_own_genes(zoo_dir, tmp_path, capsys):
    """`--space`: the endpoints are the space's base and experts, the merges random genomes of its genes
    (here TIES with a weight per expert and layer group), on its benchmarks."""
    path = small_space(zoo_dir, tmp_path / "space.yaml", name="checked",
                       merge={"granularity": "layer_group", "layer_groups": 2})
    out = tmp_path / "check"
    assert evomerge_main(["estimate-check", "--space", str(path), "--out", str(out), "--n-heldout", "2",
                          "--n-extra", "1", "--sizes", "10", "--n-timing", "0", "--device", "cpu"]) == 0
    table = json.loads((out / "estimate_check.json").read_text())
    space = load_search_space(path)
    assert table["facts"]["space"] == str(path) and table["facts"]["tasks"] == [b.name for b in space.benchmarks]
    assert table["facts"]["endpoint_names"] == ["base", *(f"expert:{e}" for e in space.expert_names)]
    matrix = ResponseMatrix.load(responses_path(out, space.benchmarks[0].name))
    assert matrix.model_names == ["base", *(f"expert:{e}" for e in space.expert_names), "extra00", "heldout00",
                                  "heldout01"]
    assert matrix.n_items == 60
    # the held-out merges are the space's genomes, drawn apart from the extra ones, and scored as the search scores them
    models = space_models(path, n_extra=1, n_heldout=2, seed=0)
    genomes = {name: spec["genome"] for name, role, spec in models.specs if role != "endpoint"}
    builder = make_builder(space)
    assert set(genomes["heldout00"]) == set(builder.genome) and genomes["heldout00"] != genomes["extra00"]
    assert genomes["heldout00"] == random_genome(builder.genome, np.random.default_rng(0 + 1_000_003))
    bench = space.benchmarks[0].load()
    answers, margins = score_model(builder.candidate(genomes["heldout01"]).model, builder.tokenizer, bench)
    assert (answers == matrix.row("heldout01")).all()
    assert np.allclose(margins, matrix.margin_row("heldout01"), atol=1e-4) and ((margins > 0) == answers).all()
    # an endpoint is the checkpoint itself
    expert = space.expert_names[0]
    answers, _ = score_model(builder.checkpoint_model(space.experts[expert]), builder.tokenizer, bench)
    assert (answers == matrix.row(f"expert:{expert}")).all()
    capsys.readouterr()


def test_space_option_needs_the_search_package(tmp_path, capsys):
    assert main(["--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "evomerge estimate-check --space" in capsys.readouterr().err
