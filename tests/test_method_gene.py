"""The merge method as a gene: `merge: {method: [ties, dare_ties, della]}` searches the method too."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.estimate import ResponseMatrix, responses_path
from evomerge.search.costs import study_costs
from evomerge.search.genome import METHOD_GENE, genome_space, genome_to_recipe, uniform_genome
from evomerge.search.runs import open_existing_study
from evomerge.search.space import load_search_space

sys.path.insert(0, str(Path(__file__).parent))
from small_space import small_space  # noqa: E402

METHODS = ["ties", "dare_ties", "della"]


def method_space(zoo_dir, path, optimizer="tpe", trials=6, **sections):
    small_space(zoo_dir, path, name="methods", optimizer={"name": optimizer, "trials": trials}, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["merge"] = {"method": METHODS, "granularity": "global", "params": {"weight": [0.0, 1.2], "epsilon": [0.05, 0.14]}}
    if optimizer is None:
        raw["optimizer"].pop("name")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_method_is_a_categorical_gene_and_inactive_parameters_stay_out(zoo_dir, tmp_path):
    space = load_search_space(method_space(zoo_dir, tmp_path / "space.yaml", optimizer=None))
    assert space.optimizer == "tpe"  # searching the method: TPE by default, not CMA-ES
    merge = space.merge
    assert merge.methods == tuple(METHODS) and merge.searches_method
    genes = genome_space(merge, space.expert_names, 4)
    assert genes[METHOD_GENE].choices == tuple(METHODS)
    assert {g.param for g in genes.values()} == {"method", "weight", "density", "epsilon"}
    for method in METHODS:
        recipe = genome_to_recipe(merge, space.expert_names, uniform_genome(genes, {"method": method}), 4)
        assert recipe.method == method
        assert ("epsilon" in recipe.params) == (method == "della")  # inactive in the other methods' trials


def test_cmaes_is_refused_clearly(zoo_dir, tmp_path):
    with pytest.raises(EvomergeError, match="optimizer.name: optimizer 'cmaes' has no categorical dimension"):
        load_search_space(method_space(zoo_dir, tmp_path / "space.yaml", optimizer="cmaes"))


@pytest.mark.parametrize("optimizer", ["tpe", "ng_ngopt"])
def test_a_search_over_methods_records_and_shows_each_trials_method(zoo_dir, tmp_path, capsys, optimizer):
    space = method_space(zoo_dir, tmp_path / "space.yaml", optimizer=optimizer, trials=9)
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    study = optuna.load_study(study_name="methods", storage=f"sqlite:///{run_dir / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 9
    for trial in done:
        assert trial.params["method"] in METHODS and trial.user_attrs["recipe"]["method"] == trial.params["method"]
    baselines = [t.user_attrs.get("baseline", "") for t in done]
    assert any(b.startswith("della, uniform") for b in baselines)  # each method's uniform merges
    out = capsys.readouterr().out
    assert "method" in out and "della" in out
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0


def test_a_calibration_on_sampled_items_draws_the_method_too(zoo_dir, tmp_path):
    space = method_space(zoo_dir, tmp_path / "space.yaml", trials=3,
                         estimator={"calibration_merges": 3, "calibration_items": 15})
    run_dir = tmp_path / "run"
    assert main(["search", str(space), "--run-dir", str(run_dir), "--no-progress"]) == 0
    # the endpoints on all 60 items; each calibration merge (a drawn method and its parameters) on 10 + 15
    assert study_costs(open_existing_study(run_dir))["calibration"].items == 3 * 60 * 2 + 3 * 25 * 2
    matrix = ResponseMatrix.load(responses_path(run_dir, "arith"))
    assert [int(matrix.observed_row(f"calib{i}").sum()) for i in range(3)] == [25, 25, 25]
