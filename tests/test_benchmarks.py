"""Benchmark loading (formats, errors) and scoring (teacher forcing == greedy decoding)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from evomerge.benchmarks import (
    EXACT_MATCH,
    MULTIPLE_CHOICE,
    Benchmark,
    Item,
    greedy_generate,
    load_benchmark,
    score_items,
)
from evomerge.errors import EvomergeError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EM_ROWS = [{"id": "a-1", "prompt": "1+2=", "answer": "3"}, {"id": "a-2", "prompt": "2+2=", "answer": "4"}]
MC_ROWS = [{"id": "m-1", "prompt": "tr ab=", "choices": ["XY", "XZ"], "label": 1}]


# --------------------------------------------------------------------------- loading


def test_load_jsonl_exact_match(tmp_path):
    bench = load_benchmark(write_jsonl(tmp_path / "arith.jsonl", EM_ROWS))
    assert bench.name == "arith" and bench.kind == EXACT_MATCH and len(bench) == 2
    assert bench.items[0] == Item("a-1", "1+2=", answer="3")


def test_load_jsonl_multiple_choice_and_name_override(tmp_path):
    bench = load_benchmark(write_jsonl(tmp_path / "x.jsonl", MC_ROWS), name="lang")
    assert bench.name == "lang" and bench.kind == MULTIPLE_CHOICE
    assert bench.items[0].choices == ("XY", "XZ") and bench.items[0].label == 1


def test_missing_ids_get_defaults_and_numeric_answers_become_strings(tmp_path):
    bench = load_benchmark(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "1+1=", "answer": 2}]))
    assert bench.items[0].id == "n-0000" and bench.items[0].answer == "2"


def test_load_from_disk_dataset_and_json_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(EM_ROWS).save_to_disk(str(tmp_path / "saved"))
    saved = load_benchmark(tmp_path / "saved")
    assert [i.answer for i in saved.items] == ["3", "4"] and saved.name == "saved"

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", EM_ROWS)
    assert len(load_benchmark(folder)) == 2

    in_memory = load_benchmark(datasets.DatasetDict({"test": datasets.Dataset.from_list(MC_ROWS)}), name="mc")
    assert in_memory.kind == MULTIPLE_CHOICE


def test_column_mapping_template_and_letter_labels(tmp_path):
    """Datasets as they come (MMLU / ARC / GSM8K-like columns) load without preprocessing."""
    import datasets

    mmlu = datasets.Dataset.from_list([{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])
    mmlu.to_parquet(str(tmp_path / "mmlu.parquet"))
    bench = load_benchmark(tmp_path / "mmlu.parquet", fields={"label": "answer"}, template="Q: {question}\nA:")
    assert bench.items[0] == Item("mmlu-0000", "Q: 2+2?\nA:", choices=("3", "4"), label=1)

    arc = [{"id": "arc-1", "question": "Sky?", "choices": {"text": ["blue", "red", "green"], "label": ["A", "B", "C"]},
            "answerKey": "C"}]
    bench = load_benchmark(write_jsonl(tmp_path / "arc.jsonl", arc), fields={"prompt": "question", "label": "answerKey"})
    assert bench.items[0].choices == ("blue", "red", "green") and bench.items[0].label == 2

    (tmp_path / "gsm.csv").write_text("q,a\n1+1=,2\n2+3=,5\n")
    bench = load_benchmark(tmp_path / "gsm.csv", fields={"prompt": "q", "answer": "a"})
    assert [(i.prompt, i.answer) for i in bench.items] == [("1+1=", "2"), ("2+3=", "5")]


def test_split_choice_and_format_errors(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(EM_ROWS),
                                   "validation": datasets.Dataset.from_list(EM_ROWS[:1])})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert len(load_benchmark(tmp_path / "dd", split="validation")) == 1
    with pytest.raises(EvomergeError, match="no split 'test'; the dataset has"):
        load_benchmark(tmp_path / "dd", split="test")
    with pytest.raises(EvomergeError, match="choose one with split"):
        load_benchmark(tmp_path / "dd")
    rows = write_jsonl(tmp_path / "r.jsonl", EM_ROWS)
    with pytest.raises(EvomergeError, match="unknown item key 'question'"):
        load_benchmark(rows, fields={"question": "q"})
    with pytest.raises(EvomergeError, match="template names column 'question'.*columns: id, prompt, answer"):
        load_benchmark(rows, template="{question}")
    with pytest.raises(EvomergeError, match=r"'answer' \(column 'a'\)"):
        load_benchmark(rows, fields={"answer": "a"})


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "no items"),
        ([{"id": "q", "prompt": "1+1="}], "no 'answer'"),
        ([{"id": "q", "prompt": "x", "choices": ["a", "b"]}], "no 'label'"),
        ([{"id": "q", "prompt": "x", "choices": ["a", "b"], "label": 2}], "not an index"),
        ([{"id": "q", "prompt": "x", "choices": ["a", "b"], "label": -1}], "not an index"),
        ([EM_ROWS[0], MC_ROWS[0]], "mixes exact-match and multiple-choice"),
        ([{"id": "q", "answer": "3"}], "'prompt'"),
    ],
)
def test_bad_benchmarks_raise_clear_errors(tmp_path, rows, message):
    with pytest.raises(EvomergeError, match=message):
        load_benchmark(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(EvomergeError, match="does not exist"):
        load_benchmark(tmp_path / "nope.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x"\n')
    with pytest.raises(EvomergeError, match="broken.jsonl:1"):
        load_benchmark(tmp_path / "broken.jsonl")


def test_bad_index_names_the_benchmark(zoo_models):
    model, tokenizer, benches = zoo_models["base"], zoo_models["tokenizer"], zoo_models["bench"]
    with pytest.raises(EvomergeError, match="bad indices"):
        score_items(model, tokenizer, benches["arith"], indices=[10_000])


# --------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def zoo_models(zoo_dir, zoo_answer_benches):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    models = {"base": AutoModelForCausalLM.from_pretrained(zoo_dir / "base")}
    for task, rel in manifest["experts"].items():
        models[task] = AutoModelForCausalLM.from_pretrained(zoo_dir / rel)
    models["tokenizer"] = AutoTokenizer.from_pretrained(zoo_dir / "base")
    models["bench"] = {t: load_benchmark(zoo_dir / rel) for t, rel in manifest["bench"].items()}
    models["bench"].update({t: load_benchmark(path) for t, path in zoo_answer_benches.items() if t != "lang"})  # exact match
    return models


def test_scores_are_per_item_booleans_and_respect_indices(zoo_models):
    model, tokenizer, bench = zoo_models["arith"], zoo_models["tokenizer"], zoo_models["bench"]["arith"]
    full = score_items(model, tokenizer, bench, batch_size=37)
    assert full.dtype == bool and full.shape == (len(bench),)
    assert np.array_equal(full, score_items(model, tokenizer, bench, batch_size=512))
    subset = [5, 0, 17, 3]
    assert np.array_equal(score_items(model, tokenizer, bench, indices=subset), full[subset])
    assert score_items(model, tokenizer, bench, indices=[]).shape == (0,)


def test_teacher_forced_exact_match_equals_greedy_generation(zoo_models):
    tokenizer = zoo_models["tokenizer"]
    for model_key, task in [("arith", "arith"), ("cipher", "cipher"), ("base", "arith")]:
        model, bench = zoo_models[model_key], zoo_models["bench"][task]
        indices = list(range(0, len(bench), max(1, len(bench) // 12)))
        forced = score_items(model, tokenizer, bench, indices=indices)
        greedy = [
            greedy_generate(model, tokenizer, bench.items[i].prompt, len(bench.items[i].answer) + 1)
            == bench.items[i].answer
            for i in indices
        ]
        assert forced.tolist() == greedy, f"{model_key} on {task}"


def test_multiple_choice_picks_highest_likelihood(zoo_models):
    tokenizer, expert = zoo_models["tokenizer"], zoo_models["lang"]
    item = zoo_models["bench"]["lang"].items[0]
    good = Benchmark("one", [item])
    wrong_label = (item.label + 1) % len(item.choices)
    flipped = Benchmark("flip", [Item(item.id, item.prompt, choices=item.choices, label=wrong_label)])
    assert score_items(expert, tokenizer, good)[0] != score_items(expert, tokenizer, flipped)[0]


def test_scoring_restores_training_mode(zoo_models):
    model, tokenizer = zoo_models["base"], zoo_models["tokenizer"]
    model.train()
    score_items(model, tokenizer, zoo_models["bench"]["cipher"], indices=range(8))
    assert model.training
    model.eval()


def test_scoring_500_items_is_fast(zoo_models):
    model, tokenizer, benches = zoo_models["cipher"], zoo_models["tokenizer"], zoo_models["bench"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # under a shared, loaded CPU one thread is the stable choice
    try:
        score_items(model, tokenizer, benches["cipher"], indices=range(64))  # warm up
        started = time.perf_counter()
        score_items(model, tokenizer, benches["cipher"], indices=range(500))
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    # ~0.5 s on an idle CPU; generous because test machines are shared
    assert elapsed < 10.0, f"scoring 500 items took {elapsed:.2f}s"
