"""The memory-tiered merge core: budgets, tiers, streamed merges, threshold tables and plans.

Every budget must give the bits of the all-resident core, for every method and
seed: blocks kept in host memory or read from disk, side data as rank caches or
as threshold tables. bf16 checkpoints are used because ties at a magnitude
threshold are common there. Tests named *_cuda run where a GPU is present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge import MergeCore, Override, Recipe
from evomerge.merge.layout import Layout
from evomerge.merge.loading import open_model
from evomerge.merge.memory import parse_bytes
from evomerge.merge.methods import get_method
from evomerge.merge.planner import DEVICE, DISK, HOST, STAGING_SLOTS, workspace_bytes

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_tiny_family  # noqa: E402

W = [0.5, 0.3, 0.7]
RECIPES = {
    "linear": Recipe("linear", {"weight": W}),
    "task_arithmetic": Recipe("task_arithmetic", {"weight": W, "lambda": 0.8}),
    "ties": Recipe("ties", {"weight": W, "density": [0.5, 0.7, 0.3]},
                   [Override(layers=[1], modules=["mlp"], params={"density": 0.5123, "rescale": True})]),
    "breadcrumbs_ties": Recipe("breadcrumbs_ties", {"weight": W, "density": 0.6, "gamma": [0.0, 0.1, 0.2]}),
    "dare_ties": Recipe("dare_ties", {"weight": W, "density": [0.5, 0.7, 0.3]}),
    "della": Recipe("della", {"weight": W, "density": 0.5, "epsilon": [0.1, 0.2, 0.3]}),
    "model_stock": Recipe("model_stock", {}),
}
RANDOM = {"dare_ties", "della"}
BLOCK_ELEMENTS = 4096  # several blocks per layer of the tiny models


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_bf16")
    return write_tiny_family(root, num_experts=3, sharded_expert=1, num_layers=3, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def resident(family):
    base, experts = family
    return MergeCore(base, experts, device="cpu")


def fixed_bytes(family, block_elements=BLOCK_ELEMENTS) -> tuple:
    """(resident model + workspace + worst staging, one expert's task-vector bytes) of a streamed core."""
    base, experts = family
    layout = Layout.from_files(open_model(base), None, block_elements)
    fixed = layout.numel * layout.element_size + layout.passthrough_bytes + workspace_bytes(layout, len(experts), (), 1 << 24)
    staging = STAGING_SLOTS * (1 + len(experts)) * layout.largest_block * layout.element_size
    return fixed + staging, layout.numel * layout.element_size


# Budgets as (share of one expert's task vector beyond the fixed part on the device, host bytes in expert units).
BUDGETS = {
    "device+host": (0.5, 10.0),
    "disk, device below one expert": (0.3, 0.0),
    "host+disk": (0.0, 1.0),
}


@pytest.mark.parametrize("label", list(BUDGETS))
def test_streamed_merge_is_bit_identical_and_within_budget(label, family, resident):
    base, experts = family
    fixed, one_expert = fixed_bytes(family)
    device_share, host_share = BUDGETS[label]
    device_memory = fixed + int(device_share * one_expert)
    core = MergeCore(base, experts, device="cpu", device_memory=device_memory,
                     host_memory=int(host_share * one_expert), block_elements=BLOCK_ELEMENTS)
    tiers = set(core.plan.tiers.values())
    if "disk" in label:
        assert DISK in tiers
        assert core.plan.bytes_on(DEVICE) < one_expert  # less than one expert's task vectors on the device
    if "host" in label:
        assert HOST in tiers
    for name, recipe in RECIPES.items():
        for seed in (1, 2) if name in RANDOM else (1,):
            ours, theirs = core.merge(recipe, seed=seed), resident.merge(recipe, seed=seed)
            bad = [n for n in theirs if not torch.equal(ours[n], theirs[n])]
            assert not bad, f"{label} {name} seed {seed}: {bad[:3]} differ"
    report = core.memory_report()
    assert report["peak_device_bytes"] <= device_memory
    assert report["peak_host_bytes"] <= core.budgets.host
    assert report["bytes_moved_per_candidate"] == core.plan.streamed_bytes() > 0
    model, _ = core.new_model()
    core.merge_into(model, RECIPES["ties"], seed=1)
    expected = resident.merge(RECIPES["ties"], seed=1)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n].data, expected[n]) for n in expected)
    core.close()


def test_tight_plan_keeps_no_per_element_side_data(family, resident):
    """No device room left: TIES answers from threshold tables, DELLA recomputes its ranks, DARE keeps nothing."""
    base, experts = family
    fixed, _one_expert = fixed_bytes(family)
    core = MergeCore(base, experts, device="cpu", device_memory=fixed, host_memory=0, block_elements=BLOCK_ELEMENTS,
                     methods=["ties", "della", "dare_ties"])
    assert core.plan.cache_room < core.plan.cache_bytes_wanted  # the plan is tight
    for name in ("ties", "breadcrumbs_ties", "della", "dare_ties"):
        ours, theirs = core.merge(RECIPES[name], seed=3), resident.merge(RECIPES[name], seed=3)
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), name
    report = core.memory_report()
    assert report["side_data_cached_bytes"] <= core.plan.cache_room
    assert report["peak_device_bytes"] <= core.budgets.device
    della = [core._context.side.get(("della", s.index, e)) for s in core.slots for e in range(core.num_experts)]
    assert della.count(False) > 0  # at least some DELLA ranks are recomputed per candidate, not cached
    core.close()


def test_endpoints_load_into_the_merge_target(family, resident):
    """Calibration scores the base and experts in the model the merges write to: no second copy."""
    base, experts = family
    model, _ = resident.new_model()
    resident.load_weights_into(model, experts[2])
    params = dict(model.named_parameters())
    for name, tensor in open_model(experts[2]).iter_tensors():
        assert torch.equal(params[name].data, tensor), name
    resident.merge_into(model, RECIPES["linear"])  # and the next merge overwrites it all
    expected = resident.merge(RECIPES["linear"])
    assert all(torch.equal(params[n].data, expected[n]) for n in expected)


def test_resident_core_moves_nothing(resident):
    resident.merge(RECIPES["linear"])
    report = resident.memory_report()
    assert report["bytes_moved_per_candidate"] == 0 and report["streamed_bytes_per_candidate"] == 0
    assert report["peak_device_bytes"] <= report["device_budget_bytes"]


def _straddling_ties(core, density: float) -> int:
    """How many (tensor, expert) pairs have elements tied at their k-th magnitude, on both sides of k."""
    count = 0
    for slot in core.slots:
        for e in range(core.num_experts):
            magnitudes = core.task_vector(slot, e).abs().float()
            k = max(1, int(density * slot.numel))
            t = torch.sort(magnitudes, descending=True).values[k - 1]
            above, at = int((magnitudes > t).sum()), int((magnitudes == t).sum())
            count += above < k < above + at
    return count


def test_threshold_tables_equal_rank_caches_and_mergekit_on_bf16(family, resident, tmp_path):
    from mergekit_run import assert_same, run_mergekit

    base, experts = family
    tables = MergeCore(base, experts, device="cpu", cache_orderings=False)
    assert _straddling_ties(resident, 0.5) > 0  # the test data has ties at the threshold
    ties = Recipe("ties", {"weight": W, "density": 0.5},
                  [Override(layers=[1], modules=["mlp"], params={"density": [0.3, 0.7, 0.9]}),
                   Override(layers=[2], params={"density": 0.4, "rescale": True})])
    for recipe in (ties, RECIPES["ties"], RECIPES["breadcrumbs_ties"]):
        a, b = tables.merge(recipe), resident.merge(recipe)
        assert all(torch.equal(a[n], b[n]) for n in a), recipe.method
    assert tables.memory_report()["side_data_cached_bytes"] == 0
    assert resident.memory_report()["side_data_cached_bytes"] > 0
    for i, recipe in enumerate((ties, RECIPES["breadcrumbs_ties"])):
        theirs = run_mergekit(recipe, base, experts, tables.num_layers, tmp_path / f"out{i}", dtype="bfloat16")
        assert_same(tables.merge(recipe), theirs, recipe.method, exact=True)


# Qwen2- and Mistral-shaped bf16 families, base and three experts perturbed by N(0, (0.02 (e + 1))^2): the
# task vectors have many equal magnitudes, as real bf16 fine-tunes do, and thresholds fall inside them.
# Each recipe has an override off the density grid.
TIE_RECIPES = {
    "ties": Recipe("ties", {"weight": [0.7, 0.4, 1.0], "density": [0.3, 0.6, 0.8]},
                   [Override(layers=[1], modules=["mlp"], params={"density": 0.5123, "rescale": True})]),
    "breadcrumbs_ties": Recipe("breadcrumbs_ties", {"weight": [0.7, 0.4, 1.0], "density": [0.5, 0.7, 0.9],
                                                    "gamma": [0.0, 0.05, 0.1]},
                               [Override(layers=[2], params={"density": 0.6543, "gamma": 0.0217})]),
}


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def arch_family(request, tmp_path_factory):
    from tiny_models import write_tiny_arch_family

    base, experts = write_tiny_arch_family(tmp_path_factory.mktemp(request.param), request.param, num_experts=3,
                                           num_layers=4, noise=0.02)
    return request.param, base, experts


def _cores_on_every_tier(base, experts) -> dict:
    """label -> a core holding its blocks and side data one way (CPU budgets; all give mergekit's bits)."""
    resident = MergeCore(base, experts, device="cpu")
    fixed, one_expert = fixed_bytes((base, experts))
    cores = {
        "resident, rank caches": resident,
        "resident, threshold tables": MergeCore(base, experts, device="cpu", cache_orderings=False),
        # room for about a byte per element and expert: some rank caches, then tables with tie codes
        "resident, tables with tie codes": MergeCore(base, experts, device="cpu",
                                                     device_memory=resident.plan.device_bytes
                                                     + resident.numel * len(experts)),
    }
    for label, (device_share, host_share) in BUDGETS.items():
        cores[label] = MergeCore(base, experts, device="cpu", device_memory=fixed + int(device_share * one_expert),
                                 host_memory=int(host_share * one_expert), block_elements=BLOCK_ELEMENTS)
    return cores


def test_ties_equal_mergekit_on_bf16_families_on_every_tier(arch_family, tmp_path, monkeypatch):
    """TIES and breadcrumbs-TIES keep the elements mergekit 0.1.5 keeps among equal bf16 magnitudes
    (its own CPU sort order), bit for bit, whatever holds the blocks and the side data."""
    from mergekit_run import assert_same, run_mergekit

    from evomerge.merge.methods import orders
    from evomerge.merge.methods.orders import RankOrder, ThresholdOrder

    # The tiny tensors' tie codes would ride free with their tables; make them need room, as a large
    # bf16 tensor's do, so that rank caches, tables with codes and tables without them all occur.
    monkeypatch.setattr(orders, "FREE_CODE_BYTES", 0)
    arch, base, experts = arch_family
    cores = _cores_on_every_tier(base, experts)
    resident = cores["resident, rank caches"]
    assert resident.dtype == torch.bfloat16
    assert _straddling_ties(resident, 0.6) > len(resident.slots)  # most tensors split a tie group at 0.6
    for name, recipe in TIE_RECIPES.items():
        theirs = run_mergekit(recipe, base, experts, resident.num_layers, tmp_path / name, dtype="bfloat16")
        for label, core in cores.items():
            assert_same(core.merge(recipe), theirs, f"{arch} {name}, {label}", exact=True)
    kinds = {label: [o for o in core._context.side.values.values() if isinstance(o, (RankOrder, ThresholdOrder))]
             for label, core in cores.items()}
    assert all(isinstance(o, RankOrder) for o in kinds["resident, rank caches"])
    assert not any(isinstance(o, RankOrder) or o.code_bytes for o in kinds["resident, threshold tables"])
    assert any(isinstance(o, ThresholdOrder) and o.code_bytes for o in kinds["resident, tables with tie codes"])
    assert {DISK, HOST} <= {tier for label in BUDGETS for tier in cores[label].plan.tiers.values()}
    for core in cores.values():
        core.close()


def test_snapping_to_the_density_grid():
    ties = get_method("ties")
    assert ties.param("density").snap(0.51234) == 0.512
    assert ties.param("density").snap(0.0003) == 0.001  # stays in (0, 1]
    assert get_method("breadcrumbs").param("gamma").snap(0.99971) == 0.999  # stays in [0, 1)
    assert get_method("dare_ties").param("density").snap(0.51234) == 0.51234  # random drops need no grid
    recipe = Recipe("ties", {"weight": W, "density": [0.33333, 0.5, 0.7771]},
                    [Override(layers=[0], params={"density": 0.123456})]).snapped()
    assert recipe.params["density"] == [0.333, 0.5, 0.777] and recipe.params["weight"] == W
    assert recipe.overrides[0].params["density"] == 0.123


def test_budget_too_small_is_refused_before_loading(family, monkeypatch):
    base, experts = family
    import evomerge.merge.core as core_module

    monkeypatch.setattr(core_module.MergeCore, "_load", lambda self: pytest.fail("loaded weights"))
    with pytest.raises(EvomergeError, match=r"device memory budget .* too small.*resident model needs .*workspace.*staging"):
        MergeCore(base, experts, device="cpu", device_memory="100KB")
    with pytest.raises(EvomergeError, match="memory_budget|cannot read '20 parsecs' as a size"):
        MergeCore(base, experts, device="cpu", device_memory="20 parsecs")


def test_disk_tier_needs_safetensors(family, tmp_path):
    from evomerge.merge.tiers import SafetensorsMap

    not_safetensors = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(3)}, not_safetensors)
    with pytest.raises(EvomergeError, match="disk tier reads safetensors files"):
        SafetensorsMap(not_safetensors, tmp_path)
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x05")
    with pytest.raises(EvomergeError, match="cannot memory-map model.safetensors for the disk tier"):
        SafetensorsMap(broken, tmp_path)


def test_checkpoint_that_is_not_safetensors_is_refused_before_loading(family, tmp_path, monkeypatch):
    """Weights the disk tier cannot map (pytorch_model.bin): a clear error naming the model, nothing loaded."""
    import shutil

    import evomerge.merge.core as core_module

    base, experts = family
    pickled = tmp_path / "expert_bin"
    pickled.mkdir()
    shutil.copy(experts[0] / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(3)}, pickled / "pytorch_model.bin")
    monkeypatch.setattr(core_module.MergeCore, "_load", lambda self: pytest.fail("loaded weights"))
    fixed, _ = fixed_bytes(family)
    with pytest.raises(EvomergeError, match=r"expert_bin: no safetensors weights"):
        MergeCore(base, [pickled, *experts[1:]], device="cpu", device_memory=fixed, host_memory=0,
                  block_elements=BLOCK_ELEMENTS)


def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 << 30 and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes(None) is None
    for bad in ("-1GB", "lots", True):
        with pytest.raises(EvomergeError, match="size"):
            parse_bytes(bad, "memory.device")


LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


def test_plan_of_a_7b_family_without_weights():
    from evomerge.merge.memory import Budgets
    from evomerge.merge.planner import plan_memory

    layout = Layout.from_config(LLAMA_7B)
    assert 6.7e9 < layout.numel < 6.8e9
    ties = [get_method("ties")]
    for host, disk in ((64 * 10**9, False), (32 * 10**9, True)):  # 4 x 13.5 GB fit 22 + 64 GB, not 22 + 32
        plan = plan_memory(layout, 3, Budgets(device=22 * 10**9, host=host), methods=ties, pinned=True)
        assert plan.device_bytes <= plan.budgets.device and plan.host_bytes <= plan.budgets.host
        assert plan.streamed_bytes() > 0 and (plan.bytes_on(DISK) > 0) == disk
        assert (plan.pinned_staging_bytes > 0) == disk
    assert "projected transfer" in plan.describe()
    with pytest.raises(EvomergeError, match="resident model needs 12.55 GiB"):
        plan_memory(layout, 3, Budgets(device=12 * 2**30, host=64 * 10**9), methods=ties, pinned=True)


def test_plan_command_and_memory_block(family, tmp_path, capsys):
    import yaml

    from evomerge.cli import main
    from evomerge.search.space import load_search_space

    base, experts = family
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"id": "1", "prompt": "1+1=", "answer": "2"}\n')
    fixed, one_expert = fixed_bytes(family, 1 << 26)
    space = {"name": "p", "models": {"base": str(base), "experts": [str(e) for e in experts]},
             "merge": {"method": "ties"}, "benchmarks": [{"name": "b", "path": str(bench)}],
             "device": "cpu", "memory": {"device": fixed + one_expert, "host": "1KB"}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    loaded = load_search_space(path)
    assert loaded.memory == {"device_memory": fixed + one_expert, "host_memory": 1000}
    assert "memory" not in loaded.study_config()  # budgets may change on resume
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "streamed per candidate" in out and "disk" in out
    assert main(["plan", str(path), "--device-memory", "10KB"]) == 2
    assert "resident model needs" in capsys.readouterr().err
    space["memory"] = {"device": "lots"}
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(EvomergeError, match="memory.device: cannot read 'lots'"):
        load_search_space(path)
    space["memory"] = {"gpu": "1GB"}
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(EvomergeError, match="unknown key memory.gpu"):
        load_search_space(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_merge_is_bit_identical_cuda(family):
    base, experts = family
    resident_cuda = MergeCore(base, experts, device="cuda")
    fixed, one_expert = fixed_bytes(family)
    for device_share, host_share in BUDGETS.values():
        core = MergeCore(base, experts, device="cuda", device_memory=fixed + int(device_share * one_expert),
                         host_memory=int(host_share * one_expert) + 2**20, block_elements=BLOCK_ELEMENTS)
        for name, recipe in RECIPES.items():
            ours, theirs = core.merge(recipe, seed=1), resident_cuda.merge(recipe, seed=1)
            assert all(torch.equal(ours[n], theirs[n]) for n in theirs), name
        assert core.memory_report()["peak_device_bytes"] <= core.budgets.device
        core.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ties_bf16_equal_mergekit_on_cuda(family, tmp_path):
    """mergekit --cuda sorts |delta| in bf16 on the GPU: the core makes the same call on the same device."""
    pytest.importorskip("mergekit")
    from mergekit_run import assert_same, run_mergekit

    base, experts = family
    core = MergeCore(base, experts, device="cuda", cache_orderings=False)
    recipe = RECIPES["ties"]
    theirs = run_mergekit(recipe, base, experts, core.num_layers, tmp_path / "out", dtype="bfloat16", cuda=True)
    assert_same(core.merge(recipe), theirs, "ties cuda", exact=True)


def test_memory_flags_on_search_resume_export_and_plan(family, tmp_path):
    """--device-memory / --host-memory on every command that builds a merge core; they override the space's block."""
    import evomerge.cli as cli
    from evomerge.search.space import parse_search_space

    parser = cli.build_parser()
    for argv in (["search", "s.yaml"], ["resume", "runs/x"], ["export", "runs/x"], ["plan", "s.yaml"]):
        args = parser.parse_args([*argv, "--device-memory", "20GiB", "--host-memory", "60GB"])
        assert (args.device_memory, args.host_memory) == ("20GiB", "60GB"), argv[0]
    base, experts = family
    raw = {"name": "m", "models": {"base": str(base), "experts": [str(e) for e in experts]},
           "merge": {"method": "ties"}, "benchmarks": [{"name": "b", "path": str(tmp_path / "b.jsonl")}],
           "memory": {"device": "1GiB", "host": "2GiB", "scoring_headroom": "1GiB"}}
    (tmp_path / "b.jsonl").write_text('{"id": "1", "prompt": "1+1=", "answer": "2"}\n')
    space = parse_search_space(raw, source="m.yaml")
    args = parser.parse_args(["search", "s.yaml", "--device-memory", "20GiB"])
    assert cli._with_memory(space, args).memory == {"device_memory": 20 << 30, "host_memory": 2 << 30,
                                                    "scoring_headroom": 1 << 30}


def test_meta_parameters_only_in_the_building_thread():
    """MergeCore builds its model with parameters on the meta device; a model another thread builds
    meanwhile keeps real weights (the hook is per thread, not a process-wide patch)."""
    import threading

    import torch

    from evomerge.merge.core import _parameters_on_meta

    started, release, built = threading.Event(), threading.Event(), {}

    def other_thread():
        started.wait()
        built["other"] = torch.nn.Linear(3, 2)
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with _parameters_on_meta():
        started.set()
        release.wait(timeout=30)
        built["mine"] = torch.nn.Linear(3, 2)
    worker.join()
    assert built["mine"].weight.is_meta and not built["other"].weight.is_meta
    assert not torch.nn.Linear(3, 2).weight.is_meta  # and after the block, in this thread too
