"""Genes that would change nothing are not searched: the coefficients of tensor groups no expert changes
(a LoRA adapter's untouched layers), for methods that merge unchanged tensors to the base."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge import MergeCore, Recipe
from evomerge.merge.methods import METHODS, REQUIRED
from evomerge.merge.statistics import StatisticsFiles
from evomerge.search.candidates import ParameterMerge
from evomerge.search.genome import genome_space, genome_to_recipe, inert_groups, uniform_genome
from evomerge.search.learning import CoefficientLearner
from evomerge.search.space import LearnSettings, parse_search_space

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_llama_config, write_tiny_expert, write_tiny_llama, write_tiny_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_params(method, num_experts: int, rng: random.Random) -> dict:
    """Values anywhere in each parameter's search range (booleans either way; the rest at their defaults)."""
    params = {}
    for param in method.params:
        if param.boolean and param.mergekit and not param.recipe_wide:
            params[param.name] = rng.random() < 0.5
        elif param.search is not None:
            draw = [param.snap(rng.uniform(*param.search)) for _ in range(num_experts)]
            params[param.name] = draw if param.per_expert else draw[0]
        elif param.default is REQUIRED:
            params[param.name] = [1.0] * num_experts if param.per_expert else 1.0
    return params


def test_every_method_that_says_so_merges_unchanged_tensors_to_the_base(tmp_path):
    """The registry's contract behind pruning: experts equal to the base there give the base back, whatever
    the parameters (RegMean and Fisher from random statistics)."""
    base = write_tiny_llama(tmp_path / "base", tiny_llama_config(num_layers=2))
    generator = torch.Generator().manual_seed(0)
    cores = {}

    def core_of(count: int) -> MergeCore:  # `count` experts, each the base itself, with random statistics
        if count not in cores:
            files = StatisticsFiles(tmp_path / f"statistics{count}")
            cores[count] = core = MergeCore(base, [base] * count, device="cpu", statistics=files)
            for expert in range(count):
                grams = {}
                for slot in core.slots:
                    if len(slot.shape) == 2:
                        x = torch.randn(3 * slot.shape[1], slot.shape[1], generator=generator)
                        grams[slot.name] = x.T @ x / len(x)
                files.save("gram", expert, grams, {"test": expert})
                files.save("fisher", expert, {s.name: torch.rand(s.shape, generator=generator) for s in core.slots},
                           {"test": expert})
        return cores[count]

    reference = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    rng = random.Random(0)
    checked = []
    for name, method in sorted(METHODS.items()):
        if not method.keeps_unchanged_base:
            continue
        count = max(method.min_experts, min(2, method.max_experts or 2))
        for _ in range(3):
            merged = core_of(count).merge(Recipe(name, random_params(method, count, rng)))
            for tensor, values in merged.items():
                torch.testing.assert_close(values, reference[tensor], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name}: {tensor}: {m}")
        checked.append(name)
    assert {"task_arithmetic", "ties", "dare_ties", "regmean", "fisher", "slerp"} <= set(checked)
    assert {"linear", "multislerp"}.isdisjoint(checked)


LAYERS = 4


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """A 4-layer base, two LoRA adapters on layers 2-3 only, and a full fine-tune."""
    root = tmp_path_factory.mktemp("pruning")
    base = write_tiny_llama(root / "base", tiny_llama_config(num_layers=LAYERS))
    adapters = [write_tiny_lora(base, root / f"lora{i}", seed=i, r=4, lora_alpha=8, layers_to_transform=[2, 3],
                                target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(2)]
    full = write_tiny_expert(base, root / "full", seed=5)
    (root / "b.jsonl").write_text('{"prompt": "1+1=", "choices": ["2", "3"], "label": 0}\n')
    return base, adapters, full


def space_of(base, experts, method="ties", layer_groups=2, **merge):
    raw = {"name": "p", "models": {"base": str(base), "experts": {f"e{i}": str(p) for i, p in enumerate(experts)}},
           "merge": {"method": method, "granularity": "layer_group", "layer_groups": layer_groups, **merge},
           "benchmarks": [{"name": "b", "path": str(base.parent / "b.jsonl")}], "device": "cpu"}
    return parse_search_space(raw, "pruning test")


def test_groups_no_adapter_touches_have_no_genes_and_merge_as_before(lora_family):
    base, adapters, full = lora_family
    space = space_of(base, adapters, params={"weight": [0.0, 1.5], "density": [0.2, 1.0]})
    builder = ParameterMerge(space)
    assert builder.inert == frozenset({"rest", "G0"})  # embeddings, norms, head; layers 0-1
    assert sorted({g.group for g in builder.genes.values()}) == ["G1"] and len(builder.genes) == 4
    everywhere = genome_space(space.merge, space.expert_names, LAYERS)
    assert len(everywhere) == 12
    rng = random.Random(1)
    for _ in range(3):
        genome = {n: rng.uniform(g.low, g.high) for n, g in everywhere.items()}
        pruned = builder.recipe({n: v for n, v in genome.items() if n in builder.genes})
        assert len(pruned.overrides) == 0  # G1's values are the recipe's default; nothing else differs
        full_recipe = genome_to_recipe(space.merge, space.expert_names, genome, LAYERS)
        ours, theirs = builder.core.merge(pruned), builder.core.merge(full_recipe)
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name

    # a full fine-tune among the experts may change any tensor; linear keeps no unchanged base: nothing pruned
    assert ParameterMerge(space_of(base, [*adapters, full])).inert == frozenset()
    assert ParameterMerge(space_of(base, adapters, method="linear")).inert == frozenset()
    assert inert_groups(space.merge, LAYERS, [(None, "embed", False), (0, "mlp", False)]) == frozenset()


def test_learning_and_baselines_use_the_pruned_genome(lora_family):
    """Uniform baselines and the AdaMerging learner see only searched genes; an inert group's tensors stay
    the base's in the learner's differentiable merge."""
    base, adapters, _ = lora_family
    space = space_of(base, adapters, method="task_arithmetic", params={"weight": [0.0, 1.5]})
    builder = ParameterMerge(space)
    assert set(builder.inert) == {"rest", "G0"}
    for genome in builder.baseline_genomes().values():
        assert set(genome) == set(builder.genes)
    learner = CoefficientLearner(builder, {"b": object()}, {"b": 1.0}, LearnSettings())
    coefficients = torch.tensor([uniform_genome(builder.genes, {"weight": 0.8})[n] for n in learner.names],
                                dtype=torch.float64)
    merged = learner.merged_parameters(coefficients)
    reference = builder.core.merge(builder.recipe(uniform_genome(builder.genes, {"weight": 0.8})))
    for slot in builder.core.slots:
        torch.testing.assert_close(merged[slot.name].detach(), reference[slot.name], rtol=1e-5, atol=1e-6)
