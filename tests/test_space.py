"""Search-space validation and the genome -> recipe mapping."""

import copy
from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.search.genome import bounds_of, endpoint_genome, genome_space, genome_to_recipe, tensor_groups, uniform_genome
from evomerge.search.space import load_search_space, parse_search_space

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def demo_raw():
    """The demo space searched as a TIES merge (weight and density per expert): the richer genome and
    parameter domains these tests check."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["merge"].update(method="ties", params={"weight": [0.0, 1.5], "density": [0.3, 1.0]})
    return raw


def test_demo_space_is_valid():
    space = load_search_space(DEMO)
    assert space.merge.method == "task_arithmetic" and space.dfs is None
    assert space.expert_names == ["arith", "cipher", "lang"]
    assert space.merge.ranges["weight"] == (0.0, 1.5)
    assert [b.name for b in space.benchmarks] == ["arith", "cipher", "lang", "lang_arith"]  # the composite too


def test_calibration_merges_default_follows_what_each_merge_answers():
    """4 merges on the subsets and a sample keep calibration + validation within the trials' cost; on every
    item (``calibration_items: all``) 8 estimate better than 4 (docs/estimate.md, 'Calibrating on less')."""
    raw = demo_raw()
    raw["estimator"].pop("calibration_merges", None)
    assert parse_search_space(copy.deepcopy(raw), "demo").calibration_merges == 4
    raw["estimator"]["calibration_items"] = "all"
    assert parse_search_space(copy.deepcopy(raw), "demo").calibration_merges == 8
    raw["estimator"]["calibration_merges"] = 3
    assert parse_search_space(raw, "demo").calibration_merges == 3


def test_benchmark_entry_with_columns_and_template_loads(tmp_path):
    import datasets

    rows = [{"question": f"{i}+1?", "options": ["no", "yes"], "gold": "B"} for i in range(3)]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "quiz"))
    raw = demo_raw()
    raw["benchmarks"] = [{"name": "quiz", "path": str(tmp_path / "quiz"), "split": "validation",
                          "fields": {"choices": "options", "label": "gold"}, "template": "Q: {question} A:"}]
    bench = parse_search_space(raw, source="demo.yaml").benchmarks[0].load()
    assert len(bench) == 3 and bench.items[0].prompt == "Q: 0+1? A:" and bench.items[0].label == 1


def test_generate_entry_is_checked_at_parse_time_and_loads(tmp_path):
    (tmp_path / "chain.jsonl").write_text('{"id": "c1", "prompt": "2+3=", "answer": "5"}\n')
    raw = demo_raw()
    raw["benchmarks"] = [{"name": "chain", "path": str(tmp_path / "chain.jsonl"), "scoring": "generate",
                          "max_new_tokens": 48, "stop": ["\n"], "extract": {"after": "Answer:"}, "compare": "numeric"}]
    bench = parse_search_space(raw, source="demo.yaml").benchmarks[0].load()
    assert bench.kind == "generate" and bench.settings.max_new_tokens == 48 and bench.settings.stop == ("\n",)
    assert bench.settings.extract("work 2+3\nAnswer: 5") == "5" and bench.settings.compare.name == "numeric"


def test_a_benchmark_sample_is_a_seeded_random_subset_in_order(tmp_path):
    """``sample: N`` makes a large benchmark cost a search what N items cost (docs/search.md, "What a search
    costs"): the same N items for every model and every run of the space, in the file's order."""
    (tmp_path / "big.jsonl").write_text("".join(f'{{"id": "q{i}", "prompt": "{i}+1=", "answer": "{i + 1}"}}\n'
                                                for i in range(50)))
    raw = demo_raw()
    raw["benchmarks"] = [{"name": "big", "path": str(tmp_path / "big.jsonl"), "sample": 12},
                         {"name": "again", "path": str(tmp_path / "big.jsonl"), "sample": {"n": 12, "seed": 3}},
                         {"name": "whole", "path": str(tmp_path / "big.jsonl"), "sample": 500}]
    big, again, whole = (spec.load() for spec in parse_search_space(copy.deepcopy(raw), source="demo.yaml").benchmarks)
    ids = [item.id for item in big.items]
    assert len(ids) == 12 and ids == sorted(ids, key=lambda i: int(i[1:]))      # the file's order
    assert ids == [item.id for item in parse_search_space(raw, source="demo.yaml").benchmarks[0].load().items]
    assert [item.id for item in again.items] != ids and len(again) == 12       # another seed, another sample
    assert len(whole) == 50 and "random" not in whole.source                    # asks for more than it has: all
    assert "a random 12 of its 50 items (seed 0)" in big.where


@pytest.mark.parametrize("sample, message", [
    (0, r"benchmarks\[0\].sample must be an item count >= 1"),
    ("many", r"benchmarks\[0\].sample must be an item count >= 1"),
    ({"seed": 1}, r"benchmarks\[0\].sample needs n"),
    ({"n": 10, "colour": 1}, r"unknown key benchmarks\[0\].sample.colour"),
    ({"n": 10, "seed": -1}, r"benchmarks\[0\].sample.seed must be an integer >= 0"),
])
def test_a_bad_benchmark_sample_names_the_key(sample, message):
    raw = demo_raw()
    raw["benchmarks"][0]["sample"] = sample
    with pytest.raises(EvomergeError, match=message):
        parse_search_space(raw, source="demo.yaml")


# Data-flow spaces read their source models at parse time: tests/test_dfs.py checks them on the quick zoo.
PS_SPACES = [p for p in sorted(DEMO.parent.glob("*.yaml")) if "dfs" not in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", PS_SPACES, ids=lambda p: p.name)
def test_every_shipped_space_is_valid(path):
    space = load_search_space(path)
    genes = bounds_of(genome_space(space.merge, space.expert_names, num_layers=4))
    assert genes and all(lo < hi for lo, hi in genes.values())
    recipe = genome_to_recipe(space.merge, space.expert_names, {n: (lo + hi) / 2 for n, (lo, hi) in genes.items()}, 4)
    recipe.validate(len(space.experts))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["merge"].update(method="frankenmerge"), "merge.method 'frankenmerge' is unknown"),
        (lambda r: r["merge"].update(granularity="tensor"), "granularity"),
        (lambda r: r["merge"]["params"].update(weight=[1.0, 0.0]), "low < high"),
        (lambda r: r["merge"]["params"].update(temperature=[0, 1]), "merge.params.temperature"),
        (lambda r: r.pop("models"), "section 'models'"),
        (lambda r: r["models"].update(experts={}), "models.experts"),
        (lambda r: r.update(benchmarks=[]), "benchmarks must be a list"),
        (lambda r: r["estimator"].update(subset_size=0), "estimator.subset_size"),
        (lambda r: r["estimator"].update(method="magic"), "estimator.method"),
        (lambda r: r["optimizer"].update(trials="many"), "optimizer.trials"),
        (lambda r: r.update(colour="blue"), "unknown key colour"),
        (lambda r: r["merge"].update(method="slerp"), "merge method 'slerp' needs exactly 1 expert"),
        (lambda r: r["optimizer"].update(name="cmaex"), "optimizer.name: unknown optimizer 'cmaex'"),
        (lambda r: r["benchmarks"][0].update(fields={"question": "q"}), r"benchmarks\[0\] \(arith\): fields maps unknown item key"),
        (lambda r: r["benchmarks"][0].update(template=3), r"benchmarks\[0\] \(arith\): template must be a string"),
        (lambda r: r["optimizer"].update(objectives="per_task", name="cmaes"), "handles one objective only"),
        (lambda r: r["benchmarks"][0].update(scoring="generate", extract={"regex": "Answer: \\d+"}),
         r"benchmarks\[0\] \(arith\): extract.regex .* has 0 capture groups"),
        (lambda r: r["benchmarks"][0].update(preset="gsm9k"), r"benchmarks\[0\] \(arith\): preset 'gsm9k' is unknown"),
        (lambda r: r["benchmarks"][0].update(max_new_tokens=-3), r"benchmarks\[0\] \(arith\): max_new_tokens must be"),
        (lambda r: r["benchmarks"][0].update(stop="\n", scoring="multiple_choice"),
         r"benchmarks\[0\] \(arith\): stop applies to scoring: generate only"),
        (lambda r: r["benchmarks"][0].update(colour="blue"), r"unknown key benchmarks\[0\].colour"),
        (lambda r: r.update(evaluation={"stages": [10, 30]}), "estimator.subset_size 40 differs"),
        (lambda r: r.update(evaluation={"stages": [40, 30]}), "evaluation.stages must grow"),
        (lambda r: r.update(evaluation={"stages": [40, "all", 900]}), r"evaluation.stages\[1\].*only the last"),
        (lambda r: r.update(evaluation={"stages": []}), "evaluation.stages must be a list"),
        (lambda r: r.update(evaluation={"stages": [40], "top_k": 0}), "evaluation.top_k"),
        (lambda r: r.update(evaluation={"stages": [40], "level": 1.5}), "evaluation.level"),
        (lambda r: r.update(evaluation={"stages": [40], "race": True}), "unknown key evaluation.race"),
        # ranges against the method's own parameter domain, at parse time (issue 15)
        (lambda r: r["merge"]["params"].update(density=[-0.5, 1]), r"merge\.params\.density: density must be in \(0, 1\]"),
        (lambda r: r["merge"]["params"].update(density=[0.3, 2.0]), r"merge\.params\.density: density must be in \(0, 1\], got \[0\.3, 2\]"),
        (lambda r: r["merge"]["params"].update(weight=[0.0, float("inf")]), r"merge\.params\.weight must be .*finite"),
        (lambda r: r["merge"]["params"].update(t=[0.0, 1.0]), r"merge\.params\.t is not a searchable parameter of ties; choose from weight, density, lambda"),
        (lambda r: r["merge"].update(fixed={"density": 1.5}), r"merge\.fixed\.density: density must be in"),
        (lambda r: r.update(name="../escaped"), r"name '\.\./escaped' must be a folder name inside --runs-root"),
        (lambda r: r.update(name="/tmp/abs"), "must be a folder name"),
    ],
)
def test_bad_space_names_the_key(mutate, message):
    raw = copy.deepcopy(demo_raw())
    mutate(raw)
    with pytest.raises(EvomergeError, match=message):
        parse_search_space(raw, source="demo.yaml")


def test_evaluation_stages():
    raw = demo_raw()
    assert parse_search_space(copy.deepcopy(raw)).stages == [40]  # no evaluation section: the fixed subset
    raw["estimator"].pop("subset_size")
    raw["evaluation"] = {"stages": [10, 30, "all"], "top_k": 3}
    space = parse_search_space(raw)
    assert space.stages == [10, 30, "all"] and space.subset_size == 10
    assert space.evaluation.top_k == 3 and space.evaluation.level == 0.9 and space.evaluation.racing


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(EvomergeError, match="not found"):
        load_search_space(tmp_path / "nope.yaml")


def test_layer_group_genome_maps_to_recipe():
    space = parse_search_space(demo_raw())
    groups = tensor_groups(space.merge, num_layers=4)
    assert [g.name for g in groups] == ["rest", "G0_attention", "G0_mlp", "G1_attention", "G1_mlp"]
    assert groups[1].layers == (0, 1) and groups[3].layers == (2, 3)
    genome = bounds_of(genome_space(space.merge, space.expert_names, num_layers=4))
    # weight and density for 3 experts in 5 groups
    assert len(genome) == 2 * 3 * 5
    point = {name: (low + high) / 2 for name, (low, high) in genome.items()}
    point["weight.lang.G1_mlp"] = 0.1
    recipe = genome_to_recipe(space.merge, space.expert_names, point, num_layers=4)
    assert recipe.method == "ties"
    assert recipe.params["weight"] == [0.75, 0.75, 0.75]
    last = recipe.overrides[-1]
    assert last.layers == [2, 3] and last.modules == ["mlp"]
    assert last.params["weight"] == [0.75, 0.75, 0.1]


def test_global_and_per_layer_granularity():
    raw = demo_raw()
    raw["merge"].update(granularity="global")
    space = parse_search_space(raw)
    assert len(genome_space(space.merge, space.expert_names, 4)) == 6
    raw["merge"].update(granularity="layer", split_modules=False)
    space = parse_search_space(raw)
    assert len(genome_space(space.merge, space.expert_names, 4)) == 6 * 5


def test_uniform_genome_is_clipped():
    space = parse_search_space(demo_raw())
    genome = uniform_genome(genome_space(space.merge, space.expert_names, 4), {"weight": 9.0, "density": 0.5})
    assert set(genome.values()) == {1.5, 0.5}


def test_expert_names_with_dots_are_genes_like_any_other():
    """Real checkpoints are named after their folders (`Qwen2.5-Math`): genes are structured, their
    names never parsed back, so the endpoints, recipes and uniform merges come out right."""
    raw = demo_raw()
    raw["models"]["experts"] = {"Qwen2.5-Math": raw["models"]["experts"]["arith"],
                                "v1.2.cipher": raw["models"]["experts"]["cipher"],
                                "lang": raw["models"]["experts"]["lang"]}
    space = parse_search_space(raw)
    experts = space.expert_names
    genes = genome_space(space.merge, experts, 4)
    assert "weight.Qwen2.5-Math.G1_mlp" in genes and genes["weight.Qwen2.5-Math.G1_mlp"].owner == "Qwen2.5-Math"
    for expert in experts:
        endpoint = endpoint_genome(space.merge, experts, genes, expert)
        recipe = genome_to_recipe(space.merge, experts, endpoint, 4)
        expected = [1.0 if e == expert else 0.0 for e in experts]
        assert recipe.params["weight"] == expected and all(o.params["weight"] == expected for o in recipe.overrides)
    base = genome_to_recipe(space.merge, experts, endpoint_genome(space.merge, experts, genes, None), 4)
    assert base.params["weight"] == [0.0, 0.0, 0.0]


def test_a_new_method_is_one_class_registered_once(tmp_path):
    """A method with a parameter no other has: searched, mapped to recipes and merged with no other file edited."""
    import sys

    import torch

    from evomerge.merge import MergeCore, Recipe
    from evomerge.merge.methods import METHODS, MergeMethod, Param, register

    class ScaledSum(MergeMethod):
        name = "scaled_sum"
        params = (Param("scale", 1.0, per_expert=True, low=0.0, high=2.0, search=(0.0, 2.0)),
                  Param("offset", 0.0, low=-1.0, high=1.0))

        def elementwise(self, params):
            return True

        def merge(self, unit, block, params, seed, out, ctx):
            out.copy_(block.base_range(unit.start, unit.end)).add_(params["offset"])
            for e in range(ctx.num_experts):
                out.add_(block.tv_range(e, unit.start, unit.end), alpha=params["scale"][e])

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import write_tiny_family

    base, experts = write_tiny_family(tmp_path, num_experts=2, sharded_expert=None)
    register(ScaledSum())
    try:
        raw = demo_raw()
        raw["models"] = {"base": str(base), "experts": {"a": str(experts[0]), "b": str(experts[1])}}
        raw["merge"] = {"method": "scaled_sum", "granularity": "global", "params": {"offset": [-0.1, 0.1]}}
        space = parse_search_space(raw, source="new.yaml")
        genes = bounds_of(genome_space(space.merge, space.expert_names, num_layers=2))
        assert genes == {"scale.a.all": (0.0, 2.0), "scale.b.all": (0.0, 2.0), "offset.all": (-0.1, 0.1)}
        recipe = genome_to_recipe(space.merge, space.expert_names,
                                  {"scale.a.all": 0.5, "scale.b.all": 1.5, "offset.all": 0.0}, 2)
        assert recipe.params == {"scale": [0.5, 1.5], "offset": 0.0}
        core = MergeCore(base, experts, device="cpu")
        merged, expected = core.merge(recipe), core.merge(Recipe("task_arithmetic", {"weight": [0.5, 1.5]}))
        assert all(torch.allclose(merged[n], expected[n], atol=1e-6) for n in expected)
        raw["merge"]["params"] = {"normalize": [0, 1]}
        with pytest.raises(EvomergeError, match="merge.params.normalize is not a searchable parameter of scaled_sum; "
                                                "choose from scale, offset"):
            parse_search_space(raw, source="new.yaml")
    finally:
        METHODS.pop("scaled_sum", None)


def test_readme_describes_every_shipped_space_as_its_file_is():
    """README's "Shipped spaces" names each file with its method (or says it is a data-flow space)."""
    readme = (DEMO.parents[1] / "README.md").read_text()
    paragraph = readme[readme.index("Shipped spaces:"):].split("\n\n")[0].replace("\n", " ")
    shown = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES", "slerp": "SLERP"}
    for path in sorted(DEMO.parent.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert f"`{path.name}`" in paragraph, f"README does not name {path.name}"
        if path.name.startswith("template"):
            continue
        said = paragraph.split(f"`{path.name}`")[1].split("`")[0]
        expected = "data-flow" if "dfs" in raw else shown[raw["merge"]["method"]]
        assert expected in said or (expected == "data-flow" and "data-flow" in paragraph.split(f"`{path.name}`")[1][:120]), \
            f"README says {said!r} of {path.name}, a {expected} space"
