"""Per-item comparison of an lm-eval benchmark scored by evomerge with ``lm_eval.simple_evaluate`` itself.

Both sides read the same model folder in float32: evomerge through its in-memory
scorer (``load_benchmark(lm_eval=...)`` + ``score_records``), lm-eval through its
HF backend (``model="hf"``, ``pretrained=`` the folder, ``log_samples=True``),
with different batch sizes, so batching and padding are part of what is compared.
Used by tests/test_lmeval_parity.py, also inside an offline subprocess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TIE = 1e-4
"""Two choices whose (normalized) log-likelihoods lie this close are a tie that float rounding may break
either way; an item whose answer differs only there is explained, any other difference fails."""


@dataclass
class Comparison:
    kind: str
    metric: str
    items: int
    mine: list[bool]
    theirs: list[bool]
    prompts_equal: bool                          # every request's (context, continuation / gen_kwargs)
    loglik_gap: float = 0.0                      # largest |evomerge - lm-eval| log-likelihood of a request
    generations: list[tuple[str, str]] = field(default_factory=list)   # (evomerge, lm-eval) raw generations
    ties: dict[int, float] = field(default_factory=dict)              # doc id -> gap of lm-eval's two best

    @property
    def differing(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.mine, self.theirs)) if a != b]

    @property
    def unexplained(self) -> list[int]:
        return [i for i in self.differing if i not in self.ties]


def simple_evaluate_options(options: dict) -> dict:
    """A benchmark entry's lm-eval keys as ``simple_evaluate`` arguments."""
    names = {"fewshot_seed": "fewshot_random_seed"}
    return {names.get(k, k): v for k, v in options.items() if k not in ("metric", "filter")}


def compare(model_dir, task: str, metrics: tuple[str, ...] | None = None, batch_size: int = 5,
            lm_eval_batch_size: int = 3, **options) -> dict[str, Comparison]:
    """evomerge's and lm-eval's per-item correctness for ``task`` on ``model_dir``, per metric."""
    import lm_eval
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.benchmarks import load_benchmark, score_records
    from evomerge.benchmarks.lmeval.tasks import _task_manager

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=[task], device="cpu",
        batch_size=lm_eval_batch_size, log_samples=True, bootstrap_iters=0,
        # lm-eval's own task index, built once per process (10 s for the registered tasks): the one evomerge
        # keeps, so the registered task is indexed once; it is lm-eval's class, not evomerge's answers
        task_manager=_task_manager(task.endswith(".yaml")), **simple_evaluate_options(options))
    (task_name,) = results["samples"]
    found = {}
    for metric in metrics or (None,):
        bench = load_benchmark(lm_eval=task, tokenizer=tokenizer, **options, **({"metric": metric} if metric else {}))
        scored = score_records(model, tokenizer, bench, batch_size=batch_size)
        settings = bench.settings
        samples = sorted((s for s in results["samples"][task_name] if s["filter"] == settings.filter),
                         key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == sorted(settings.docs), "the same documents on both sides"
        built = settings.requests(tokenizer)
        prompts_equal = all([list(r.args) for r in built[s["doc_id"]]] == [list(a) for a in s["arguments"]]
                            for s in samples)
        comparison = Comparison(bench.kind, settings.metric, len(samples), [bool(c) for c in scored.correct],
                                [bool(s[settings.metric]) for s in samples], prompts_equal)
        assert all(len(s["arguments"]) == len(built[s["doc_id"]]) > 0 for s in samples)
        if bench.kind != "lm_eval_generate_until":   # records round log-likelihoods: compare the unrounded ones
            with torch.inference_mode():   # as score_records runs every kind
                answered = settings.evaluate(model, tokenizer, bench.items, batch_size, lambda n: None)
            for result, sample in zip(answered, samples):
                mine = np.array([float(request.resps[0][0]) for request in result.requests])
                theirs = np.array([resp[0][0] for resp in sample["resps"]], dtype=float)
                comparison.loglik_gap = max(comparison.loglik_gap, float(np.abs(mine - theirs).max()))
        for record, sample in zip(scored.records, samples):
            if bench.kind == "lm_eval_generate_until":
                comparison.generations.append((record["generation"], sample["resps"][0][0]))
            if bench.kind == "lm_eval_multiple_choice":
                gap = _best_two_gap(sample, record["choices"], settings.metric)
                if gap < TIE:
                    comparison.ties[sample["doc_id"]] = gap
        found[settings.metric] = comparison
    return found


def _best_two_gap(sample: dict, choices: list[str], metric: str) -> float:
    """How far apart lm-eval's two best choices are, as the metric ranks them."""
    lls = np.array([resp[0][0] for resp in sample["resps"]], dtype=float)[: len(choices)]
    if metric == "acc_norm":
        lls = lls / np.array([len(c) for c in choices], dtype=float)
    best = np.sort(lls)[::-1]
    return float(best[0] - best[1]) if len(best) > 1 else float("inf")


def write_task(folder: Path, name: str, body: str, data: dict[str, Path]) -> Path:
    """A task YAML over local jsonl files (``dataset_path: json``), with ``body`` (prompt, output type, metrics)."""
    files = "\n".join(f"    {split}: {path}" for split, path in data.items())
    text = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}\ntest_split: test\n{body}"
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path
