"""Run mergekit 0.1.5 on an exported recipe and compare its output with ours (shared by the merge tests)."""

from __future__ import annotations

import torch
import yaml

from evomerge.merge import recipe_to_mergekit_yaml
from evomerge.merge.loading import open_model

ATOL, RTOL = 1e-6, 1e-5


def run_mergekit(recipe, base, experts, num_layers, out_dir, dtype: str = "float32", cuda: bool = False) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = recipe_to_mergekit_yaml(recipe, base, experts, num_layers, dtype=dtype)
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out_dir), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, cuda=cuda))
    return open_model(out_dir).load()


def assert_same(ours: dict, theirs: dict, label: str, exact: bool = False):
    assert set(ours) == set(theirs), f"{label}: tensor names differ: {set(ours) ^ set(theirs)}"
    for name, tensor in theirs.items():
        if exact:
            assert ours[name].dtype == tensor.dtype, f"{label} {name}: dtype {ours[name].dtype} vs {tensor.dtype}"
            assert torch.equal(ours[name].cpu(), tensor), f"{label} {name}: not bit-identical"
        else:
            torch.testing.assert_close(ours[name], tensor, atol=ATOL, rtol=RTOL, msg=lambda m: f"{label} {name}: {m}")
