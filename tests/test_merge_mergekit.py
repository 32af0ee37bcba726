"""Our merge core against mergekit 0.1.5 on small random Llama models.

Deterministic methods are compared directly: mergekit runs on the YAML from
`recipe_to_mergekit_yaml` and every output tensor must match ours to float
tolerance (on CPU float32 they currently match bit for bit).

Random-drop methods (dare_ties, dare_linear, della) are compared with *the same
masks*: while mergekit runs, its `torch.bernoulli` (inside mergekit.sparsify) is
replaced by our mask draw, seeded from (candidate seed, tensor name, expert
index) exactly as the core seeds it. A statistical check of DARE's kept
fraction covers the mask distribution itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge import MergeCore, Override, Recipe, recipe_to_mergekit_yaml
from evomerge.merge import methods as M

sys.path.insert(0, str(Path(__file__).parent))
from mergekit_run import assert_same, run_mergekit  # noqa: E402
from tiny_models import tiny_llama_config, write_tiny_expert, write_tiny_family, write_tiny_llama  # noqa: E402

mergekit = pytest.importorskip("mergekit", reason="mergekit (test extra, ==0.1.5) is not installed")

WEIGHTS = [0.5, 0.3, 0.7]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base, experts = write_tiny_family(root, num_experts=3, sharded_expert=1, num_layers=3)
    return base, experts


@pytest.fixture(scope="module")
def core(family):
    base, experts = family
    return MergeCore(base, experts, device="cpu")


DETERMINISTIC = {
    "linear": Recipe("linear", {"weight": WEIGHTS}),
    "linear_raw": Recipe("linear", {"weight": WEIGHTS, "normalize": False}),
    "task_arithmetic": Recipe("task_arithmetic", {"weight": WEIGHTS, "lambda": 0.8}),
    "ties": Recipe("ties", {"weight": WEIGHTS, "density": [0.5, 0.7, 0.3]}),
    "ties_dense_int8": Recipe("ties", {"weight": WEIGHTS, "int8_mask": True}),
    "ties_rescaled": Recipe("ties", {"weight": WEIGHTS, "density": 0.4, "rescale": True, "normalize": False}),
    "breadcrumbs": Recipe("breadcrumbs", {"weight": WEIGHTS, "density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": Recipe("breadcrumbs_ties", {"weight": WEIGHTS, "density": 0.6, "gamma": [0.0, 0.1, 0.2]}),
    "model_stock": Recipe("model_stock", {}),
    "model_stock_filter_wise": Recipe("model_stock", {"filter_wise": True}),
    "per_layer_module": Recipe(
        "ties",
        {"weight": WEIGHTS, "density": 0.5},
        overrides=[
            Override(layers=[1], modules=["mlp"], params={"weight": [1.0, 0.0, 0.2], "density": 0.9}),
            Override(layers=[0, 2], modules=["attention"], params={"density": [0.2, 0.3, 0.4], "lambda": 1.3}),
            Override(modules=["embed"], params={"density": 0.2, "rescale": True}),
            Override(modules=["norm"], params={"normalize": False}),
            Override(layers=[2], params={"weight": 0.25}),
        ],
    ),
}


@pytest.mark.parametrize("label", list(DETERMINISTIC))
def test_deterministic_methods_equal_mergekit(label, family, core, tmp_path):
    base, experts = family
    recipe = DETERMINISTIC[label]
    theirs = run_mergekit(recipe, base, experts, core.num_layers, tmp_path / "out")
    assert_same(core.merge(recipe, seed=3), theirs, label)


def test_slerp_equals_mergekit(family, tmp_path):
    base, experts = family
    recipe = Recipe(
        "slerp",
        {"t": 0.3},
        overrides=[Override(layers=[1], modules=["attention"], params={"t": 0.8}), Override(modules=["embed"], params={"t": 0.0})],
    )
    slerp_core = MergeCore(base, experts[1:2], device="cpu")
    theirs = run_mergekit(recipe, base, experts[1:2], slerp_core.num_layers, tmp_path / "out")
    assert_same(slerp_core.merge(recipe), theirs, "slerp")


@pytest.fixture
def mergekit_uses_our_masks(monkeypatch):
    """Make mergekit draw its random masks from our per-(seed, tensor, expert) generators."""
    import mergekit.merge_methods.generalized_task_arithmetic as gta
    import mergekit.sparsify as sparsify_module

    state = {"seed": 0, "name": None, "index": -1}
    original_merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group
    original_sparsify = gta.sparsify

    def merge_group(self, group, **parameters):
        state["name"], state["index"] = group.metadata.name, -1
        return original_merge_group(self, group, **parameters)

    def sparsify(*args, **kwargs):  # called once per expert, in expert order
        state["index"] += 1
        return original_sparsify(*args, **kwargs)

    class TorchWithOurBernoulli:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def bernoulli(probs):
            generator = M.mask_generator(state["seed"], state["name"], state["index"], probs.device)
            return M.bernoulli_mask(probs, generator)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", merge_group)
    monkeypatch.setattr(gta, "sparsify", sparsify)
    monkeypatch.setattr(sparsify_module, "torch", TorchWithOurBernoulli())
    return state


RANDOM = {
    "dare_ties": Recipe("dare_ties", {"weight": WEIGHTS, "density": [0.5, 0.7, 0.3]}),
    "dare_linear": Recipe("dare_linear", {"weight": WEIGHTS, "density": 0.6}),
    "dare_linear_no_rescale": Recipe("dare_linear", {"weight": WEIGHTS, "density": 0.6, "rescale": False}),
    "della": Recipe("della", {"weight": WEIGHTS, "density": 0.5, "epsilon": [0.1, 0.2, 0.3]}),
    "della_linear": Recipe(
        "della_linear",
        {"weight": WEIGHTS, "density": 0.6},
        overrides=[Override(layers=[1], modules=["mlp", "norm"], params={"density": 0.3, "epsilon": 0.05})],
    ),
}


@pytest.mark.parametrize("label", list(RANDOM))
def test_random_methods_equal_mergekit_with_same_masks(label, family, core, tmp_path, mergekit_uses_our_masks):
    base, experts = family
    mergekit_uses_our_masks["seed"] = 11
    recipe = RANDOM[label]
    theirs = run_mergekit(recipe, base, experts, core.num_layers, tmp_path / "out")
    assert_same(core.merge(recipe, seed=11), theirs, label)


def test_mergekit_yaml_cli_accepts_export(family, core, tmp_path):
    base, experts = family
    recipe = DETERMINISTIC["per_layer_module"]
    config = tmp_path / "merge.yaml"
    config.write_text(recipe_to_mergekit_yaml(recipe, base, experts, core.num_layers))
    cli = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(cli).exists():
        pytest.skip("mergekit-yaml executable not found next to the Python interpreter")
    subprocess.run([cli, str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"], check=True)
    from evomerge.merge.loading import open_model

    assert_same(core.merge(recipe), open_model(tmp_path / "out").load(), "cli")


# ----------------------------------------------------------------------------- equal magnitudes
def _checkpoint_task_vector(numel: int, seed: int, dtype, noise: float = 0.02) -> torch.Tensor:
    """expert - base as two checkpoints in `dtype` give it (in bf16: many equal magnitudes)."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=generator) * 0.02).to(dtype)
    expert = (base.float() + torch.randn(numel, generator=generator) * noise).to(dtype)
    return expert - base


@pytest.mark.parametrize("numel, dtype", [(3000, torch.bfloat16), (50_000, torch.bfloat16), (50_000, torch.float32)])
def test_magnitude_selections_keep_mergekits_elements_for_every_k(numel, dtype):
    """Rank caches and threshold tables (with tie codes and without) keep exactly the elements
    mergekit.sparsify keeps, on the density grid and off it, equal magnitudes at the threshold included."""
    import random

    from mergekit.sparsify import magnitude, magnitude_outliers

    from evomerge.merge.methods.orders import (ASCENDING, DESCENDING, RankOrder, ThresholdOrder, grid_positions,
                                               order_key, window_positions)

    task_vector = _checkpoint_task_vector(numel, seed=numel, dtype=dtype)
    key = order_key(task_vector)
    orders = {}
    for direction, positions in ((DESCENDING, grid_positions(numel)), (ASCENDING, window_positions(numel))):
        coded = ThresholdOrder.build(task_vector, direction, positions)
        uncoded = ThresholdOrder.build(task_vector, direction, positions)
        uncoded.drop_codes()  # no room for the codes: those thresholds repeat mergekit's sort
        orders[direction] = {"ranks": RankOrder.build(task_vector, direction), "table": coded, "table, no codes": uncoded}
        if dtype == torch.bfloat16:
            assert coded.code_bytes > 0  # grid thresholds split groups of equal magnitudes
    rng = random.Random(numel)
    densities = [0.001, 0.3, 0.6, 0.8, 0.999, *(rng.randrange(1, 1000) / 1000 for _ in range(15)),
                 *(rng.random() for _ in range(5))]  # the last ones off the grid
    nonzero = task_vector != 0  # which zeros are kept changes no bit
    for density in densities:
        expected = magnitude(task_vector, density) != 0
        k = max(1, int(density * numel))
        for label, order in orders[DESCENDING].items():
            assert torch.equal(order.first(k, key) & nonzero, expected), (label, density)
        for gamma in (0.0, 0.01, rng.randrange(0, 200) / 1000, rng.random() * 0.2):
            expected = magnitude_outliers(task_vector, density, gamma=gamma) != 0
            target = int(density * numel)
            n_bot = max(0, numel - target - int(gamma * numel))
            for label, order in orders[ASCENDING].items():
                assert torch.equal(order.window(n_bot, n_bot + target, key) & nonzero, expected), (label, density, gamma)


# ----------------------------------------------------------------------------- reproducibility
def test_dare_reproducible_per_seed_and_independent_of_order(family, core):
    base, experts = family
    recipe = RANDOM["dare_ties"]
    a, b, c = core.merge(recipe, seed=5), core.merge(recipe, seed=5), core.merge(recipe, seed=6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # A core that batches/orders differently (tiny chunks, no caches) draws the same masks.
    other = MergeCore(base, experts, device="cpu", cache_orderings=False, chunk_elements=64)
    d = other.merge(recipe, seed=5)
    assert all(torch.equal(a[n], d[n]) for n in a)


def test_dare_keeps_density_fraction(family, core):
    recipe = Recipe("dare_linear", {"weight": [1.0, 0.0, 0.0], "density": 0.3, "rescale": False})
    merged = core.merge(recipe, seed=2)
    name = "model.layers.0.mlp.up_proj.weight"
    delta = merged[name] - core.base_view(core.slot_by_name[name]).view(merged[name].shape)
    kept = (delta != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.03


def test_merge_into_new_model_matches_merge(family, core):
    model, _ = core.new_model()
    recipe = DETERMINISTIC["per_layer_module"]
    core.merge_into(model, recipe, seed=1)
    expected = core.merge(recipe, seed=1)
    params = dict(model.named_parameters())
    for name, tensor in expected.items():
        assert torch.equal(params[name].data, tensor), name
    out = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()
    # A model not made by new_model gets a copy.
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(str(family[0]))
    core.merge_into(plain, recipe, seed=1)
    for name, param in plain.named_parameters():
        assert torch.equal(param.data, expected[name]), name


def test_tied_embeddings(tmp_path):
    config = tiny_llama_config(num_layers=1, tied=True)
    base = write_tiny_llama(tmp_path / "base", config)
    expert = write_tiny_expert(base, tmp_path / "e0", seed=1)
    tied_core = MergeCore(base, [expert], device="cpu")
    assert "lm_head.weight" not in tied_core.tensor_names
    model, tokenizer = tied_core.new_model()
    assert tokenizer is None
    tied_core.merge_into(model, Recipe("task_arithmetic", {"weight": 0.5}))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    merged = tied_core.merge(Recipe("task_arithmetic", {"weight": 0.5}))
    assert torch.equal(model.lm_head.weight.data, merged["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------- input errors
def test_loading_errors(family, tmp_path):
    base, experts = family
    with pytest.raises(EvomergeError, match="does not exist"):
        MergeCore(tmp_path / "nope", experts)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(Path(base) / "config.json", empty / "config.json")
    with pytest.raises(EvomergeError, match="no safetensors"):
        MergeCore(base, [empty])

    other_arch = write_tiny_llama(tmp_path / "deeper", tiny_llama_config(num_layers=2))
    with pytest.raises(EvomergeError, match="num_hidden_layers"):
        MergeCore(base, [other_arch])

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(experts[0]) / "model.safetensors"))
    missing = tmp_path / "missing"
    shutil.copytree(experts[0], missing)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EvomergeError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        MergeCore(base, [missing])

    reshaped = tmp_path / "reshaped"
    shutil.copytree(experts[0], reshaped)
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(7)
    save_file(bad, str(reshaped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EvomergeError, match=r"model\.norm\.weight has shape \[7\].*\[32\]"):
        MergeCore(base, [reshaped])


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: Recipe("tie", {"weight": 1}), "valid methods: .*ties"),
        (lambda: Recipe("ties", {"weight": 1, "dens": 0.5}), "unknown parameter 'dens'.*valid: weight, density"),
        (lambda: Recipe("ties", {"weight": 1, "density": 0}), r"density must be in \(0, 1\]"),
        (lambda: Recipe("ties", {"weight": 1, "density": 1.2}), r"density must be in \(0, 1\]"),
        (lambda: Recipe("slerp", {"t": 1.5}), r"t must be in \[0, 1\]"),
        (lambda: Recipe("ties", {"weight": float("nan")}), "finite number"),
        (lambda: Recipe("ties", {"weight": 1, "lambda": [1, 2, 3]}), "shared by all experts"),
        (lambda: Recipe("ties", {"weight": 1}, [Override(modules=["ffn"])]), "unknown module type 'ffn'"),
        (lambda: Recipe("ties", {"weight": 1}, [Override(layers=[-1])]), "non-negative"),
    ],
)
def test_recipe_construction_errors(make, pattern):
    with pytest.raises(EvomergeError, match=pattern):
        make()


def test_recipe_errors_that_need_the_experts(core):
    with pytest.raises(EvomergeError, match="2 values but there are 3 experts"):
        core.merge(Recipe("ties", {"weight": [1, 2]}))
    with pytest.raises(EvomergeError, match="needs parameter 'weight'"):
        core.merge(Recipe("ties", {"density": 0.5}))
    with pytest.raises(EvomergeError, match="exactly 1 expert"):
        core.merge(Recipe("slerp", {"t": 0.5}))
    with pytest.raises(EvomergeError, match=r"density±epsilon in \(0, 1\)"):
        core.merge(Recipe("della", {"weight": 1, "density": 0.1, "epsilon": 0.2}))
    with pytest.raises(EvomergeError, match="at least 2 expert"):
        Recipe("model_stock").validate(1)


def test_recipe_json_round_trip():
    import json

    import numpy as np

    data = DETERMINISTIC["per_layer_module"].to_dict()
    data["params"] = {**data["params"], "weight": (np.float32(0.5), np.float64(0.3), 0.7)}
    recipe = Recipe.from_dict(data)
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe
    assert again.params_for("model.layers.1.mlp.up_proj.weight")["weight"] == [1.0, 0.0, 0.2]
    assert again.params_for("model.layers.2.mlp.up_proj.weight")["weight"] == 0.25
    assert again.params_for("model.layers.0.self_attn.q_proj.weight")["lambda"] == 1.3
    assert again.params_for("model.norm.weight") == {"weight": [0.5, 0.3, 0.7], "density": 0.5, "normalize": False}
