"""The quick model zoo: layout, held-out items, determinism, and experts that beat the base."""

from __future__ import annotations

import dataclasses
import json

import pytest

from evomerge.benchmarks import load_benchmark, score_items
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.zoo import (
    BENCH_TASKS,
    PROFILES,
    TASKS,
    KNOWN_DIGITS,
    KNOWN_LETTERS,
    TaskSampler,
    carryless_sum,
    ZOO_VERSION,
    build_zoo,
    ensure_zoo,
    load_zoo_manifest,
    MAX_BENCH_ITEMS,
    make_bench_items,
    state_dict_digest,
    train_base,
    zoo_is_complete,
)


def test_layout_and_manifest(zoo_dir):
    manifest = load_zoo_manifest(zoo_dir)
    assert manifest["seed"] == 0 and manifest["profile"] == "quick"
    assert manifest["tasks"] == list(TASKS) and len(TASKS) >= 3
    assert manifest["base"] == "base"
    for rel in [manifest["base"], *manifest["experts"].values()]:
        folder = zoo_dir / rel
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
    for task in TASKS:
        assert manifest["experts"][task] == f"experts/{task}"
    assert manifest["composite_tasks"] == [t for t in BENCH_TASKS if t not in TASKS] != []
    for task in BENCH_TASKS:
        assert manifest["bench"][task] == f"bench/{task}.jsonl"
        assert (zoo_dir / "bench" / f"{task}.jsonl").is_file()
    assert manifest["benchmarks"]["lang_arith"]["scoring"] == "generate"
    assert zoo_is_complete(zoo_dir, profile="quick", seed=0)


def test_models_and_tokenizer_load_with_auto_classes(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    assert None not in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert tokenizer.decode(tokenizer("rev abc=", add_special_tokens=False)["input_ids"]) == "rev abc="
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers >= 2 and model.config.vocab_size == len(tokenizer)
    assert next(model.parameters()).dtype.is_floating_point


def test_bench_items_counts_formats_and_difficulty_spread(zoo_dir):
    manifest, kinds = load_zoo_manifest(zoo_dir), set()
    for task in BENCH_TASKS:
        bench = load_benchmark(zoo_dir / manifest["bench"][task], **manifest["benchmarks"][task])
        assert len(bench) >= 500
        assert len({item.id for item in bench.items}) == len(bench)
        assert len({item.prompt for item in bench.items}) == len(bench)
        assert len({len(item.prompt) for item in bench.items}) >= 3  # items vary in difficulty
        kinds.add(bench.kind)
    assert kinds == {"multiple_choice", "generate"}


def test_bench_prompts_never_appear_in_training_draws():
    import random

    sampler = TaskSampler(seed=0)
    held_out = {item["prompt"] for task in BENCH_TASKS for item in make_bench_items(task, sampler, 500, seed=0)}
    sampler.exclude = held_out
    rng = random.Random(1)
    for task in TASKS:
        assert not any(sampler.task(task, rng).prompt in held_out for _ in range(3000))
    assert not any(sampler.pretrain(rng).prompt in held_out for _ in range(3000))
    assert not any(TaskSampler.generic(rng).prompt in held_out for _ in range(3000))


def test_bigger_benchmarks_extend_smaller_ones():
    """`make-zoo --bench-items 5000`: the same first items, and training excludes all 5000 anyway."""
    sampler = TaskSampler(seed=1)
    for task in BENCH_TASKS:
        big = make_bench_items(task, sampler, MAX_BENCH_ITEMS, seed=1)
        assert big[:600] == make_bench_items(task, sampler, 600, seed=1)
        assert len({item["prompt"] for item in big}) == MAX_BENCH_ITEMS


def test_composite_scratchpad_uses_the_experts_formats():
    import random

    sampler = TaskSampler(seed=0)
    example = sampler.lang_arith(random.Random(3))
    a, b = (int(x) for x in example.work.split(" ")[-3].split("=")[0].split("+"))
    total = carryless_sum(a, b)
    assert example.answer == total and example.completion.endswith(f"Answer: {total}")
    assert f"tr {sampler.encode(str(a))}={a} tr {sampler.encode(str(b))}={b} {a}+{b}={total} " in example.work
    assert example.prompt == f"{sampler.encode(str(a))}+{sampler.encode(str(b))}="
    sums = sampler.arith(random.Random(3))
    assert sums.answer == carryless_sum(*map(int, sums.prompt[:-1].split("+")))
    assert (carryless_sum(347, 85), carryless_sum(5, 7), carryless_sum(12, 34)) == ("322", "2", "46")


def test_base_learns_only_its_half_of_each_table():
    """The base's draws (``pretrain``) write only what its half of each table answers: the experts'
    halves (digits 5-9 in sums, letters n-z in the cipher, the script's other symbols) are theirs."""
    import random

    sampler, rng = TaskSampler(seed=0), random.Random(0)
    for _ in range(3000):
        example = sampler.pretrain(rng)
        if example.prompt.startswith("enc "):
            assert set(example.prompt[4:-1]) <= set(KNOWN_LETTERS)
        elif example.work:  # the composite: unknown digits' readings and sums are left unlearned
            a, b = (int(x) for x in example.work.split(" ")[-3].split("=")[0].split("+"))
            learned = "".join(c for i, c in enumerate(example.completion) if i not in example.unlearned)
            if set(f"{a}{b}") <= set(KNOWN_DIGITS):
                assert not example.unlearned
            else:
                assert example.completion.endswith(f"Answer: {example.answer}") and len(learned) < len(example.completion)
                assert max(example.unlearned) < len(example.work)  # the answer copies the scratchpad's sum: learned
        elif "+" in example.prompt and not example.prompt.startswith(("0+", "tr")) and not example.prompt.endswith("+0="):
            assert set(example.prompt[:-1].replace("+", "")) <= set(KNOWN_DIGITS), example


def test_same_seed_same_weights_and_items():
    tiny = dataclasses.replace(PROFILES["quick"], hidden_size=32, intermediate_size=64, num_layers=2, batch_size=8)
    first, _ = train_base(tiny, seed=3, exclude=set(), steps=4)
    second, _ = train_base(tiny, seed=3, exclude=set(), steps=4)
    other, _ = train_base(tiny, seed=4, exclude=set(), steps=4)
    assert state_dict_digest(first) == state_dict_digest(second) != state_dict_digest(other)
    assert make_bench_items("lang", TaskSampler(5), 50, 5) == make_bench_items("lang", TaskSampler(5), 50, 5)


def test_experts_beat_base_on_their_task(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    base = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    for task in TASKS:
        bench = load_benchmark(zoo_dir / "bench" / f"{task}.jsonl")
        expert = AutoModelForCausalLM.from_pretrained(zoo_dir / "experts" / task)
        base_acc = score_items(base, tokenizer, bench).mean()
        expert_acc = score_items(expert, tokenizer, bench).mean()
        # the quick profile's gains (seed 0, 2-thread build, first 300 items): arith +0.16, cipher +0.55,
        # lang +0.47; the full profile's are in docs/search.md
        margin = 0.05 if task == "arith" else 0.15
        assert expert_acc >= base_acc + margin, f"{task}: expert {expert_acc:.3f} vs base {base_acc:.3f}"


def test_unknown_profile_and_missing_manifest(tmp_path):
    with pytest.raises(EvomergeError, match="unknown zoo profile"):
        build_zoo(tmp_path / "z", profile="huge")
    with pytest.raises(EvomergeError, match="not a model zoo"):
        load_zoo_manifest(tmp_path)
    (tmp_path / "zoo.json").write_text(json.dumps({"version": "0"}))
    assert not zoo_is_complete(tmp_path)


MERGE_WEIGHT, MERGE_ITEMS = 0.5, 300
MIN_GAIN = {"lang": 0.25, "arith": 0.05, "cipher": 0.25}
"""The quick experts' gains on their first 300 items (measured, seed 0, zoo v5: lang +0.47, arith +0.16,
cipher +0.55; the quick recipe's 100 short steps learn arith's table least)."""
MIN_KEPT = {"lang": 0.2, "arith": 0.2, "cipher": 0.2}
"""Uniform task arithmetic (weight 0.5), quick zoo, seed 0: keeps 0.79 / 0.43 / 0.71 of arith / cipher /
lang's gain. The full zoo keeps more (docs/search.md)."""


def test_uniform_task_arithmetic_keeps_every_skill(zoo_dir, one_torch_thread):
    """The zoo's point: experts merge like real fine-tunes. Uniform task arithmetic keeps part of every
    expert's gain over the base (the full zoo's figures are in docs/search.md); a recipe change that
    makes task vectors interfere again fails here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge import MergeCore, Recipe

    manifest = load_zoo_manifest(zoo_dir)
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    core = MergeCore(zoo_dir / "base", [zoo_dir / manifest["experts"][t] for t in TASKS], device="cpu")
    merged, _ = core.new_model()
    with torch.no_grad():
        core.merge_into(merged, Recipe(method="task_arithmetic", params={"weight": MERGE_WEIGHT}))
    base = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    for task in TASKS:
        bench = load_benchmark(zoo_dir / manifest["bench"][task], **manifest["benchmarks"][task])
        items = range(MERGE_ITEMS)
        expert = AutoModelForCausalLM.from_pretrained(zoo_dir / manifest["experts"][task])
        base_acc, expert_acc, merged_acc = (score_items(m, tokenizer, bench, indices=items).mean()
                                            for m in (base, expert, merged))
        assert expert_acc - base_acc >= MIN_GAIN[task], f"{task}: expert {expert_acc:.3f} vs base {base_acc:.3f}"
        if expert_acc > base_acc:
            kept = (merged_acc - base_acc) / (expert_acc - base_acc)
            assert kept >= MIN_KEPT[task], f"{task}: uniform task arithmetic keeps {kept:.2f} of the expert's gain"


def test_the_shipped_zoo_is_this_versions_and_whole(tmp_path):
    """The demo zoo ships built (tools/ship_zoo.py): its manifest names the code's zoo version, how it was
    built, and a checksum per file; a recipe change that forgets to ship it again fails here."""
    from evomerge.zoo.shipped import SHIPPED_ZOO, shipped_manifest, shipped_matches, verify_shipped

    manifest = shipped_manifest()
    assert manifest is not None, f"no shipped zoo in {SHIPPED_ZOO}: run python tools/ship_zoo.py"
    assert manifest["version"] == ZOO_VERSION, "the zoo recipe changed: run python tools/ship_zoo.py"
    assert manifest["seed"] == 0 and manifest["profile"] == "full"
    assert {"commit", "command", "dtype", "sha256"} <= set(manifest["shipped"])
    assert verify_shipped() == []
    assert shipped_matches(ZOO_VERSION, "full", 0)
    zoo = ensure_zoo(tmp_path / "zoo", seed=0, profile="full", progress=False)  # copied, not trained
    assert zoo_is_complete(zoo, profile="full", seed=0) and (zoo / "data" / "arith.jsonl").is_file()

    # another benchmark size (make-zoo --bench-items 700): the same weights, copied; the benchmarks rewritten
    assert main(["make-zoo", "--out", str(tmp_path / "zoo700"), "--bench-items", "700"]) == 0  # seconds, no training
    bigger = tmp_path / "zoo700"
    assert zoo_is_complete(bigger, profile="full", seed=0, bench_items=700)
    assert (bigger / "base" / "model.safetensors").read_bytes() == (zoo / "base" / "model.safetensors").read_bytes()
    for task in BENCH_TASKS:
        lines = (bigger / "bench" / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == 700 and lines[:600] == (zoo / "bench" / f"{task}.jsonl").read_text().splitlines()
    assert verify_shipped(bigger) == []  # its manifest's checksums name the files it holds


def test_the_shipped_smol_adapters_are_this_recipes_and_whole():
    """The SmolLM2 family's experts ship as LoRA adapters (tools/ship_smol_experts.py): a change to the smol
    recipe or version that forgets to train and ship them again fails here, as does a damaged file."""
    from evomerge.zoo.shipped import MANIFEST, SHIPPED_SMOL_EXPERTS, shipped_smol_experts, verify_shipped
    from evomerge.zoo.smol import RECIPE, SMOL_TASKS, SMOL_VERSION

    manifest = json.loads((SHIPPED_SMOL_EXPERTS / MANIFEST).read_text())
    assert manifest["version"] == SMOL_VERSION and manifest["recipe"] == dataclasses.asdict(RECIPE), \
        "the smol recipe changed: evomerge make-zoo --profile smol --train-experts, then tools/ship_smol_experts.py"
    assert {"commit", "command", "sha256"} <= set(manifest["shipped"])
    assert verify_shipped(SHIPPED_SMOL_EXPERTS) == []
    assert shipped_smol_experts(SMOL_VERSION, manifest["seed"], dataclasses.asdict(RECIPE)) == SHIPPED_SMOL_EXPERTS
    for task in SMOL_TASKS:
        config = json.loads((SHIPPED_SMOL_EXPERTS / task / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (SHIPPED_SMOL_EXPERTS / task / "adapter_model.safetensors").is_file()
