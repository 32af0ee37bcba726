"""What can be checked before calibration is checked before it, naming the key or file at fault;
suspicious input (NaN weights, duplicate item ids, more layer groups than layers) is warned about."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.benchmarks import Benchmark, Item
from evomerge.cli import main
from evomerge.errors import EvomergeWarning
from evomerge.merge.loading import open_model
from evomerge.search.preflight import check_inputs
from evomerge.search.space import load_search_space

sys.path.insert(0, str(Path(__file__).parent))
from small_space import small_space  # noqa: E402


def test_subset_larger_than_a_benchmark_fails_before_any_model_is_loaded(zoo_dir, tmp_path, capsys, monkeypatch):
    import evomerge.search.run as run_module

    monkeypatch.setattr(run_module, "make_builder", lambda space: pytest.fail("weights loaded before the check"))
    space = small_space(zoo_dir, tmp_path / "space.yaml", estimator={"subset_size": 100})
    assert main(["search", str(space), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "estimator.subset_size 100 does not fit benchmark" in err and "(60 items in" in err
    assert not (tmp_path / "runs").exists()  # nothing written for a search that never started



def test_a_racing_stage_larger_than_a_benchmark_fails_before_any_model_is_loaded(zoo_dir, tmp_path, capsys,
                                                                                 monkeypatch):

    import evomerge.search.run as run_module

    monkeypatch.setattr(run_module, "make_builder", lambda space: pytest.fail("weights loaded before the check"))
    space = small_space(zoo_dir, tmp_path / "space.yaml", evaluation={"stages": [10, 100], "top_k": 2})
    assert main(["search", str(space), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.stages [10, 100] does not fit benchmark" in err and "(60 items in" in err
    assert not (tmp_path / "runs").exists()

@pytest.mark.parametrize("argv, option", [
    (["resume", "runs/x", "--trials", "0"], "--trials"),
    (["search", "x.yaml", "--trials", "-3"], "--trials"),
    (["status", "runs/x", "--top", "-1"], "--top"),
    (["validate", "runs/x", "--top", "0"], "--top"),
])
def test_counts_below_their_minimum_are_refused_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be at least" in err and "--validate-top" not in err


def test_more_layer_groups_than_layers_is_warned(zoo_dir, tmp_path):
    space = load_search_space(small_space(zoo_dir, tmp_path / "space.yaml",
                                          merge={"granularity": "layer_group", "layer_groups": 9}))
    with pytest.warns(EvomergeWarning, match=r"merge.layer_groups 9 is more than the \d+ layers"):
        benchmarks = check_inputs(space)
    assert sorted(benchmarks) == sorted(b.name for b in space.benchmarks)


def test_duplicate_item_ids_are_warned():
    items = [Item("a", "1+1=", "2"), Item("b", "2+2=", "4"), Item("a", "1+1=", "2")]
    with pytest.warns(EvomergeWarning, match=r"benchmark 'dup' .*1 item id\(s\) appear more than once \(first: 'a', 2 times\)"):
        Benchmark("dup", items, source="dup.jsonl")


def test_nan_in_a_weight_is_warned_naming_file_and_tensor(zoo_dir, tmp_path):
    expert = tmp_path / "expert"
    shutil.copytree(zoo_dir / "base", expert)
    weights = load_file(str(expert / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])
    save_file(weights, str(expert / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(EvomergeWarning, match=rf"model.safetensors: tensor {name} holds 2 NaN/inf value"):
        loaded = dict(open_model(expert).iter_tensors())
    assert set(loaded) == set(weights)
