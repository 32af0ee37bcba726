"""mergekit-evolve configs read as evomerge search spaces, key by key; what cannot be honoured is refused.

The last test runs one end to end: a mergekit-evolve config over the quick zoo, its tasks custom lm-eval
task YAMLs over local jsonl, through `evomerge search` for three trials.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from evomerge.benchmarks.lmeval import LMEVAL_KEYS
from evomerge.errors import EvomergeError
from evomerge.search.evolve_config import is_mergekit_evolve, to_search_space

CONFIG = {
    "genome": {"models": ["zoo/experts/arith", {"model": "zoo/experts/lang"}], "base_model": "zoo/base",
               "merge_method": "ties", "layer_granularity": 0, "normalize": False,
               "allow_negative_weights": True, "filters": ["self_attn", "mlp"]},
    "tasks": ["arith_task", {"name": "tasks/lang.yaml", "weight": 2.0, "metric": "exact_match,strict-match"}],
    "limit": 100, "num_fewshot": 3, "apply_chat_template": False,
}


def test_every_key_maps_onto_the_space():
    assert is_mergekit_evolve(CONFIG) and not is_mergekit_evolve({"models": {}, "merge": {}})
    space = to_search_space(CONFIG, "evolve", "evolve.yml")
    assert space["models"] == {"base": "zoo/base", "experts": {"arith": "zoo/experts/arith", "lang": "zoo/experts/lang"}}
    assert space["merge"] == {"method": "ties", "granularity": "global", "split_modules": True,
                              "params": {"weight": [-1.0, 1.0], "density": [0.01, 1.0]}, "fixed": {"normalize": False}}
    first, second = space["benchmarks"]
    assert first == {"name": "arith_task", "lm_eval": "arith_task", "weight": 1.0, "metric": "acc", "limit": 100,
                     "num_fewshot": 3, "apply_chat_template": False, "fewshot_as_multiturn": True}
    assert second["name"] == "lang" and second["weight"] == 2.0
    assert second["metric"] == "exact_match" and second["filter"] == "strict-match"
    assert space["optimizer"] == {"name": "cmaes", "trials": 100}  # mergekit-evolve's --max-fevals default
    assert "estimator" not in space  # limit 100: the estimator's own subsets


def test_benchmark_entries_use_only_the_lm_eval_keys():
    """Every key a task becomes is one an lm_eval benchmark entry takes (besides name and weight)."""
    config = {**CONFIG, "shuffle": False, "random_init": False, "fewshot_as_multiturn": False,
              "apply_chat_template": True}
    for entry in to_search_space(config, "evolve", "evolve.yml")["benchmarks"]:
        assert set(entry) - {"name", "weight"} <= set(LMEVAL_KEYS), entry
    assert entry["apply_chat_template"] is True and entry["fewshot_as_multiturn"] is False


@pytest.mark.parametrize("method, normalize", [("ties", True), ("dare_ties", True), ("linear", True),
                                               ("task_arithmetic", False)])
def test_normalize_defaults_to_mergekit_evolves(method, normalize):
    """Unset, mergekit-evolve normalizes ties, dare_ties and linear (dare_ties does not by itself)."""
    genome = {k: v for k, v in CONFIG["genome"].items() if k != "normalize"}
    space = to_search_space({**CONFIG, "genome": {**genome, "merge_method": method}}, "evolve", "evolve.yml")
    assert space["merge"]["fixed"] == {"normalize": normalize}


def test_lora_adapters_on_the_base_are_experts():
    """mergekit's `model+adapter` (or {model, lora}) on the base model: the adapter folder is an expert."""
    genome = {**CONFIG["genome"], "models": ["zoo/base+adapters/add", {"model": "zoo/base", "lora": "adapters/rev"},
                                             "zoo/experts/lang"]}
    space = to_search_space({**CONFIG, "genome": genome}, "evolve", "evolve.yml")
    assert space["models"]["experts"] == {"add": "adapters/add", "rev": "adapters/rev", "lang": "zoo/experts/lang"}
    with pytest.raises(EvomergeError, match=r"genome.models: other\+adapters/add is a LoRA adapter on other; "
                                            r"evomerge merges adapters trained on the base \(zoo/base\) only"):
        to_search_space({**CONFIG, "genome": {**genome, "models": ["other+adapters/add"]}}, "e", "e.yml")
    with pytest.raises(EvomergeError, match=r"genome.base_model: zoo/base\+a is a base with a LoRA adapter merged in"):
        to_search_space({**CONFIG, "genome": {**genome, "base_model": "zoo/base+a"}}, "e", "e.yml")


def test_a_small_limit_scores_every_document():
    """mergekit-evolve scores each candidate on all `limit` documents; below the default subset, so does evomerge."""
    assert to_search_space({**CONFIG, "limit": 12}, "evolve", "evolve.yml")["estimator"] == {"subset_size": 12}


def test_slerp_interpolates_the_two_models():
    genome = {"models": ["zoo/experts/arith", "zoo/experts/lang"], "merge_method": "slerp"}
    space = to_search_space({"genome": genome, "tasks": ["t"]}, "evolve", "evolve.yml")
    assert space["models"] == {"base": "zoo/experts/arith", "experts": {"lang": "zoo/experts/lang"}}
    assert space["merge"]["params"] == {"t": [0.0, 1.0]}
    inside = {**genome, "base_model": "zoo/experts/lang"}  # one of the two: no third input
    assert to_search_space({"genome": inside, "tasks": ["t"]}, "e", "e.yml")["models"] == space["models"]


@pytest.mark.parametrize("change, message", [
    ({"smooth": True}, "genome.smooth is not supported"),
    ({"filters": ["q_proj"]}, r"genome.filters \['q_proj'\] are not supported"),
    ({"tokenizer_source": "union"}, "genome.tokenizer_source is not supported"),
    ({"merge_method": "della"}, "mergekit-evolve searches linear"),
    ({"base_model": None}, "genome.base_model is required for ties"),
    ({"frobnicate": 1}, "unknown key genome.frobnicate"),
    ({"merge_method": "slerp", "base_model": "zoo/base"}, r"genome.base_model: slerp merges the two models only"),
    ({"merge_method": "slerp", "base_model": None, "models": ["a", "b", "c"]},
     "slerp is supported with exactly two models"),
])
def test_what_cannot_be_honoured_is_refused_by_name(change, message):
    config = {**CONFIG, "genome": {**CONFIG["genome"], **change}}
    with pytest.raises(EvomergeError, match=message):
        to_search_space(config, "evolve", "evolve.yml")


def test_shuffled_limits_are_refused():
    with pytest.raises(EvomergeError, match="shuffle with limit is not supported"):
        to_search_space({**CONFIG, "shuffle": True}, "evolve", "evolve.yml")


def test_random_init_is_refused():
    with pytest.raises(EvomergeError, match="random_init is not supported"):
        to_search_space({**CONFIG, "random_init": True}, "evolve", "evolve.yml")


@pytest.mark.slow
def test_a_mergekit_evolve_config_runs_through_evomerge_search(zoo_dir, tmp_path, one_torch_thread):
    pytest.importorskip("lm_eval", reason="extra `lmeval` is not installed")
    from evomerge.cli import main
    from evomerge.search.runs import SPACE_FILE, open_existing_study
    from evomerge.search.space import load_search_space

    sys.path.insert(0, str(Path(__file__).parent))
    from lmeval_parity import write_task

    rows = [json.loads(line) for line in (zoo_dir / "bench" / "arith.jsonl").read_text().splitlines()]
    test = tmp_path / "arith.jsonl"
    test.write_text("".join(json.dumps(row) + "\n" for row in rows[:60]))
    shots = tmp_path / "arith_train.jsonl"
    shots.write_text("".join(json.dumps(row) + "\n" for row in rows[60:64]))
    metric = "metric_list:\n  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    choice = write_task(tmp_path, "arith_mc", textwrap.dedent("""\
        fewshot_split: train
        output_type: multiple_choice
        doc_to_text: "{{prompt}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        target_delimiter: ""
        fewshot_delimiter: " "
        """) + metric.format("acc"), {"test": test, "train": shots})
    lang = [json.loads(line) for line in (zoo_dir / "bench" / "lang.jsonl").read_text().splitlines()][:60]
    words = tmp_path / "lang.jsonl"
    words.write_text("".join(json.dumps(dict(row, answer=row["choices"][row["label"]])) + "\n" for row in lang))
    answer = write_task(tmp_path, "lang_gen", textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        num_fewshot: 0
        generation_kwargs: {until: ["="], max_gen_toks: 10}
        filter_list:
          - name: word
            filter:
              - function: regex
                regex_pattern: "(\\\\w+)"
              - function: take_first
        """) + metric.format("exact_match"), {"test": words})
    config = {
        "genome": {"models": [str(zoo_dir / "experts" / t) for t in ("arith", "lang")],
                   "base_model": str(zoo_dir / "base"), "merge_method": "ties", "layer_granularity": 2,
                   "filters": ["self_attn", "mlp"]},
        "tasks": [{"name": str(choice), "weight": 2.0},
                  {"name": str(answer), "metric": "exact_match,word"}],
        "limit": 40, "num_fewshot": 1,  # lang_gen's YAML says 0: kept, as lm-eval keeps it
        "apply_chat_template": False,   # the zoo's tokenizer has no chat template
    }
    config_file = tmp_path / "evolve.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    runs = tmp_path / "runs"
    assert main(["search", str(config_file), "--runs-root", str(runs), "--trials", "3", "--no-progress"]) == 0
    run_dir = runs / "evolve"
    trials = [t for t in open_existing_study(run_dir).get_trials(deepcopy=False) if t.values]
    assert len(trials) == 3
    for trial in trials:
        answers = trial.user_attrs["answers"]
        assert set(answers) == {"arith_mc", "lang_gen"} and all(len(a) == 40 for a in answers.values())
        assert 0.0 <= trial.values[0] <= 1.0
    assert {"weight.arith.G0_attention", "weight.lang.G1_mlp", "density.arith.G1_attention"} <= set(trials[0].params)
    # the run's benchmarks score a model as the tasks say: the lang expert answers every lang_gen document
    assert main(["eval", str(zoo_dir / "experts" / "lang"), "--space", str(run_dir),
                 "--records", str(tmp_path / "answers")]) == 0
    records = [json.loads(line) for line in (tmp_path / "answers" / "lang" / "lang_gen.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(r["correct"] and r["filter"] == "word" for r in records)
    # the run keeps the space the config stands for; num_fewshot 1 reaches arith_mc, lang_gen's YAML keeps its 0
    space = load_search_space(run_dir / SPACE_FILE)
    fewshot = {spec.name: spec.load().settings.task.get_config("num_fewshot") for spec in space.benchmarks}
    assert fewshot == {"arith_mc": 1, "lang_gen": 0} and [spec.weight for spec in space.benchmarks] == [2.0, 1.0]
