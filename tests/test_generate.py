"""The generate item kind: batched greedy generation equals one-at-a-time decoding; answers
extracted and compared; cut-off or answerless generations are wrong, never errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evomerge.benchmarks import GENERATE, Benchmark, Item, load_benchmark, score_items, score_records
from evomerge.benchmarks.generation import EOS, LENGTH, STOP, finish_generation, generate_greedy
from evomerge.benchmarks.prompts import prompt_ids
from evomerge.errors import EvomergeError


@pytest.fixture(scope="module")
def zoo(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    models = {name: AutoModelForCausalLM.from_pretrained(zoo_dir / rel).eval()
              for name, rel in {"base": "base", **manifest["experts"]}.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: threads only wait on each other
    yield models, AutoTokenizer.from_pretrained(zoo_dir / "base"), zoo_dir
    torch.set_num_threads(threads)


def one_at_a_time(model, tokenizer, prompt: list[int], max_new_tokens: int, stop: list[str]):
    """The reference: plain greedy `model.generate` on one unpadded prompt."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             stop_strings=stop or None, tokenizer=tokenizer if stop else None)
    return finish_generation(tokenizer, out[0, len(prompt):].tolist(), [tokenizer.eos_token_id], stop, max_new_tokens)


@pytest.mark.parametrize("model_name, task, stop, max_new_tokens", [
    ("arith", "arith", ["5"], 4),           # stop strings at different steps, EOS, and cut-offs
    ("cipher", "cipher", ["q", "zz"], 9),
    ("base", "arith", [], 3),
])
def test_batched_generation_equals_one_at_a_time_greedy(zoo, zoo_answer_benches, model_name, task, stop,
                                                       max_new_tokens):
    models, tokenizer, zoo_dir = zoo
    model = models[model_name]
    bench = load_benchmark(zoo_answer_benches[task], scoring="generate")
    items = bench.items[:40]
    prompts = prompt_ids(bench, items, tokenizer)
    assert len({len(p) for p in prompts}) > 2  # several length buckets, left padding inside them
    with torch.inference_mode():
        batched = generate_greedy(model, tokenizer, prompts, max_new_tokens, stop, batch_size=7)
    single = [one_at_a_time(model, tokenizer, p, max_new_tokens, stop) for p in prompts]
    assert batched == single
    if stop:
        assert {STOP, EOS} <= {g.finish for g in batched}
        assert len({g.tokens for g in batched if g.finish != LENGTH}) > 1  # rows ended at different steps


@pytest.fixture(scope="module")
def easy_items(tmp_path_factory):
    """Items in the zoo's formats on the base's easy content (zoo v4 benchmarks are harder than the
    quick experts are good at): task -> jsonl path of 60 items the quick models partly solve."""
    import random

    from evomerge.zoo import TaskSampler

    folder, sampler, rng = tmp_path_factory.mktemp("easy"), TaskSampler(0), random.Random(0)
    paths = {}
    for task in ("arith", "cipher"):
        examples = {}
        while len(examples) < 60:
            example = sampler.easy(task, rng)
            examples.setdefault(example.prompt, example)
        paths[task] = folder / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps({"id": f"{task}-{i}", "prompt": e.prompt, "answer": e.answer}) + "\n"
                                       for i, e in enumerate(examples.values())))
    return paths


def test_generate_scores_like_exact_match_on_exact_answers(zoo, easy_items):
    """Greedy text == answer, then EOS: what teacher-forced exact match checks in one pass."""
    models, tokenizer, zoo_dir = zoo
    for task in ("arith", "cipher"):
        path = easy_items[task]
        forced = score_items(models[task], tokenizer, load_benchmark(path), indices=range(60))
        generated = score_items(models[task], tokenizer, load_benchmark(path, scoring="generate", max_new_tokens=16),
                                indices=range(60), batch_size=16)
        assert generated.tolist() == forced.tolist() and 0 < forced.sum() < 60, task


def test_cut_off_empty_and_answerless_generations_are_wrong(zoo, easy_items):
    models, tokenizer, zoo_dir = zoo
    path = easy_items["arith"]
    full = score_records(models["arith"], tokenizer, load_benchmark(path, scoring="generate", max_new_tokens=8),
                         indices=range(60))
    assert full.correct.any()
    cut = score_records(models["arith"], tokenizer, load_benchmark(path, scoring="generate", max_new_tokens=1),
                        indices=range(60))
    assert not cut.correct.any() and {r["finish"] for r in cut.records} == {LENGTH}
    assert all(r["extracted"] is None for r in cut.records)
    empty = score_records(models["arith"], tokenizer, load_benchmark(path, stop=["0", "1", "2", "3", "4", "5", "6", "7",
                                                                                   "8", "9"]), indices=range(60))
    assert not empty.correct.any() and {r["generation"] for r in empty.records} == {""}
    nothing = score_records(models["arith"], tokenizer, load_benchmark(path, extract={"after": "Answer:"}),
                            indices=range(60))
    assert not nothing.correct.any() and all(r["extracted"] is None for r in nothing.records)
    record = full.records[int(np.argmax(full.correct))]
    assert set(record) >= {"id", "prompt", "generation", "extracted", "target", "correct", "finish"}
    assert record["correct"] and record["extracted"] == record["target"]


def test_extractors_and_comparisons_on_generated_text(zoo):
    """A model's own output scored through last_number / regex / numeric tolerance, on one tiny benchmark."""
    models, tokenizer, _ = zoo
    items = [Item("a", "653+5=", answer="658"), Item("b", "46+2=", answer="48")]
    bench = Benchmark("two", items, kind=GENERATE)
    expected = score_items(models["arith"], tokenizer, bench)
    from evomerge.benchmarks.kinds import get_kind

    kind = get_kind(GENERATE)
    for options in ({"extract": "last_number", "compare": "numeric"}, {"extract": {"regex": r"(\d+)"}},
                    {"compare": {"numeric": 0.5}}):
        variant = Benchmark("two", items, kind=GENERATE, settings=kind.settings(options, "test"))
        assert score_items(models["arith"], tokenizer, variant).tolist() == expected.tolist()


def test_generation_batches_halve_on_out_of_memory(zoo, zoo_answer_benches):
    models, tokenizer, zoo_dir = zoo
    model = models["arith"]
    bench = load_benchmark(zoo_answer_benches["arith"], scoring="generate", max_new_tokens=6)
    expected = score_items(model, tokenizer, bench, indices=range(24), batch_size=24)
    generate, seen = model.generate, []

    def limited(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        if seen[-1] > 6:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(*args, **kwargs)

    model.generate = limited
    try:
        assert score_items(model, tokenizer, bench, indices=range(24), batch_size=24).tolist() == expected.tolist()
        assert max(seen) == 24 and seen[-1] <= 6
    finally:
        del model.generate
        model.__dict__.pop("_evomerge_batch_limit", None)


def test_chat_template_renders_shots_as_turns_and_is_checked(zoo, tmp_path):
    models, tokenizer, zoo_dir = zoo
    rows = [{"id": f"q{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    with pytest.raises(EvomergeError, match="benchmark 'chatty': chat: true, but the tokenizer .* has no chat template"):
        load_benchmark(tmp_path / "test.jsonl", name="chatty", chat=True, tokenizer=tokenizer)
    bench = load_benchmark(tmp_path / "test.jsonl", name="chatty", chat=True, scoring="generate",
                           fewshot={"n": 2, "path": str(tmp_path / "train.jsonl"), "seed": 1})
    with pytest.raises(EvomergeError, match="chat: true"):  # without a template at scoring time too, before any work
        score_items(models["arith"], tokenizer, bench)
    chat_tokenizer = type(tokenizer).from_pretrained(zoo_dir / "base")
    chat_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }} {% endfor %}"
                                    "{% if add_generation_prompt %}a {% endif %}")
    from evomerge.benchmarks.prompts import prompt_texts

    text = prompt_texts(bench, bench.items[:1], chat_tokenizer)[0]
    shots = bench.prompting.shots
    assert text == f"u {shots[0].prompt} a {shots[0].answer} u {shots[1].prompt} a {shots[1].answer} u 3+1= a "
    assert score_items(models["arith"], chat_tokenizer, bench).shape == (3,)
