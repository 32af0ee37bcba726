"""How wrong is the subset estimate? Held-out random merges scored fully and on the subset.

``run_estimate_check`` fits a ``SubsetEstimator`` per benchmark and subset size
on the zoo's endpoint models (base + experts, plus optional extra random merges),
then scores ``n_heldout`` other random task-arithmetic merges on every item and
compares each estimator's prediction (from the subset answers only) with the
true full accuracy. It reports the mean absolute error per estimator and size,
and what the subset saves: items scored and wall time (full / subset).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.estimate.estimators import METHODS, SubsetEstimator, fit_subset_estimator
from evomerge.estimate.responses import ResponseMatrix, benchmark_item_ids, responses_path, score_model


def _random_weights(rng: np.random.Generator, n_experts: int) -> list[float]:
    """Task-arithmetic weights per expert, uniform in [0, 1]: from near-base to full experts."""
    return [round(float(w), 4) for w in rng.uniform(0.0, 1.0, n_experts)]


def _model_specs(tasks, n_extra, n_heldout, seed):
    """(name, role, weights) for endpoints, extra fit merges and held-out merges."""
    n = len(tasks)
    specs = [("base", "endpoint", [0.0] * n)]
    specs += [(f"expert:{t}", "endpoint", [1.0 if i == k else 0.0 for i in range(n)]) for k, t in enumerate(tasks)]
    rng = np.random.default_rng(seed)
    specs += [(f"extra{i:02d}", "extra", _random_weights(rng, n)) for i in range(n_extra)]
    rng = np.random.default_rng(seed + 1_000_003)
    specs += [(f"heldout{i:02d}", "heldout", _random_weights(rng, n)) for i in range(n_heldout)]
    return specs


def _table_markdown(rows: list[dict], methods: Sequence[str]) -> str:
    head = ["benchmark", "items", *methods, "items full/subset", "time full/subset"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["benchmark"], str(r["size"])] + [f"{r['mae'][m]:.3f}" for m in methods]
        cells += [f"{r['item_ratio']:.1f}x", f"{r['time_ratio']:.1f}x" if r["time_ratio"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class EstimateCheckTable:
    """Rows ``{benchmark, size, mae: {method: float}, item_ratio, time_ratio}`` plus run facts."""

    def __init__(self, rows: list[dict], methods: Sequence[str], facts: dict):
        self.rows, self.methods, self.facts = rows, list(methods), facts

    def to_markdown(self) -> str:
        return _table_markdown(self.rows, self.methods)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "methods": self.methods, "facts": self.facts}

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        table = Table(title="estimator mean absolute error vs. full-benchmark accuracy (held-out merges)")
        for col in ["benchmark", "items", *self.methods, "items full/sub", "time full/sub"]:
            table.add_column(col, justify="left" if col == "benchmark" else "right")
        for r in self.rows:
            best = min(r["mae"].values())
            cells = [f"[bold]{r['mae'][m]:.3f}[/bold]" if r["mae"][m] == best else f"{r['mae'][m]:.3f}"
                     for m in self.methods]
            table.add_row(r["benchmark"], str(r["size"]), *cells, f"{r['item_ratio']:.1f}x",
                          f"{r['time_ratio']:.1f}x" if r["time_ratio"] else "-")
        console.print(table)
        console.print(", ".join(f"{k}: {v}" for k, v in self.facts.items() if not isinstance(v, (dict, list))))


def run_estimate_check(
    zoo_dir: str | Path,
    out_dir: str | Path,
    n_heldout: int = 20,
    sizes: Sequence[int] = (10, 20, 50, 100),
    seed: int = 0,
    *,
    n_extra: int = 0,
    strategy: str = "anchor-irt",
    dims: int = 2,
    batch_size: int = 64,
    device: str | None = None,
    quiet: bool = False,
    n_timing: int = 3,
) -> EstimateCheckTable:
    """Score endpoints + merges of the zoo, fit estimators, report held-out MAE per size.

    Responses are cached in ``out_dir/responses/<bench>.npz`` (a rerun only scores
    missing models); estimators go to ``out_dir/estimators/``, the table to
    ``out_dir/estimate_check.{json,md}``. ``n_timing`` held-out merges are re-scored
    (full and subset) to time both; 0 skips the timing.
    """
    from evomerge.benchmarks import load_benchmark
    from evomerge.merge import MergeCore, Recipe
    from evomerge.zoo import load_zoo_manifest

    if n_heldout < 1:
        raise EvomergeError(f"n_heldout must be >= 1, got {n_heldout}")
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    manifest = load_zoo_manifest(zoo_dir)
    tasks = list(manifest["tasks"])
    bench_files = manifest.get("bench") or {t: f"bench/{t}.jsonl" for t in tasks}
    benches = {t: load_benchmark(zoo_dir / bench_files[t], name=t) for t in tasks}
    expert_paths = [zoo_dir / manifest["experts"][t] for t in tasks]
    specs = _model_specs(tasks, n_extra, n_heldout, seed)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    core = MergeCore(zoo_dir / manifest.get("base", "base"), expert_paths, device=device)
    model, tokenizer = core.new_model()

    def merged(weights):
        core.merge_into(model, Recipe(method="task_arithmetic", params={"weight": weights}), seed=seed)
        return model

    # 1. full responses of every model (cached, so reruns and resumed checks are cheap)
    matrices = {}
    for t in tasks:
        path = responses_path(out_dir, t)
        matrices[t] = ResponseMatrix.load(path) if path.exists() else ResponseMatrix.empty(
            benchmark_item_ids(benches[t]), t)
    for name, role, weights in specs:
        todo = [t for t in tasks if name not in matrices[t].model_names]
        if not todo:
            continue
        say(f"scoring {name} ({role}, weights {weights}) on {', '.join(todo)}")
        merged(weights)
        for t in todo:
            row = score_model(model, tokenizer, benches[t], batch_size=batch_size)
            matrices[t] = matrices[t].with_model(name, row)
            matrices[t].save(responses_path(out_dir, t))

    fit_names = [n for n, role, _ in specs if role != "heldout"]
    endpoint_names = [n for n, role, _ in specs if role == "endpoint"]
    heldout = [(n, w) for n, role, w in specs if role == "heldout"]

    # 2. estimators per benchmark and size, and their errors on the held-out merges
    rows, estimators_by_size = [], {}
    for size in sizes:
        errors = {m: [] for m in METHODS}
        estimators: dict[str, SubsetEstimator] = {}
        for t in tasks:
            n_total = len(benches[t].items)
            if size > n_total:
                raise EvomergeError(f"subset size {size} is larger than benchmark {t!r} ({n_total} items)")
            est = fit_subset_estimator(matrices[t].rows(fit_names), fit_names, endpoint_names, size,
                                       strategy, seed, dims, benchmark=t, item_ids=matrices[t].item_ids)
            est.save(out_dir / "estimators" / f"{t}-n{size}.json")
            estimators[t] = est
            truth = np.array([matrices[t].row(n).mean() for n, _ in heldout])
            preds = np.array([[est.predict_all(matrices[t].row(n)[est.indices])[m] for m in METHODS]
                              for n, _ in heldout])
            mae = np.abs(preds - truth[:, None]).mean(axis=0)
            for m, e in zip(METHODS, mae):
                errors[m].append(e)
            rows.append({"benchmark": t, "size": size, "mae": {m: float(e) for m, e in zip(METHODS, mae)},
                         "item_ratio": n_total / size, "time_ratio": None,
                         "anchor_weight_gmpirt": est.anchor_weight_gmpirt, "lambda_sd": est.lambda_sd})
        estimators_by_size[size] = estimators
        total_items = sum(len(b.items) for b in benches.values())
        rows.append({"benchmark": "mean", "size": size,
                     "mae": {m: float(np.mean(v)) for m, v in errors.items()},
                     "item_ratio": total_items / (size * len(tasks)), "time_ratio": None})

    # 3. wall time of a full vs. a subset evaluation, measured back to back on the same
    #    merges (median of a few) so machine load affects both alike
    full_runs, subset_runs = [], {size: [] for size in sizes}
    mismatches = 0  # subset scoring must reproduce the full scoring's answers on those items
    for name, weights in heldout[:max(0, n_timing)]:
        merged(weights)
        started = time.perf_counter()
        for t in tasks:
            score_model(model, tokenizer, benches[t], batch_size=batch_size)
        full_runs.append(time.perf_counter() - started)
        for size in sizes:
            started = time.perf_counter()
            answers = {t: score_model(model, tokenizer, benches[t], indices=estimators_by_size[size][t].indices,
                                      batch_size=batch_size) for t in tasks}
            subset_runs[size].append(time.perf_counter() - started)
            mismatches += sum(int((answers[t] != matrices[t].row(name)[estimators_by_size[size][t].indices]).sum())
                              for t in tasks)
    full_seconds = float(np.median(full_runs)) if full_runs else float("nan")
    subset_seconds = {size: float(np.median(v)) for size, v in subset_runs.items() if v}
    for row in rows:
        if row["benchmark"] == "mean" and row["size"] in subset_seconds:
            row["time_ratio"] = full_seconds / subset_seconds[row["size"]]

    facts = {
        "zoo": str(zoo_dir), "profile": manifest.get("profile"), "tasks": tasks,
        "fit_models": len(fit_names), "endpoints": len(endpoint_names), "heldout_models": len(heldout),
        "strategy": strategy, "dims": dims, "seed": seed,
        "full_eval_seconds": round(full_seconds, 3) if full_runs else None,
        "subset_eval_seconds": {str(k): round(v, 3) for k, v in subset_seconds.items()},
        "subset_vs_full_answer_mismatches": mismatches,
        "heldout_accuracy_range": {t: [round(float(min(matrices[t].row(n).mean() for n, _ in heldout)), 3),
                                       round(float(max(matrices[t].row(n).mean() for n, _ in heldout)), 3)]
                                   for t in tasks},
    }
    table = EstimateCheckTable(rows, METHODS, facts)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "estimate_check.json").write_text(json.dumps(table.to_dict(), indent=1))
    (out_dir / "estimate_check.md").write_text(table.to_markdown() + "\n")
    if not quiet:
        table.print()
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge estimate-check",
        description="Mean absolute error of each subset estimator on held-out random merges of the zoo.")
    parser.add_argument("--zoo", default="runs/zoo", help="model zoo folder (tools/make_zoo.py)")
    parser.add_argument("--out", default="runs/estimate-check", help="folder for responses, estimators, table")
    parser.add_argument("--n-heldout", type=int, default=20, help="held-out random merges scored fully")
    parser.add_argument("--n-extra", type=int, default=0, help="extra random merges added to the IRT fit")
    parser.add_argument("--sizes", default="10,20,50,100", help="comma-separated subset sizes")
    parser.add_argument("--strategy", default="anchor-irt",
                        choices=["random", "stratified", "anchor-irt", "anchor-correctness"])
    parser.add_argument("--dims", type=int, default=2, help="IRT latent dimensions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``evomerge estimate-check`` entry point; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        sizes = tuple(int(s) for s in str(args.sizes).split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        print(f"error: --sizes must be positive integers separated by commas, got {args.sizes!r}", file=sys.stderr)
        return 2
    try:
        run_estimate_check(args.zoo, args.out, n_heldout=args.n_heldout, sizes=sizes, seed=args.seed,
                           n_extra=args.n_extra, strategy=args.strategy, dims=args.dims,
                           batch_size=args.batch_size, device=args.device)
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
