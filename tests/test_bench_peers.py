"""tools/bench_peers.py's inputs, without racing: the task YAMLs lm-eval loads, the mergekit-evolve config
mergekit reads, the evomerge space evomerge reads, and the CMA-ES budget that makes the counts equal."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from tool_modules import load_tool


@pytest.fixture(scope="module")
def peers():
    return load_tool("bench_peers")


def _args(tmp_path, **overrides):
    values = {"method": "task_arithmetic", "layer_granularity": 2, "limit": 40, "seed": 0,
              "evomerge_calibration_merges": None, "no_evomerge_baselines": False, "out": tmp_path}
    return Namespace(**{**values, **overrides})


def test_tasks_configs_and_space(peers, zoo_dir, tmp_path):
    family = peers.read_family(zoo_dir)
    assert {t: family["tasks"][t]["kind"] for t in family["tasks"]} == {
        "arith": "multiple_choice", "cipher": "multiple_choice", "lang": "multiple_choice",
        "lang_arith": "generate"}
    tasks = peers.write_tasks(family, tmp_path, "peers")
    assert tasks["peers_lang_arith"]["metric"] == "exact_match,answer"
    args = _args(tmp_path)
    config = peers.evolve_config(family, tasks, args)
    space = peers.evomerge_space(family, tasks, config, 10, args, use_lm_eval=False)

    from evomerge.search.space import parse_search_space
    parsed = parse_search_space(space, source="space.yaml")
    assert [b.name for b in parsed.benchmarks] == list(tasks)
    assert parsed.trials == 10 and parsed.subset_size == 40
    assert parsed.merge.method == "task_arithmetic"

    mergekit_evo = pytest.importorskip("mergekit.evo.config", reason="mergekit is not installed")
    mergekit_evo.EvolMergeConfiguration.model_validate(config)

    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    loaded = manager.load(list(tasks))["tasks"]
    assert set(loaded) == set(tasks)
    rows = len((zoo_dir / "bench" / "lang_arith.jsonl").read_text().splitlines())
    task = loaded["peers_lang_arith"]
    docs = list(task.test_docs())
    assert len(docs) == rows and task.doc_to_text(docs[0]) == json.loads(
        (zoo_dir / "bench" / "lang_arith.jsonl").read_text().splitlines()[0])["prompt"]


@pytest.mark.parametrize("candidates, popsize", [(10, 9), (9, 8), (5, 4), (13, 6)])
def test_mergekit_evolve_budget_is_exact(peers, candidates, popsize):
    """k populations of P, then the mean: P nearest mergekit-evolve's default (9 in 6 dimensions) that fits."""
    pytest.importorskip("cma", reason="cma is not installed")
    assert peers.cma_plan(candidates, 6)[0] == popsize


def test_a_budget_no_population_fits_is_refused(peers):
    pytest.importorskip("cma", reason="cma is not installed")
    with pytest.raises(SystemExit, match="exactly 2 candidates"):
        peers.cma_plan(2, 6)


def test_exact_match_and_bos_as_evomerge_reads_them(peers, tmp_path):
    """lm-eval puts no target_delimiter before a loglikelihood continuation, and adds no bos where the
    tokenizer does not (SmolLM2): both are written into the task, so it scores what evomerge scores."""
    task = {"path": tmp_path / "reverse.jsonl", "kind": "exact_match", "options": {"delimiter": " "}}
    body, metric = peers.task_yaml("peers_reverse", task, "<|im_end|>", "<|im_start|>")
    assert metric == "acc,none" and body["output_type"] == "loglikelihood"
    assert body["doc_to_text"] == "<|im_start|>{{prompt}}"
    assert body["doc_to_target"] == " {{answer}}<|im_end|>" and body["target_delimiter"] == ""
