"""Exports: the mergekit YAML re-makes the exported tensors (dtype included), a folder is written
all or nothing, and a folder that is not an earlier export of the same run is never overwritten."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.export import export_checkpoint
from evomerge.merge import MergeCore, Override, Recipe
from evomerge.merge.loading import open_model

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_tiny_qwen2_family  # noqa: E402


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return write_tiny_qwen2_family(tmp_path_factory.mktemp("qwen2"), num_experts=2, num_layers=3)


def test_exported_mergekit_yaml_remakes_a_bf16_ties_merge_tensor_for_tensor(bf16_family, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit (test extra, ==0.1.5) is not installed")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, experts = bf16_family
    core = MergeCore(base, experts, device="cpu")
    assert core.dtype == torch.bfloat16
    recipe = Recipe("ties", {"weight": [0.7, 0.4], "density": 0.5}, overrides=[
        Override(layers=[0], params={"weight": [1.0, 0.2], "density": [0.3, 0.8]}),
        Override(layers=[2], modules=["mlp"], params={"density": 0.9}),
        Override(layers=[1], modules=["attention"], params={"weight": [0.1, 1.1], "lambda": 0.8}),
    ])
    out = export_checkpoint(core, recipe, tmp_path / "export", seed=0, base_path=str(base),
                            expert_paths=[str(e) for e in experts])
    text = (out / "mergekit.yaml").read_text()
    assert "dtype: bfloat16" in text
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "remade"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    ours, theirs = open_model(out).load(), open_model(tmp_path / "remade").load()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(theirs[name], tensor), name
