"""LoRA adapters as experts: the task vector is what peft's merge_and_unload() changes, within the memory plan.

References: peft 0.21's merge_and_unload() (the merged model, bit for bit) and
mergekit 0.1.5 reading the exported `BASE+ADAPTER` references (which it merges
with peft into its --lora-merge-cache). Adapters are made by peft on tiny
random models (tests/tiny_models.py) with random factors, so every change an
adapter can make is nonzero: rslora, rank / alpha patterns, an embedding
target, modules_to_save, GPT-2 Conv1D (fan_in_fan_out), trained biases and a
LoRA bias on a tied Qwen2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import evomerge.demo as demo
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.export import export_checkpoint
from evomerge.merge import MergeCore, Recipe, recipe_to_mergekit_yaml
from evomerge.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterWeights, open_adapter, open_experts
from evomerge.merge.layout import Layout
from evomerge.merge.loading import open_model
from evomerge.merge.planner import DEVICE, DISK, FACTORS, STAGING_SLOTS, workspace_bytes
from evomerge.search.candidates import DataFlowMerge, ParameterMerge, load_model_folder
from evomerge.search.plan import plan_space
from evomerge.search.preflight import _check_models
from evomerge.search.space import parse_search_space

sys.path.insert(0, str(Path(__file__).parent))
from small_space import small_space  # noqa: E402
from tiny_models import (  # noqa: E402
    peft_merged,
    tiny_llama_config,
    write_tiny_expert,
    write_tiny_llama,
    write_tiny_lora,
)

pytest.importorskip("peft", reason="peft (installed with mergekit, the test extra) is not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA_LORA = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                  modules_to_save=["lm_head"])
W = [0.7, 0.5]


def _qwen2_tied_base(path, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.to(dtype).save_pretrained(str(path))
    return Path(path)


def _gpt2_base(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(str(path))
    return Path(path)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float32 Llama base, one full fine-tune, one adapter, and the adapter merged by peft (saved as a model)."""
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_llama(root / "base", tiny_llama_config(num_layers=3))
    full = write_tiny_expert(base, root / "full", seed=11)
    adapter = write_tiny_lora(base, root / "adapter", seed=5, **LLAMA_LORA)
    merged = root / "adapter_merged"
    peft_merged(base, adapter, merged)
    return {"root": root, "base": base, "full": full, "adapter": adapter, "merged": merged}


ADAPTER_KINDS = {
    # name: (base writer, dtype, LoraConfig kwargs)
    "llama_fp32_rslora_patterns_embed_save": (lambda p: write_tiny_llama(p, tiny_llama_config()), None, LLAMA_LORA),
    "llama_bf16": (lambda p: write_tiny_llama(p, tiny_llama_config(), dtype=torch.bfloat16), None, LLAMA_LORA),
    "gpt2_conv1d_fan_in_fan_out": (_gpt2_base, None,
                                   dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                        fan_in_fan_out=True)),
    "qwen2_bf16_tied_bias_all_lora_bias": (lambda p: _qwen2_tied_base(p, torch.bfloat16), None,
                                           dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                                bias="all", lora_bias=True)),
    "qwen2_bf16_tied_embed_bias_lora_only": (lambda p: _qwen2_tied_base(p, torch.bfloat16), None,
                                             dict(r=4, lora_alpha=8, target_modules=["v_proj", "embed_tokens"],
                                                  bias="lora_only")),
}


@pytest.mark.parametrize("kind", list(ADAPTER_KINDS))
def test_adapter_task_vector_is_peft_merge_and_unload(kind, tmp_path):
    """Every base tensor merged from the adapter equals peft's merge_and_unload() bit for bit, and so does the
    model `load_weights_into` (calibration's "expert alone") writes; a task-arithmetic merge at weight 1
    equals it bit for bit in float32, within one rounding of the task vector in bf16."""
    write_base, dtype, lora = ADAPTER_KINDS[kind]
    base = write_base(tmp_path / "base")
    adapter = write_tiny_lora(base, tmp_path / "adapter", seed=3, dtype=dtype, **lora)
    theirs = peft_merged(base, adapter)
    base_files = open_model(base)
    files = open_adapter(adapter, base_files)
    assert files.changed and all(files.base.shapes[name] == theirs[name].shape for name in files.changed)
    weights = AdapterWeights(files, "cpu")
    for name, tensor in base_files.load().items():
        ours = weights.merged(name, tensor) if weights.changes(name) else tensor
        assert torch.equal(ours, theirs[name]), f"{kind}: {name} differs from peft's merge"
    if kind.startswith("gpt2"):
        return  # the core's layers are Llama-style `layers.N`; GPT-2's merged weights are checked above
    core = MergeCore(base, [adapter], device="cpu")
    model, _ = core.new_model()
    core.load_weights_into(model, adapter)
    params = dict(model.named_parameters())
    for slot in core.slots:
        assert torch.equal(params[slot.name], theirs[slot.name]), f"{kind}: load_weights_into {slot.name}"
    merged = core.merge(Recipe("task_arithmetic", {"weight": [1.0]}))
    for slot in core.slots:
        ours, ref = merged[slot.name], theirs[slot.name]
        if core.dtype == torch.float32:
            assert torch.equal(ours, ref), f"{kind}: task arithmetic {slot.name}"
        else:  # bf16: base + (merged - base) rounds the task vector and the sum, as for a full fine-tune:
            # within one unit in the last place of the larger of the weight and the task vector
            task_vector = ref.float() - core.base_view(slot).view(slot.shape).float()
            scale = torch.maximum(ref.float().abs(), task_vector.abs())
            ulp = torch.ldexp(torch.ones_like(scale), torch.frexp(scale).exponent - 8)
            assert ((ours.float() - ref.float()).abs() <= ulp).all(), f"{kind}: task arithmetic {slot.name}"


RECIPES = {
    "task_arithmetic": Recipe("task_arithmetic", {"weight": W, "lambda": 0.9}),
    "ties": Recipe("ties", {"weight": W, "density": [0.5, 0.3]}),
    "linear": Recipe("linear", {"weight": W}),
    "dare_ties": Recipe("dare_ties", {"weight": W, "density": 0.6}),
    "breadcrumbs": Recipe("breadcrumbs", {"weight": W, "density": 0.8, "gamma": 0.05}),
    "model_stock": Recipe("model_stock", {}),
}


def test_mixed_family_merges_as_the_merged_full_model(family):
    """A full fine-tune + an adapter merge as if the adapter were the model peft merges from it, every method."""
    with_adapter = MergeCore(family["base"], [family["full"], family["adapter"]], device="cpu")
    with_merged = MergeCore(family["base"], [family["full"], family["merged"]], device="cpu")
    for label, recipe in RECIPES.items():
        ours, theirs = with_adapter.merge(recipe, seed=9), with_merged.merge(recipe, seed=9)
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), f"{label}: {name}"


def _run_mergekit(text: str, out: Path, cache: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                                             lora_merge_cache=str(cache)))
    return open_model(out).load()


@pytest.mark.parametrize("label", ["ties", "linear"])
def test_mixed_family_equals_mergekit(label, family, tmp_path):
    """mergekit reads the adapter expert as BASE+ADAPTER (merged by peft) and makes the same merge."""
    pytest.importorskip("mergekit")
    base, experts = family["base"], [family["full"], family["adapter"]]
    core = MergeCore(base, experts, device="cpu")
    text = recipe_to_mergekit_yaml(RECIPES[label], base, experts, core.num_layers)
    assert text.startswith("# LoRA experts are named BASE+ADAPTER") and f"{base}+{family['adapter']}" in text
    theirs = _run_mergekit(text, tmp_path / "out", tmp_path / "cache")
    ours = core.merge(RECIPES[label])
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), f"{label}: {name} differs from mergekit"


def test_export_is_remade_by_mergekit_yaml(family, tmp_path):
    """The export's mergekit.yaml names the adapter BASE+ADAPTER; `mergekit-yaml --lora-merge-cache` re-makes it."""
    pytest.importorskip("mergekit")
    experts = [family["full"], family["adapter"]]
    core = MergeCore(family["base"], experts, device="cpu")
    recipe = Recipe("ties", {"weight": W, "density": 0.5})
    out = export_checkpoint(core, recipe, tmp_path / "export", seed=0, base_path=str(family["base"]),
                            expert_paths=[str(p) for p in experts], expert_names=["full", "adapter"])
    assert "- expert `adapter`: `" + str(family["adapter"]) + "` (LoRA adapter on the base)" in (
        out / "README.md").read_text()
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(out / "mergekit.yaml"), str(tmp_path / "remade"), "--lora-merge-cache",
                    str(tmp_path / "cache"), "--no-copy-tokenizer"], check=True, capture_output=True)
    ours, theirs = open_model(out).load(), open_model(tmp_path / "remade").load()
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def _smallest_budget(family, block_elements: int) -> int:
    """Device bytes for the resident model, the workspace, the adapter's factors, staging for the base and the
    full expert, and a buffer to recompute the adapter's largest block in: the least the planner accepts."""
    base = open_model(family["base"])
    adapter = open_adapter(family["adapter"], base)
    layout = Layout.from_files(base, None, block_elements)
    size = layout.element_size
    fixed = layout.numel * size + layout.passthrough_bytes + workspace_bytes(layout, 2, (), 1 << 24)
    return fixed + adapter.device_bytes + STAGING_SLOTS * 2 * layout.largest_block * size + layout.largest_block * size


def test_every_budget_gives_the_bits_of_the_resident_core(family):
    """Adapter blocks dense on the device or recomputed from the factors per candidate: the same bits, within
    the budget, nothing of the adapter copied between tiers."""
    experts = [family["full"], family["adapter"]]
    resident = MergeCore(family["base"], experts, device="cpu", block_elements=4096)
    smallest = _smallest_budget(family, 4096)
    budget = smallest + Layout.from_files(open_model(family["base"]), None, 4096).numel * 4  # the base's blocks
    tight = MergeCore(family["base"], experts, device="cpu", block_elements=4096, device_memory=budget)
    tiers = {tight.plan.tier(b.index, e) for b in tight.layout.blocks for e in (0, 1)}
    assert {FACTORS, DISK} <= tiers and {resident.plan.tier(b.index, 1) for b in resident.layout.blocks} == {DEVICE}
    assert all(tight.plan.tier(b.index, 1) in (DEVICE, FACTORS) for b in tight.layout.blocks)
    assert "recomputed from the factors per candidate" in tight.plan.describe()
    for label in ("ties", "task_arithmetic", "dare_ties", "model_stock"):
        ours, theirs = tight.merge(RECIPES[label], seed=4), resident.merge(RECIPES[label], seed=4)
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), label
    report = tight.memory_report()
    assert report["peak_device_bytes"] <= budget
    assert report["device_bytes"]["adapter factors"] == tight.plan.adapter_bytes[1] == AdapterWeights(
        open_adapter(family["adapter"], tight.base_files), "cpu").nbytes
    disk_blocks = sum(b.numel for b in tight.layout.blocks if tight.plan.tier(b.index, 0) == DISK)
    assert report["bytes_moved_per_candidate"] == disk_blocks * 4  # the full expert's disk blocks only
    assert report["recomputed_bytes_per_candidate"] == 4 * sum(
        b.numel for b in tight.layout.blocks if tight.plan.tier(b.index, 1) == FACTORS)
    slot = tight.slot_by_name["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(tight.task_vector(slot, 1), resident.task_vector(slot, 1))
    MergeCore(family["base"], experts, device="cpu", block_elements=4096, device_memory=smallest).close()
    with pytest.raises(EvomergeError, match=r"the LoRA adapters' factors .* and a buffer to recompute"):
        MergeCore(family["base"], experts, device="cpu", block_elements=4096, device_memory=smallest - 1)


def _space(family, tmp_path, **extra) -> dict:
    raw = {"name": "lora", "models": {"base": str(family["base"]),
                                      "experts": {"full": str(family["full"]), "adapter": str(family["adapter"])}},
           "merge": {"method": "ties", "granularity": "global"},
           "benchmarks": [{"name": "x", "path": str(tmp_path / "x.jsonl")}], "device": "cpu"}
    raw.update(extra)
    return raw


def test_space_preflight_plan_and_checkpoint_model_take_an_adapter(family, tmp_path):
    """An adapter expert path works in a search space: preflight, `evomerge plan` (its bytes accounted),
    the builder, and calibration's "expert alone" loads it merged into the builder's own model."""
    space = parse_search_space(_space(family, tmp_path))
    _check_models(space)
    plan, text = plan_space(space)
    assert "adapters: 1 LoRA expert(s)" in text and plan.adapter_bytes == {
        1: open_adapter(family["adapter"], open_model(family["base"])).device_bytes}
    builder = ParameterMerge(space)
    assert builder.core.plan.device_bytes == plan.device_bytes
    model = builder.checkpoint_model(family["adapter"])
    assert model is builder.model
    reference = open_model(family["merged"]).load()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], reference[name]) for name in builder.core.tensor_names)
    genome = builder.baseline_genomes()["expert adapter"]
    merged = builder.candidate(genome).model
    assert all(torch.equal(dict(merged.named_parameters())[n], reference[n]) for n in builder.core.tensor_names)


def test_data_flow_source_may_be_an_adapter(family, tmp_path):
    """A data-flow source that is an adapter is the base with the adapter merged; its export names it
    BASE+ADAPTER, which mergekit re-makes."""
    raw = _space(family, tmp_path, dfs={"sources": ["adapter", "full"], "max_layers": 6})
    del raw["merge"]
    space = parse_search_space(raw)
    assert space.dfs.sources[0].adapter_base == str(family["base"])
    builder = DataFlowMerge(space)
    reference = open_model(family["merged"]).load()
    source = dict(builder.pool.models["adapter"].named_parameters())
    assert all(torch.equal(source[n], reference[n]) for n in reference)
    genome = builder.baseline_genomes()["source adapter"]
    attrs = builder.candidate(genome).attrs
    out = builder.export(attrs, tmp_path / "dfs_export")
    text = (out / "mergekit.yaml").read_text()
    assert f"{family['base']}+{family['adapter']}" in text
    exported = open_model(out).load()
    assert all(torch.equal(exported[n], reference[n]) for n in reference)
    pytest.importorskip("mergekit")
    theirs = _run_mergekit(text, tmp_path / "remade", tmp_path / "cache")
    assert set(theirs) == set(exported) and all(torch.equal(theirs[n], exported[n]) for n in exported)


def _broken_copy(family, tmp_path, config=None, tensors=None) -> Path:
    """A copy of the family's adapter with adapter_config.json keys set and tensors replaced / dropped (None)."""
    folder = tmp_path / "broken"
    shutil.copytree(family["adapter"], folder)
    if config:
        data = json.loads((folder / ADAPTER_CONFIG).read_text())
        data.update(config)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(data))
    if tensors:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
        for key, value in tensors.items():
            if value is None:
                state.pop(key)
            else:
                state[key] = value
        save_file(state, str(folder / ADAPTER_WEIGHTS))
    return folder


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("config, tensors, message", [
    ({"use_dora": True}, None, r"broken: use_dora=True is not supported: DoRA"),
    ({"peft_type": "IA3"}, None, r"broken: peft_type 'IA3' is not supported"),
    ({"init_lora_weights": "pissa"}, None, r"broken: init_lora_weights='pissa' is not supported"),
    ({"alora_invocation_tokens": [5]}, None, r"broken: alora_invocation_tokens=\[5\] is not supported"),
    ({"r": 8}, None, r"adapter_model.safetensors: tensor \S*lora_\w*A\S* has rank 4 .* gives module \S* rank 8"),
    (None, {Q_B: torch.zeros(48, 4)}, r"adapter_model.safetensors: tensor .*q_proj.lora_B.weight @ .*lora_A.weight "
                                      r"has shape \[48, 32\] but base .* has \[32, 32\] for "
                                      r"model.layers.0.self_attn.q_proj.weight \(made for "),
    (None, {Q_A.replace("layers.0", "layers.7"): torch.zeros(4, 32), Q_B.replace("layers.0", "layers.7"):
            torch.zeros(32, 4)}, r"adapter_model.safetensors: tensor .*layers.7.* changes "
                                 r"model.layers.7.self_attn.q_proj.weight, which base .* lacks"),
    (None, {Q_B: None}, r"adapter_model.safetensors: tensor .*q_proj.lora_A.weight has no matching lora_B"),
    (None, {"base_model.model.model.norm.weight": torch.ones(7)}, r"tensor base_model.model.model.norm.weight has "
                                                                  r"shape \[7\] but base .* has \[32\]"),
])
def test_unsupported_or_mismatched_adapter_is_one_clear_error(family, tmp_path, config, tensors, message):
    folder = _broken_copy(family, tmp_path, config, tensors)
    with pytest.raises(EvomergeError, match=message):
        open_experts(open_model(family["base"]), [family["full"], folder])


def test_adapter_without_safetensors_is_refused(family, tmp_path):
    folder = _broken_copy(family, tmp_path)
    (folder / ADAPTER_WEIGHTS).rename(folder / "adapter_model.bin")
    with pytest.raises(EvomergeError, match=r"broken: no adapter_model.safetensors \(adapter_model.bin is not read"):
        MergeCore(family["base"], [folder], device="cpu")


def test_an_adapter_alone_is_merged_into_the_base_it_records(family, tmp_path):
    """`evomerge eval ADAPTER` (through load_checkpoint) scores the adapter merged into its adapter_config.json's
    local base; a base that is not a local folder is refused, naming the adapter."""
    model = load_model_folder(family["adapter"], None, "cpu")
    reference = open_model(family["merged"]).load()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], reference[name]) for name in reference)
    folder = _broken_copy(family, tmp_path, {"base_model_name_or_path": "someone/some-hub-model"})
    with pytest.raises(EvomergeError, match=r"broken: its base_model_name_or_path 'someone/some-hub-model' is not "
                                            "a local model folder"):
        load_model_folder(folder, None, "cpu")


def test_the_demo_table_scores_an_adapter_expert_on_the_spaces_base(zoo_dir, tmp_path, monkeypatch, capsys):
    """An endpoint calibration did not score on every item (a study that reused the item bank) is scored by
    the demo's final table as the search merged it: a LoRA expert, whose adapter names a hub id as its
    base, on the space's base (it failed with "not a local model folder")."""
    adapter = write_tiny_lora(zoo_dir / "base", tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": "org/base-on-the-hub"}))
    space = small_space(zoo_dir, tmp_path / "space.yaml", name="demo-lora", optimizer={"trials": 2})
    raw = yaml.safe_load(space.read_text())
    first = next(iter(raw["models"]["experts"]))
    raw["models"]["experts"][first] = str(adapter)
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setattr(demo, "_calibrated_accuracy", lambda *args, **kwargs: None)  # as after a reused bank
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--space", str(space), "--validate-top", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"expert {first}" in captured.out and "evolved merge mean accuracy" in captured.err
