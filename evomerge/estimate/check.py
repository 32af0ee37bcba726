"""How wrong is the subset estimate? Held-out random merges scored fully and on the subset.

``run_estimate_check`` fits a ``SubsetEstimator`` per benchmark of the zoo (each
expert's task and any composite one) and subset size on the zoo's endpoint models (base + experts, plus optional extra random merges),
then scores ``n_heldout`` other random task-arithmetic merges on every item and
compares each estimator's prediction (from the subset answers only) with the
true full accuracy. The models come from a `CheckModels`: `zoo_models` (global
task-arithmetic merges of a zoo's experts, weights uniform in [0, 1]) or
`evomerge.search.space_check.space_models` (random genomes of a search space: the
merges its own search scores, per layer group, with its method and bounds). It
reports the mean absolute error per estimator and size (per task, their mean,
and the worst task), how often each estimator's interval covers the true
accuracy, and what the subset saves: items scored and wall time (full / subset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from evomerge.benchmarks import load_benchmark
from evomerge.console import full_width_console
from evomerge.errors import EvomergeError
from evomerge.estimate.estimators import (DEFAULT_LEVEL, METHODS, SubsetEstimator, fit_abilities,
                                          fit_subset_estimator, subsets_from_responses)
from evomerge.estimate.extract import STRATEGIES, sample_items, stage_sizes
from evomerge.estimate.item_params import ItemParams
from evomerge.estimate.responses import ResponseMatrix, benchmark_item_ids, responses_path, score_model
from evomerge.merge import MergeCore, Recipe
from evomerge.zoo import load_zoo_manifest


def _random_weights(rng: np.random.Generator, n_experts: int) -> list[float]:
    """Task-arithmetic weights per expert, uniform in [0, 1]: from near-base to full experts."""
    return [round(float(w), 4) for w in rng.uniform(0.0, 1.0, n_experts)]


HELDOUT_SEED_OFFSET = 1_000_003
"""The held-out merges are drawn from ``seed`` + this, the extra ones from ``seed``: more extra merges never
change the held-out ones (zoo and space checks alike)."""


def _model_specs(tasks, n_extra, n_heldout, seed):
    """(name, role, weights) for endpoints, extra fit merges and held-out merges."""
    n = len(tasks)
    specs = [("base", "endpoint", [0.0] * n)]
    specs += [(f"expert:{t}", "endpoint", [1.0 if i == k else 0.0 for i in range(n)]) for k, t in enumerate(tasks)]
    rng = np.random.default_rng(seed)
    specs += [(f"extra{i:02d}", "extra", _random_weights(rng, n)) for i in range(n_extra)]
    rng = np.random.default_rng(seed + HELDOUT_SEED_OFFSET)
    specs += [(f"heldout{i:02d}", "heldout", _random_weights(rng, n)) for i in range(n_heldout)]
    return specs


@dataclasses.dataclass
class CheckModels:
    """What a check scores: its benchmarks, its models in order (endpoints first), and how to make each."""

    benches: dict[str, Any]                 # benchmark name -> Benchmark
    specs: list[tuple[str, str, Any]]       # (name, role: endpoint | extra | heldout, what `model_for` takes)
    model_for: Callable[[Any], Any]         # the model of one spec's third field (made in place, valid until the next)
    tokenizer: Any
    facts: dict                             # where the models came from, for the table's facts


def zoo_models(zoo_dir: str | Path, n_extra: int, n_heldout: int, seed: int, device: str | None = None) -> CheckModels:
    """A zoo's base and experts, and random global task-arithmetic merges of its experts (weights in [0, 1])."""
    zoo_dir = Path(zoo_dir)
    manifest = load_zoo_manifest(zoo_dir)
    experts = list(manifest["tasks"])
    # every benchmark of the zoo: the experts' tasks and any composite one (zoo v4), with its scoring keys
    bench_files = manifest.get("bench") or {t: f"bench/{t}.jsonl" for t in experts}
    options = manifest.get("benchmarks") or {}
    benches = {t: load_benchmark(zoo_dir / bench_files[t], name=t, **options.get(t, {})) for t in bench_files}
    core = MergeCore(zoo_dir / manifest.get("base", "base"), [zoo_dir / manifest["experts"][t] for t in experts],
                     device=device)
    model, tokenizer = core.new_model()

    def merged(weights):
        core.merge_into(model, Recipe(method="task_arithmetic", params={"weight": weights}), seed=seed)
        return model

    return CheckModels(benches, _model_specs(experts, n_extra, n_heldout, seed), merged, tokenizer,
                       {"zoo": str(zoo_dir), "profile": manifest.get("profile")})


def fit_design(matrix: ResponseMatrix, fit_names, endpoint_names, sizes, strategy, seed, dims,
                calibration_items: int | None, params: ItemParams | None, trial_names: Sequence[str] = ()):
    """One estimator fitted as a search would calibrate: every fit model on every item (the default);
    with ``calibration_items``, the extra merges on the stages' items (chosen from the endpoints) and
    that many random other items each; with ``params``, the item parameters fixed and the endpoints
    scored on the stages' items only. ``trial_names``: models refitted in with their answers on the
    stages' items only, as a search's trials would be if calibration refitted as they arrive (their
    answers are theirs, not calibration's). Returns the estimator and the item evaluations it needed."""
    if trial_names and calibration_items is None and params is None:
        raise EvomergeError("trials are refitted into a calibration on less only (calibration_items or params)")
    fit = matrix.subset([*fit_names, *trial_names])
    if calibration_items is None and params is None:
        return (fit_subset_estimator(fit, None, endpoint_names, sizes, strategy, seed, dims),
                len(fit_names) * fit.n_items)
    item_params = None if params is None else (params.a, params.b)
    first = None if params is None else params.first_stage(stage_sizes(sizes, fit.n_items)[0])
    subsets = subsets_from_responses(fit.subset(endpoint_names), sizes, strategy, seed, dims,
                                     item_params=item_params, first=first)
    staged = np.zeros(fit.n_items, dtype=bool)
    for subset in subsets:
        if len(subset.indices) < subset.n_total:
            staged[subset.indices] = True
    extras = [n for n in fit_names if n not in endpoint_names]
    samples = sample_items(fit.n_items, np.flatnonzero(staged), len(extras),
                           fit.n_items if calibration_items is None else calibration_items, seed)
    observed = []
    for name in fit.model_names:
        seen = np.ones(fit.n_items, dtype=bool)
        if name in trial_names or (name in endpoint_names and params is not None):
            seen = staged.copy()
        elif name in extras and calibration_items is not None:
            seen = staged.copy()
            seen[samples[extras.index(name)]] = True
        observed.append(seen)
    observed = np.stack(observed)
    estimator = fit_subset_estimator(fit, None, endpoint_names, sizes, strategy, seed, dims, observed=observed,
                                     subsets=subsets, item_params=item_params)
    return estimator, int(observed[: len(fit_names)].sum())


def _reused(source: Path, task: str, sizes, matrix: ResponseMatrix, endpoint_names) -> tuple[SubsetEstimator, int]:
    """Another check's estimator for these sizes (its item parameters, subsets and cross-validated mixes, as
    the item bank hands them to a later study), with the endpoints' abilities fitted from their answers on
    its subsets' items only; and those item evaluations."""
    path = source / "estimators" / f"{task}-n{'-'.join(str(s) for s in sizes)}.json"
    if not path.exists():
        raise EvomergeError(f"{source} has no estimator {path.name} to reuse (run the check there with these sizes)")
    stored = SubsetEstimator.load(path)
    staged = np.unique(np.concatenate([st.subset.indices for st in stored.stages if not st.exact]))
    rows = matrix.rows(endpoint_names)[:, staged]
    theta = fit_abilities(rows, np.ones(rows.shape, dtype=bool), stored.a[staged], stored.b[staged], stored.theta_sd)
    return (dataclasses.replace(stored, endpoint_names=list(endpoint_names), endpoint_theta=theta),
            len(endpoint_names) * len(staged))


def _item_params_for(source: Path | None, task: str, item_ids) -> ItemParams | None:
    """A task's item parameters from a file, or a folder of ``<task>.json`` / ``<task>.npz``."""
    if source is None:
        return None
    path = source
    if source.is_dir():
        found = [source / f"{task}{suffix}" for suffix in (".json", ".npz") if (source / f"{task}{suffix}").exists()]
        if not found:
            raise EvomergeError(f"{source} has no item parameters for {task!r} ({task}.json or {task}.npz)")
        path = found[0]
    return ItemParams.load(path).for_items(item_ids, task)


def _error_cell(row: dict, method: str) -> str:
    cell = f"{row['mae'][method]:.3f}"
    return f"{cell} ({row['worst_task'][method]})" if "worst_task" in row else cell


def _markdown(head: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(cells) + " |" for cells in lines])


class EstimateCheckTable:
    """Error rows ``{benchmark, size, mae: {method: float}, item_ratio, time_ratio}`` (per task, ``mean``
    and ``worst`` -- the task with the largest error, per method), interval coverage rows
    ``{benchmark, size, coverage: {method: float}, width: {method: float}}`` and run facts."""

    def __init__(self, rows: list[dict], methods: Sequence[str], facts: dict, coverage_rows: list[dict] = ()):
        self.rows, self.methods, self.facts = rows, list(methods), facts
        self.coverage = list(coverage_rows)

    def error_cells(self) -> tuple[list[str], list[list[str]]]:
        head = ["benchmark", "items", *self.methods, "items full/subset", "time full/subset"]
        return head, [[r["benchmark"], str(r["size"]), *(_error_cell(r, m) for m in self.methods),
                       f"{r['item_ratio']:.1f}x", f"{r['time_ratio']:.1f}x" if r["time_ratio"] else "-"]
                      for r in self.rows]

    def coverage_cells(self) -> tuple[list[str], list[list[str]]]:
        """Pooled over the benchmarks: coverage of the intervals (mean width in brackets)."""
        head = ["items", *self.methods]
        return head, [[str(r["size"]), *(f"{r['coverage'][m]:.2f} ({r['width'][m]:.3f})" for m in self.methods)]
                      for r in self.coverage if r["benchmark"] == "all"]

    def to_markdown(self) -> str:
        text = _markdown(*self.error_cells())
        if self.coverage:
            level = self.facts.get("level", DEFAULT_LEVEL)
            text += (f"\n\n{level:.0%} interval coverage of the held-out merges' measured accuracy "
                     f"(mean interval width):\n\n" + _markdown(*self.coverage_cells()))
        return text

    def to_dict(self) -> dict:
        return {"rows": self.rows, "coverage": self.coverage, "methods": self.methods, "facts": self.facts}

    def print(self, console=None) -> None:
        from rich.table import Table

        console = console or full_width_console()
        head, lines = self.error_cells()
        table = Table(title="estimator mean absolute error vs. full-benchmark accuracy (held-out merges; "
                            "worst: the task with the largest error)")
        for col in head:
            table.add_column(col, justify="left" if col == "benchmark" else "right")
        for row, cells in zip(self.rows, lines):
            best = min(row["mae"].values())
            table.add_row(*[f"[bold]{c}[/bold]" if m in row["mae"] and row["mae"][m] == best else c
                            for m, c in zip(head, cells)])
        console.print(table)
        if self.coverage:
            head, lines = self.coverage_cells()
            table = Table(title=f"{self.facts.get('level', DEFAULT_LEVEL):.0%} interval coverage "
                                "(mean width), pooled over benchmarks")
            for col in head:
                table.add_column(col, justify="right")
            for cells in lines:
                table.add_row(*cells)
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
    nested: bool = False,
    level: float = DEFAULT_LEVEL,
    calibration_items: int | None = None,
    item_params: str | Path | None = None,
    reuse: str | Path | None = None,
    models: CheckModels | None = None,
) -> EstimateCheckTable:
    """Score endpoints + merges of the zoo, fit estimators, report held-out MAE per size.

    Responses are cached in ``out_dir/responses/<bench>.npz`` (a rerun only scores
    missing models); estimators go to ``out_dir/estimators/``, the table to
    ``out_dir/estimate_check.{json,md}``. ``n_timing`` held-out merges are re-scored
    (full and subset) to time both; 0 skips the timing. ``nested``: one estimator per
    benchmark whose stages are the sizes (nested subsets, as racing uses) instead of
    one estimator per size. ``level``: the intervals whose coverage is reported.
    ``calibration_items``: the extra merges are fitted from their answers on the subset's
    items (chosen from the endpoints alone) and this many random other items each, as a
    search calibrating on less scores them (default: on every item). ``item_params``: a
    file or a folder of ``<task>.json``: fixed item parameters (another fit's, or a
    file's), the endpoints then answering the subset's items only. Each fit's item
    parameters are written to ``out_dir/item_params/<task>.json``; the item evaluations
    each fit needed are in the facts. ``reuse``: another check's folder, whose estimators
    are reused as a later study reuses the item bank's (item parameters, subsets and mixes
    kept; only the endpoints' abilities fitted, from their answers on the subsets' items).
    ``models``: what to score instead of ``zoo_dir``'s global task-arithmetic merges (`CheckModels`).
    """
    if n_heldout < 1:
        raise EvomergeError(f"n_heldout must be >= 1, got {n_heldout}")
    out_dir = Path(out_dir)
    sizes = sorted(set(sizes))
    models = models if models is not None else zoo_models(zoo_dir, n_extra, n_heldout, seed, device)
    benches, specs, tokenizer = models.benches, models.specs, models.tokenizer
    tasks = list(benches)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

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
        say(f"scoring {name} ({role}{'' if isinstance(weights, dict) else f', weights {weights}'}) on {', '.join(todo)}")
        model = models.model_for(weights)
        for t in todo:
            row, margins = score_model(model, tokenizer, benches[t], batch_size=batch_size)
            matrices[t] = matrices[t].with_model(name, row, margins=margins)
            matrices[t].save(responses_path(out_dir, t))

    fit_names = [n for n, role, _ in specs if role != "heldout"]
    endpoint_names = [n for n, role, _ in specs if role == "endpoint"]
    heldout = [(n, w) for n, role, w in specs if role == "heldout"]

    # 2. estimators per benchmark and size, their errors and interval coverage on the held-out merges
    rows, coverage_rows, estimators_by_size = [], [], {size: {} for size in sizes}
    calibration_cost: dict[str, dict[str, int]] = {}
    for t in tasks:
        n_total = len(benches[t].items)
        if max(sizes) > n_total:
            raise EvomergeError(f"subset size {max(sizes)} is larger than benchmark {t!r} ({n_total} items)")
        params = _item_params_for(None if item_params is None else Path(item_params), t, matrices[t].item_ids)
        stage_lists = [list(sizes)] if nested else [[size] for size in sizes]
        if reuse is not None:
            designs = [_reused(Path(reuse), t, stages, matrices[t], endpoint_names) for stages in stage_lists]
        else:
            designs = [fit_design(matrices[t], fit_names, endpoint_names, stages, strategy, seed, dims,
                                   calibration_items, params) for stages in stage_lists]
        fits = [est for est, _ in designs]
        calibration_cost[t] = {str(est.stages[0].size): items for est, items in designs}
        ItemParams(fits[-1].a, fits[-1].b, matrices[t].item_ids, source=f"estimate-check {out_dir}",
                   models=len(fit_names)).save(out_dir / "item_params" / f"{t}.json")
        for est in fits:
            est.save(out_dir / "estimators" / (f"{t}-n{'-'.join(str(s.size) for s in est.stages)}.json"))
            for stage_number, stage in enumerate(est.stages):
                estimators_by_size[stage.size][t] = (est, stage_number)
    for size in sizes:
        errors, covered, widths = {m: [] for m in METHODS}, {m: [] for m in METHODS}, {m: [] for m in METHODS}
        for t in tasks:
            est, stage = estimators_by_size[size][t]
            indices = est.stage_indices(stage)
            truth = np.array([matrices[t].row(n).mean() for n, _ in heldout])
            found = [est.estimate_all(matrices[t].row(n)[indices], stage=stage, level=level,
                                      subset_margins=matrices[t].margin_row(n)[indices])
                     for n, _ in heldout]
            for m in METHODS:
                errors[m].append(np.abs(np.array([f[m].value for f in found]) - truth))
                covered[m].append(np.array([f[m].low - 1e-9 <= x <= f[m].high + 1e-9 for f, x in zip(found, truth)]))
                widths[m].append(np.array([f[m].high - f[m].low for f in found]))
            st = est.stages[stage]
            rows.append({"benchmark": t, "size": size, "mae": {m: float(errors[m][-1].mean()) for m in METHODS},
                         "max_error": {m: float(errors[m][-1].max()) for m in METHODS},
                         "item_ratio": len(benches[t].items) / size, "time_ratio": None,
                         "anchor_weight_gmpirt": st.anchor_weight_gmpirt, "lambda_sd": st.lambda_sd})
            coverage_rows.append({"benchmark": t, "size": size,
                                  "coverage": {m: float(covered[m][-1].mean()) for m in METHODS},
                                  "width": {m: float(widths[m][-1].mean()) for m in METHODS}})
        total_items = sum(len(b.items) for b in benches.values())
        task_rows = rows[-len(tasks):]
        rows.append({"benchmark": "mean", "size": size,
                     "mae": {m: float(np.mean([e.mean() for e in errors[m]])) for m in METHODS},
                     "item_ratio": total_items / (size * len(tasks)), "time_ratio": None})
        rows.append({"benchmark": "worst", "size": size,
                     "mae": {m: max(r["mae"][m] for r in task_rows) for m in METHODS},
                     "worst_task": {m: max(task_rows, key=lambda r: r["mae"][m])["benchmark"] for m in METHODS},
                     "item_ratio": total_items / (size * len(tasks)), "time_ratio": None})
        coverage_rows.append({"benchmark": "all", "size": size,
                              "coverage": {m: float(np.concatenate(covered[m]).mean()) for m in METHODS},
                              "width": {m: float(np.concatenate(widths[m]).mean()) for m in METHODS}})

    # 3. wall time of a full vs. a subset evaluation, measured back to back on the same
    #    merges (median of a few) so machine load affects both alike
    full_runs, subset_runs = [], {size: [] for size in sizes}
    mismatches = 0  # subset scoring must reproduce the full scoring's answers on those items
    for name, weights in heldout[:max(0, n_timing)]:
        model = models.model_for(weights)
        started = time.perf_counter()
        for t in tasks:
            score_model(model, tokenizer, benches[t], batch_size=batch_size)
        full_runs.append(time.perf_counter() - started)
        for size in sizes:
            started = time.perf_counter()
            indices = {t: estimators_by_size[size][t][0].stage_indices(estimators_by_size[size][t][1]) for t in tasks}
            answers = {t: score_model(model, tokenizer, benches[t], indices=indices[t], batch_size=batch_size)[0]
                       for t in tasks}
            subset_runs[size].append(time.perf_counter() - started)
            mismatches += sum(int((answers[t] != matrices[t].row(name)[indices[t]]).sum()) for t in tasks)
    full_seconds = float(np.median(full_runs)) if full_runs else float("nan")
    subset_seconds = {size: float(np.median(v)) for size, v in subset_runs.items() if v}
    for row in rows:
        if row["benchmark"] == "mean" and row["size"] in subset_seconds:
            row["time_ratio"] = full_seconds / subset_seconds[row["size"]]

    facts = {
        **models.facts, "tasks": tasks,
        "fit_models": len(fit_names), "endpoints": len(endpoint_names), "endpoint_names": endpoint_names,
        "heldout_models": len(heldout),
        "strategy": strategy, "dims": dims, "seed": seed, "nested": nested, "level": level,
        "calibration_items": calibration_items, "item_params": None if item_params is None else str(item_params),
        "reuse": None if reuse is None else str(reuse),
        "calibration_item_evaluations": calibration_cost,
        "full_eval_seconds": round(full_seconds, 3) if full_runs else None,
        "subset_eval_seconds": {str(k): round(v, 3) for k, v in subset_seconds.items()},
        "subset_vs_full_answer_mismatches": mismatches,
        "heldout_accuracy_range": {t: [round(float(min(matrices[t].row(n).mean() for n, _ in heldout)), 3),
                                       round(float(max(matrices[t].row(n).mean() for n, _ in heldout)), 3)]
                                   for t in tasks},
    }
    table = EstimateCheckTable(rows, METHODS, facts, coverage_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "estimate_check.json").write_text(json.dumps(table.to_dict(), indent=1))
    (out_dir / "estimate_check.md").write_text(table.to_markdown() + "\n")
    if not quiet:
        table.print()
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge estimate-check",
        description="Mean absolute error of each subset estimator on held-out random merges of the zoo "
                    "(or random genomes of a search space, --space).")
    parser.add_argument("--zoo", default="runs/zoo", help="model zoo folder (tools/make_zoo.py)")
    parser.add_argument("--space", default=None,
                        help="a search space YAML: its base and experts, and random genomes of its own genes as the "
                             "extra and held-out merges, on its benchmarks (instead of --zoo's global "
                             "task-arithmetic merges)")
    parser.add_argument("--out", default="runs/estimate-check", help="folder for responses, estimators, table")
    parser.add_argument("--n-heldout", type=int, default=20, help="held-out random merges scored fully")
    parser.add_argument("--n-extra", type=int, default=0, help="extra random merges added to the IRT fit")
    parser.add_argument("--sizes", default="10,20,50,100", help="comma-separated subset sizes")
    parser.add_argument("--strategy", default="anchor-irt",
                        choices=list(STRATEGIES))
    parser.add_argument("--dims", type=int, default=2, help="IRT latent dimensions")
    parser.add_argument("--nested", action="store_true",
                        help="fit the sizes as nested stages of one estimator (as racing does)")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="interval level whose coverage is reported")
    parser.add_argument("--calibration-items", type=int, default=None,
                        help="fit the extra merges from the subset's items (chosen from the endpoints) and this many "
                             "random other items each, as a search calibrating on less (default: every item)")
    parser.add_argument("--reuse", default=None,
                        help="another check's folder: reuse its estimators as a later study reuses the item bank's "
                             "(only the endpoints' abilities fitted, from the subsets' items)")
    parser.add_argument("--item-params", default=None,
                        help="item parameters fixed from a file or a folder of <task>.json (another check's "
                             "OUT/item_params): the endpoints answer only the subset's items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-timing", type=int, default=3, help="held-out merges timed full vs subset (0: no timing)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available; with --space, the space's own device)")
    return parser


SpaceModels = Callable[..., CheckModels]
"""(space path, n_extra, n_heldout, seed, device) -> the models of ``--space`` (`evomerge.search.space_check`)."""


def main(argv: Sequence[str] | None = None, space_models: SpaceModels | None = None) -> int:
    """``evomerge estimate-check`` entry point; returns the exit code (2 on bad input). ``space_models``: what
    ``--space`` draws its models with (the command line passes the search package's; this package is below it)."""
    args = build_parser().parse_args(argv)
    try:
        sizes = tuple(int(s) for s in str(args.sizes).split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        print(f"error: --sizes must be positive integers separated by commas, got {args.sizes!r}", file=sys.stderr)
        return 2
    try:
        models = None
        if args.space is not None:
            if space_models is None:
                raise EvomergeError("--space needs the search package: run it as `evomerge estimate-check --space ...`")
            models = space_models(args.space, n_extra=args.n_extra, n_heldout=args.n_heldout, seed=args.seed,
                                  device=args.device)
        run_estimate_check(args.zoo, args.out, n_heldout=args.n_heldout, sizes=sizes, seed=args.seed,
                           n_extra=args.n_extra, strategy=args.strategy, dims=args.dims,
                           batch_size=args.batch_size, device=args.device, nested=args.nested, level=args.level,
                           n_timing=args.n_timing, calibration_items=args.calibration_items,
                           item_params=args.item_params, reuse=args.reuse, models=models)
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
