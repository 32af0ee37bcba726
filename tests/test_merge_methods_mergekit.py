"""mergekit 0.1.5's other methods (sce, karcher, multislerp, nuslerp, nearswap, arcee_fusion, ram,
ramplus_tl) in the merge core: equal to mergekit bit for bit, on every memory tier, through exports.

Families: the tiny Llama of tests/test_merge_mergekit.py in float32, in bfloat16, and float32
checkpoints merged in bfloat16, and the bf16 Qwen2- and Mistral-shaped families of
tests/test_merge_memory.py (hidden 32, intermediate 64, 4 heads, 2 KV heads; Qwen2 adds q/k/v
biases). Every recipe carries per-layer and per-module overrides so the export's
slices and conditional parameters are exercised. mergekit computes in the YAML's dtype and writes
its `out_dtype`, as the core does, so tensors are compared with `torch.equal`, dtype included.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.export import export_checkpoint
from evomerge.merge import MergeCore, Override, Recipe, recipe_to_mergekit_yaml
from evomerge.merge.loading import open_model
from evomerge.merge.methods import get_method, ram
from evomerge.merge.methods.experts import KIND, RECHECKPOINT
from evomerge.merge.methods.multislerp import multislerp
from evomerge.merge.methods.randomness import mask_generator
from evomerge.search.genome import genome_space, genome_to_recipe
from evomerge.search.space import parse_search_space

sys.path.insert(0, str(Path(__file__).parent))
from mergekit_run import assert_same, run_mergekit  # noqa: E402
from test_merge_memory import BLOCK_ELEMENTS, BUDGETS, fixed_bytes  # noqa: E402
from test_space import demo_raw  # noqa: E402
from tiny_models import tiny_llama_config, write_tiny_arch_family, write_tiny_expert, write_tiny_family  # noqa: E402
from tiny_models import write_tiny_llama, write_tiny_lora  # noqa: E402

pytest.importorskip("mergekit", reason="mergekit (test extra, ==0.1.5) is not installed")

W = [0.5, 0.3, 0.7]
# label -> (recipe, experts it merges)
RECIPES = {
    "sce": (Recipe("sce", {"select_topk": 0.5}, [
        Override(layers=[1], modules=["mlp"], params={"select_topk": 0.2}),
        Override(modules=["embed"], params={"select_topk": 1.0}),
        Override(modules=["norm"], params={"select_topk": 0.8, "int8_mask": True})]), 3),
    "karcher": (Recipe("karcher", {}, [
        Override(layers=[0], params={"max_iter": 2}),
        Override(modules=["attention"], params={"tol": 1e-3}),
        Override(modules=["embed"], params={"max_iter": 0})]), 3),
    "multislerp": (Recipe("multislerp", {"weight": W}, [
        Override(layers=[1], modules=["mlp"], params={"weight": [1.0, 0.2, 0.4]}),
        Override(modules=["norm"], params={"normalize_weights": False, "weight": [0.2, 0.3, 0.5]})]), 3),
    "multislerp of the experts": (Recipe("multislerp", {"weight": W, "task_vectors": False}, [
        Override(layers=[2], params={"weight": [0.1, 0.1, 0.8]})]), 3),
    "nuslerp": (Recipe("nuslerp", {"weight": [0.3, 0.6]}, [
        Override(layers=[2], params={"nuslerp_flatten": False}),
        Override(layers=[1], modules=["attention"], params={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        Override(modules=["embed"], params={"weight": [1.0, 1.0]})]), 2),
    "nuslerp of the experts": (Recipe("nuslerp", {"weight": [0.7, 0.2], "nuslerp_flatten": False,
                                                  "nuslerp_row_wise": True, "task_vectors": False}, [
        Override(layers=[0], modules=["mlp"], params={"nuslerp_flatten": True})]), 2),
    "nearswap": (Recipe("nearswap", {"t": 0.005}, [
        Override(layers=[0], params={"t": 0.02}),
        Override(modules=["embed"], params={"t": 0.0})]), 1),
    "arcee_fusion": (Recipe("arcee_fusion", {}), 1),
    "ram": (Recipe("ram", {"epsilon": 0.005}, [
        Override(modules=["mlp"], params={"epsilon": 0.0}),
        Override(layers=[2], params={"epsilon": 0.02})]), 3),
    "ramplus_tl": (Recipe("ramplus_tl", {"epsilon": 0.005, "r": 0.5, "alpha": 0.5}, [
        Override(modules=["attention"], params={"r": 0.1, "alpha": 0.2}),
        Override(layers=[1], params={"epsilon": 0.01})]), 3),
}
NEW_METHODS = ("sce", "karcher", "multislerp", "nuslerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl")


def _write(name: str, root: Path) -> tuple:
    if name.startswith("llama"):
        dtype = torch.bfloat16 if name == "llama-bf16" else torch.float32
        return write_tiny_family(root, num_experts=3, sharded_expert=1, num_layers=3, dtype=dtype)
    return write_tiny_arch_family(root, name.split("-")[0], num_experts=3, num_layers=3, noise=0.02)


class Family:
    """Checkpoints of one family, the merge dtype and its resident cores by number of experts (made once)."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.base, self.experts = _write(name, root)
        self.dtype = "float32" if name == "llama-fp32" else "bfloat16"
        self._cores = {}

    def core(self, num_experts: int) -> MergeCore:
        if num_experts not in self._cores:
            self._cores[num_experts] = MergeCore(self.base, self.experts[:num_experts], device="cpu", dtype=self.dtype)
        return self._cores[num_experts]


@pytest.fixture(scope="module", params=["llama-fp32", "llama-bf16", "llama-fp32-merged-in-bf16", "qwen2-bf16",
                                        "mistral-bf16"])
def family(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("label", list(RECIPES))
def test_new_methods_equal_mergekit_bit_for_bit(family, label, tmp_path):
    recipe, n = RECIPES[label]
    core = family.core(n)
    assert str(core.dtype) == f"torch.{family.dtype}"
    theirs = run_mergekit(recipe, family.base, family.experts[:n], core.num_layers, tmp_path / "out",
                          dtype=family.dtype)
    assert_same(core.merge(recipe, seed=5), theirs, f"{family.name} {label}", exact=True)


def test_ram_in_small_chunks_equals_mergekit(tmp_path, monkeypatch):
    """RAM runs over chunks of elements (RAM+'s counts summed over them): any chunking gives mergekit's bits."""
    monkeypatch.setattr(ram, "RAM_CHUNK_ELEMENTS", 333)
    base, experts = write_tiny_arch_family(tmp_path, "mistral", num_experts=3, num_layers=2, noise=0.02)
    core = MergeCore(base, experts, device="cpu")
    assert max(s.numel for s in core.slots) > 3 * 333
    for label in ("ram", "ramplus_tl"):
        recipe = RECIPES[label][0]
        theirs = run_mergekit(recipe, base, experts, core.num_layers, tmp_path / label, dtype="bfloat16")
        assert_same(core.merge(recipe), theirs, f"{label} in chunks", exact=True)


def test_every_new_method_is_covered():
    assert {recipe.method for recipe, _ in RECIPES.values()} == set(NEW_METHODS)


def test_bf16_experts_are_read_exactly(tmp_path):
    """bf16 base + (expert - base) is not always the expert: the fixes give its checkpoint values back."""
    base, experts = write_tiny_arch_family(tmp_path, "qwen2", num_experts=2, num_layers=2, noise=0.02)
    core = MergeCore(base, experts, device="cpu", methods=["karcher"])
    fixes = [value for key, value in core._context.side.values.items() if key[0] == KIND]
    assert len(fixes) == 2 * len(core.slots)
    fixed = sum(f.positions.numel() for f in fixes if f.positions is not None)
    wrong = 0
    for e in range(2):
        for name, weights in open_model(experts[e]).load().items():
            slot = core.slot_by_name[name]
            rebuilt = torch.add(core.base_view(slot), core.task_vector(slot, e))
            wrong += int((rebuilt.view(torch.int16) != weights.reshape(-1).view(torch.int16)).sum())
    assert fixed == wrong > 0
    merged = core.merge(Recipe("karcher"))
    core.clear_cache()
    assert all(torch.equal(merged[n], t) for n, t in core.merge(Recipe("karcher")).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_new_methods_with_a_lora_expert_equal_mergekit(dtype, tmp_path):
    """A LoRA adapter expert is the model mergekit's BASE+ADAPTER makes (peft's merge_and_unload): its task
    vector and, for the methods that read weights, its weights (also when they are read per candidate)."""
    pytest.importorskip("peft")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base = write_tiny_llama(tmp_path / "base", tiny_llama_config(num_layers=2), dtype=dtype)
    full = write_tiny_expert(base, tmp_path / "full", seed=11)
    adapter = write_tiny_lora(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    pair, alone = [full, adapter], [adapter]
    cases = {
        "sce": (Recipe("sce", {"select_topk": 0.5}), pair),
        "karcher": (Recipe("karcher"), pair),
        "multislerp of the experts": (Recipe("multislerp", {"weight": [0.4, 0.6], "task_vectors": False}), pair),
        "nuslerp": (Recipe("nuslerp", {"weight": [0.4, 0.6]}), pair),
        "nuslerp of the experts": (Recipe("nuslerp", {"weight": [0.4, 0.6], "task_vectors": False}), pair),
        "nearswap": (Recipe("nearswap", {"t": 0.005}), alone),
        "arcee_fusion": (Recipe("arcee_fusion"), alone),
        "ramplus_tl": (Recipe("ramplus_tl", {"epsilon": 0.001}), pair),
    }
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    for label, (recipe, experts) in cases.items():
        text = recipe_to_mergekit_yaml(recipe, base, experts, 2, dtype=name)
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / label),
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                               lora_merge_cache=str(tmp_path / "lora_cache")))
        theirs = open_model(tmp_path / label).load()
        for cached in (True, False):  # fixes kept as side data, or weights read again per candidate
            core = MergeCore(base, experts, device="cpu", cache_orderings=cached)
            assert_same(core.merge(recipe), theirs, f"{label}, LoRA expert, side data {cached}", exact=True)


# ----------------------------------------------------------------------------- arcee_fusion's sampled quartiles
@pytest.fixture
def mergekit_samples_like_us(monkeypatch):
    """mergekit's arcee_fusion draws its 1M quartile samples from our (seed, tensor) generator."""
    import mergekit.merge_methods.arcee_fusion as arcee

    state = {"seed": 0, "name": None}
    method = arcee.arcee_fusion_merge_method
    original = method.implementation

    def implementation(group, **kwargs):
        state["name"] = group.metadata.name
        return original(group, **kwargs)

    class TorchWithOurRandint:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def randint(high, size, device=None):
            generator = mask_generator(state["seed"], state["name"], 0, device or "cpu")
            return torch.randint(high, size, generator=generator, device=device)

    monkeypatch.setattr(method, "implementation", implementation)
    monkeypatch.setattr(arcee, "torch", TorchWithOurRandint())
    return state


def test_arcee_fusion_samples_quartiles_of_large_tensors_reproducibly(tmp_path, mergekit_samples_like_us):
    config = tiny_llama_config(num_layers=1, hidden=64, intermediate=64, vocab=16400)  # embeddings: 1,049,600
    base = write_tiny_llama(tmp_path / "base", config)
    expert = write_tiny_expert(base, tmp_path / "expert", seed=3)
    core = MergeCore(base, [expert], device="cpu")
    assert core.slot_by_name["model.embed_tokens.weight"].numel > 1_000_000
    recipe = Recipe("arcee_fusion")
    mergekit_samples_like_us["seed"] = 9
    theirs = run_mergekit(recipe, base, [expert], core.num_layers, tmp_path / "out")
    ours = core.merge(recipe, seed=9)
    assert_same(ours, theirs, "arcee_fusion, sampled", exact=True)
    again, other = core.merge(recipe, seed=9), core.merge(recipe, seed=10)
    assert all(torch.equal(ours[n], again[n]) for n in ours)
    assert not torch.equal(ours["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------- memory tiers
def test_new_methods_give_the_resident_bits_on_every_tier(tmp_path):
    """Blocks in host memory or read from disk, and no room for the exact experts' fixes (read again from the
    checkpoints per candidate): the bits of the all-resident core, for every new method."""
    base, experts = write_tiny_family(tmp_path, num_experts=3, sharded_expert=1, num_layers=3, dtype=torch.bfloat16)
    for n in (1, 2, 3):
        resident = MergeCore(base, experts[:n], device="cpu")
        fixed, one_expert = fixed_bytes((base, experts[:n]))
        cores = {label: MergeCore(base, experts[:n], device="cpu", device_memory=fixed + int(device * one_expert),
                                  host_memory=int(host * one_expert), block_elements=BLOCK_ELEMENTS)
                 for label, (device, host) in BUDGETS.items()}
        cores["no room for side data"] = MergeCore(base, experts[:n], device="cpu", cache_orderings=False)
        for label, (recipe, wanted) in RECIPES.items():
            if wanted != n:
                continue
            expected = resident.merge(recipe, seed=2)
            for tier, core in cores.items():
                merged = core.merge(recipe, seed=2)
                bad = [name for name in expected if not torch.equal(merged[name], expected[name])]
                assert not bad, f"{label} on {tier}: {bad[:3]} differ"
        tiers = {t for label in BUDGETS for t in cores[label].plan.tiers.values()}
        assert {"host", "disk"} <= tiers
        markers = [v for k, v in cores["no room for side data"]._context.side.values.items() if k[0] == KIND]
        assert RECHECKPOINT in markers  # some experts' weights are read again per candidate
        for core in cores.values():
            core.close()


# ----------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory):
    return write_tiny_arch_family(tmp_path_factory.mktemp("qwen2"), "qwen2", num_experts=3, num_layers=3, noise=0.02)


@pytest.mark.parametrize("label", list(RECIPES))
def test_exported_mergekit_yaml_remakes_the_export(qwen2_family, label, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, experts = qwen2_family
    recipe, n = RECIPES[label]
    core = MergeCore(base, experts[:n], device="cpu")
    out = export_checkpoint(core, recipe, tmp_path / "export", seed=4, base_path=str(base),
                            expert_paths=[str(e) for e in experts[:n]])
    text = (out / "mergekit.yaml").read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "remade"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    ours, theirs = open_model(out).load(), open_model(tmp_path / "remade").load()
    assert set(ours) == set(theirs)
    different = [name for name, tensor in ours.items()
                 if theirs[name].dtype != tensor.dtype or not torch.equal(theirs[name], tensor)]
    assert not different, f"{label}: {len(different)} of {len(ours)} tensors differ: {different[:3]}"


def test_export_yaml_names_the_base_only_where_it_is_an_input(qwen2_family):
    base, experts = qwen2_family

    def config(recipe, n):
        return yaml.safe_load(recipe_to_mergekit_yaml(recipe, base, experts[:n], 3, dtype="bfloat16"))

    for label, uses_base in (("karcher", False), ("multislerp", True), ("multislerp of the experts", False),
                             ("nuslerp", True), ("nuslerp of the experts", False), ("nearswap", True),
                             ("arcee_fusion", True), ("sce", True), ("ram", True)):
        recipe, n = RECIPES[label]
        written = config(recipe, n)
        sources = [s["model"] for s in written["slices"][0]["sources"]]
        assert ("base_model" in written) == uses_base, label
        assert sources == [str(e) for e in experts[:n]] + ([str(base)] if uses_base else []), label
        assert "task_vectors" not in yaml.safe_dump(written), label
        assert written["out_dtype"] == written["dtype"] == "bfloat16"
    karcher = config(RECIPES["karcher"][0], 3)
    assert karcher["slices"][1]["parameters"]["max_iter"] == 10  # whole numbers stay integers
    assert karcher["slices"][0]["parameters"]["max_iter"] == [
        {"filter": "model.embed_tokens.weight", "value": 0}, {"filter": "norm", "value": 2},
        {"filter": "self_attn", "value": 2}, {"filter": "mlp", "value": 2}, {"value": 2}]


# ----------------------------------------------------------------------------- recipes and search spaces
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: Recipe("karcher", {"max_iter": 2.5}), r"max_iter must be in \[0, inf\) \(whole numbers\), got 2.5"),
        (lambda: Recipe("karcher", {"max_iter": -1}), r"max_iter must be in \[0, inf\) \(whole numbers\), got -1"),
        (lambda: Recipe("sce", {"select_topk": 0}), r"select_topk must be in \(0, 1\]"),
        (lambda: Recipe("nearswap", {"t": -0.1}), r"t must be in \[0, inf\)"),
        (lambda: Recipe("ramplus_tl", {"epsilon": 0}), r"epsilon must be in \(0, inf\)"),
        (lambda: Recipe("nuslerp", {"weight": 1, "nuslerp_flatten": 1}), "must be true or false"),
        (lambda: Recipe("multislerp", {"weight": 1}, [Override(layers=[0], params={"task_vectors": False})]),
         "'task_vectors' of 'multislerp' holds for the whole merge; set it in the recipe's params, not in override 0"),
        (lambda: Recipe("arcee_fusion", {"t": 1}), "unknown parameter 't' for merge method 'arcee_fusion'"),
        (lambda: Recipe("multislerp", {"weight": [1, -1]}).resolved_params(0, None, 2),
         "multislerp with normalize_weights needs weights that do not sum to 0"),
        (lambda: Recipe("karcher").validate(1), "'karcher' needs at least 2 expert"),
        (lambda: Recipe("nuslerp", {"weight": 1}).validate(3), "'nuslerp' needs exactly 2 expert"),
        (lambda: Recipe("nuslerp", {"weight": 1}).validate(1), "'nuslerp' needs at least 2 expert"),
        (lambda: Recipe("nearswap", {"t": 0.1}).validate(2), "'nearswap' needs exactly 1 expert"),
        (lambda: Recipe("arcee_fusion").validate(3), "'arcee_fusion' needs exactly 1 expert"),
    ],
)
def test_recipe_errors_name_the_parameter(make, pattern):
    with pytest.raises(EvomergeError, match=pattern):
        make()


def test_multislerp_without_a_direction_names_the_tensor():
    """Where mergekit raises (no mean direction among 3+ inputs), so does evomerge, naming the tensor and why."""
    a = torch.randn(8)
    with pytest.raises(EvomergeError, match="multislerp of tensor model.norm.weight: the weighted sum"):
        multislerp(torch.stack([a, -a, torch.zeros(8)]), [1.0, 1.0, 1.0], normalize_weights=True, eps=1e-8,
                   name="model.norm.weight")
    with pytest.raises(EvomergeError, match="every expert's task vector is zero there .*task_vectors: false"):
        multislerp(torch.zeros(3, 8), [1.0, 1.0, 1.0], normalize_weights=True, eps=1e-8, name="model.norm.weight")
    two = multislerp(torch.zeros(2, 8), [1.0, 1.0], normalize_weights=True, eps=1e-8, name="model.norm.weight")
    assert torch.equal(two, torch.zeros(8))  # two inputs: mergekit's linear fallback


def test_recipes_round_trip_and_snap_whole_numbers():
    for recipe, _ in RECIPES.values():
        assert Recipe.from_dict(recipe.to_dict()) == recipe
    snapped = Recipe("karcher", {"max_iter": 3}, [Override(layers=[0], params={"max_iter": 7})])
    assert get_method("karcher").param("max_iter").snap(6.6) == 7
    assert get_method("karcher").param("max_iter").snap(-0.4) == 0
    assert snapped.snapped() == snapped
    assert get_method("karcher").snap({"max_iter": 2.4, "tol": 0.01}) == {"max_iter": 2, "tol": 0.01}


def test_nearswap_at_t_0_is_the_base(tmp_path):
    base, experts = write_tiny_family(tmp_path, num_experts=1, sharded_expert=None, num_layers=1,
                                      dtype=torch.bfloat16)
    core = MergeCore(base, experts, device="cpu")
    merged = core.merge(Recipe("nearswap", get_method("nearswap").endpoint(None, 1)))
    assert all(torch.equal(tensor, open_model(base).load()[name]) for name, tensor in merged.items())


@pytest.mark.parametrize("method", NEW_METHODS)
def test_a_space_searches_each_new_method_at_every_granularity(method, qwen2_family):
    base, experts = qwen2_family
    n = next(n for recipe, n in RECIPES.values() if recipe.method == method)
    raw = demo_raw()
    raw["models"] = {"base": str(base), "experts": {f"e{i}": str(e) for i, e in enumerate(experts[:n])}}
    raw["merge"] = {"method": method}
    if method == "arcee_fusion":  # mergekit's arcee_fusion has no parameter
        with pytest.raises(EvomergeError, match="merge method arcee_fusion leaves no parameter to search"):
            parse_search_space(raw, source="space.yaml")
        return
    core = MergeCore(base, experts[:n], device="cpu")
    for granularity in ("global", "layer_group", "layer"):
        raw["merge"] = {"method": method, "granularity": granularity, "split_modules": granularity == "layer"}
        space = parse_search_space(raw, source="space.yaml")
        assert set(space.merge.ranges) == set(get_method(method).search_ranges())
        genes = genome_space(space.merge, space.expert_names, core.num_layers)
        genome = {name: gene.low + (gene.high - gene.low) * (0.3 if i % 2 else 0.7)
                  for i, (name, gene) in enumerate(genes.items())}
        recipe = genome_to_recipe(space.merge, space.expert_names, genome, core.num_layers)
        merged = core.merge(recipe)
        assert all(torch.isfinite(t.float()).all() for t in merged.values()), (method, granularity)
        if method == "karcher":
            assert isinstance(recipe.params["max_iter"], int)
