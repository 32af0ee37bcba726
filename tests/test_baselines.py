"""Baseline genomes: every expert alone and the base, wherever the space can express them, merge to exactly that model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from evomerge.search.candidates import ParameterMerge
from evomerge.search.space import parse_search_space
sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_llama_config, write_tiny_expert, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = write_tiny_llama(root / "base", tiny_llama_config(), seed=0)
    experts = {name: str(write_tiny_expert(base, root / name, seed=i + 1)) for i, name in enumerate(("a", "b"))}
    return str(base), experts


def make_space(tiny_zoo, method: str, params: dict | None = None, fixed: dict | None = None, experts=None):
    base, all_experts = tiny_zoo
    experts = experts or all_experts
    merge = {"method": method, "granularity": "layer_group", "layer_groups": 2, "split_modules": True}
    if params is not None:
        merge["params"] = params
    if fixed:
        merge["fixed"] = fixed
    raw = {"name": "b", "models": {"base": base, "experts": experts}, "merge": merge,
           "benchmarks": [{"name": "x", "path": "x.jsonl"}], "device": "cpu"}
    return parse_search_space(raw)


def state(path) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return dict(LlamaForCausalLM.from_pretrained(str(path)).named_parameters())


@pytest.mark.parametrize("method, params, fixed, expected", [
    ("ties", {"weight": [0.0, 1.5], "density": [0.3, 1.0]}, None, {"uniform", "base", "expert a", "expert b"}),
    ("task_arithmetic", None, None, {"uniform", "base", "expert a", "expert b"}),
    ("dare_ties", None, None, {"uniform", "base", "expert a", "expert b"}),
    ("della", {"weight": [0.0, 1.2], "density": [0.3, 1.0]}, None, {"uniform", "base", "expert a", "expert b"}),
    ("linear", None, None, {"uniform", "expert a", "expert b"}),                  # no weights give the base
    ("breadcrumbs", None, None, {"uniform", "base"}),                              # density capped at 0.98
    ("task_arithmetic", None, {"lambda": 0.8}, {"uniform", "base"}),               # lambda 0.8 scales every expert
    ("ties", {"weight": [0.2, 1.0]}, None, {"uniform"}),                           # weight 0 out of bounds
])
def test_endpoints_merge_to_the_endpoint(tiny_zoo, method, params, fixed, expected):
    base, experts = tiny_zoo
    builder = ParameterMerge(make_space(tiny_zoo, method, params, fixed))
    baselines = builder.baseline_genomes()
    assert {label.split(" ")[0] if label.startswith("uniform") else label for label in baselines} == expected
    assert len(set(map(str, baselines.values()))) == len(baselines)
    endpoints = {"base": base, **{f"expert {name}": path for name, path in experts.items()}}
    for label, genome in baselines.items():
        if label.startswith("uniform"):
            continue
        model = builder.candidate(genome).model
        got = dict(model.named_parameters())
        for name, tensor in state(endpoints[label]).items():
            torch.testing.assert_close(got[name].detach(), tensor, rtol=0, atol=1e-6, msg=f"{label}: {name}")


def test_slerp_endpoints(tiny_zoo):
    base, experts = tiny_zoo
    builder = ParameterMerge(make_space(tiny_zoo, "slerp", experts={"a": experts["a"]}))
    baselines = builder.baseline_genomes()
    assert [label for label in baselines if not label.startswith("uniform")] == ["base", "expert a"]
    for label, path in (("base", base), ("expert a", experts["a"])):
        got = dict(builder.candidate(baselines[label]).model.named_parameters())
        for name, tensor in state(path).items():
            torch.testing.assert_close(got[name].detach(), tensor, rtol=0, atol=1e-6)
