"""Exports: the mergekit YAML re-makes the exported tensors (dtype included), a folder is written
all or nothing, and a folder that is not an earlier export of the same run is never overwritten."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.export import export_checkpoint
from evomerge.merge import MergeCore, Override, Recipe
from evomerge.merge.loading import open_model

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_tiny_arch_family, write_tiny_qwen2_family  # noqa: E402


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return write_tiny_qwen2_family(tmp_path_factory.mktemp("qwen2"), num_experts=2, num_layers=3)


def test_exported_mergekit_yaml_remakes_a_bf16_ties_merge_tensor_for_tensor(bf16_family, tmp_path):
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


def test_mergekit_yaml_remakes_every_tensor_of_a_bf16_ties_export(tmp_path):
    """The issue's case: a Qwen2-shaped bf16 family whose task vectors have many equal magnitudes (experts
    perturbed by N(0, (0.02 (e + 1))^2)); TIES 0.7/0.4/1.0 at densities 0.3/0.6/0.8; `mergekit-yaml` on the
    export's own mergekit.yaml keeps the same tied elements (its CPU sort's order) and re-makes every tensor."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    base, experts = write_tiny_arch_family(tmp_path / "family", "qwen2", num_experts=3, num_layers=4, noise=0.02)
    core = MergeCore(base, experts, device="cpu")
    recipe = Recipe("ties", {"weight": [0.7, 0.4, 1.0], "density": [0.3, 0.6, 0.8]})
    out = export_checkpoint(core, recipe, tmp_path / "export", seed=0, base_path=str(base),
                            expert_paths=[str(e) for e in experts])
    assert "dtype: bfloat16" in (out / "mergekit.yaml").read_text()
    mergekit_yaml.main([str(out / "mergekit.yaml"), str(tmp_path / "remade"), "--no-copy-tokenizer", "--quiet"],
                       standalone_mode=False)
    ours, theirs = open_model(out).load(), open_model(tmp_path / "remade").load()
    assert set(ours) == set(theirs) and len(ours) == 51
    different = [name for name, tensor in ours.items()
                 if theirs[name].dtype != tensor.dtype or not torch.equal(theirs[name], tensor)]
    assert not different, f"{len(different)} of {len(ours)} tensors differ: {different[:3]}"


@pytest.fixture(scope="module")
def bf16_core(bf16_family):
    base, experts = bf16_family
    return MergeCore(base, experts, device="cpu")


def export(core, out, recipe=None, **kwargs):
    base = core.base_path
    return export_checkpoint(core, recipe or Recipe("task_arithmetic", {"weight": 0.5}), out, seed=0,
                             base_path=str(base), expert_paths=[str(e) for e in core.expert_paths], **kwargs)


RUN = {"study": "s", "run": "/runs/s"}


def test_an_export_is_all_or_nothing(bf16_core, tmp_path, monkeypatch):
    import evomerge.export as export_module

    out = tmp_path / "out"
    export(bf16_core, out, max_shard_size="20KB", owner=RUN)  # sharded: an index and several files
    assert (out / "model.safetensors.index.json").is_file()
    before = sorted(p.name for p in out.iterdir())

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C / a kill arrived while writing the card

    monkeypatch.setattr(export_module, "model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        export(bf16_core, out, owner=RUN)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier export, whole
    with pytest.raises(KeyboardInterrupt):
        export(bf16_core, tmp_path / "new", owner=RUN)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    export(bf16_core, out, owner=RUN)  # unsharded now: nothing of the sharded export is left
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old sibling left
    open_model(out).load()


def test_a_folder_that_is_not_an_export_of_the_same_run_is_not_replaced(bf16_family, bf16_core, tmp_path):
    import shutil

    from evomerge.errors import EvomergeError

    base_copy = tmp_path / "base-copy"
    shutil.copytree(bf16_family[0], base_copy)
    weights = (base_copy / "model.safetensors").read_bytes()
    with pytest.raises(EvomergeError, match="is not empty and is not an earlier export of this run.*--force"):
        export(bf16_core, base_copy, owner=RUN)
    assert (base_copy / "model.safetensors").read_bytes() == weights

    export(bf16_core, tmp_path / "mine", owner=RUN)
    export(bf16_core, tmp_path / "mine", owner=RUN)  # an earlier export of the same run: replaced
    with pytest.raises(EvomergeError, match="not an earlier export of this run"):
        export(bf16_core, tmp_path / "mine", owner={"study": "other", "run": "/runs/other"})
    with pytest.raises(EvomergeError, match="holds the run"):
        export(bf16_core, tmp_path, owner={"study": "s", "run": str(tmp_path / "mine" / "..")})
    export(bf16_core, base_copy, owner=RUN, force=True)
    assert json.loads((base_copy / "evomerge_export.json").read_text())["owner"] == RUN
