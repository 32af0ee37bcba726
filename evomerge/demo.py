"""`evomerge demo`: the whole product on the tiny zoo, on CPU, in a few minutes.

Builds the zoo if missing, runs (or resumes) the demo search, exports the
best of its top trials re-scored on every item, and prints its full-benchmark
accuracy next to the base, each expert, uniform task arithmetic and TIES, all
scored on every benchmark item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from evomerge.console import full_width_console, say
from evomerge.errors import EvomergeError
from evomerge.estimate import ResponseMatrix, responses_path
from evomerge.evaluation import accuracy_title, evaluate_models, print_accuracy_table
from evomerge.merge import Recipe
from evomerge.search.costs import CostLedger, print_costs
from evomerge.search.records import Ranking, StudyKey
from evomerge.search.run import MergeSearch
from evomerge.search.runs import start_run
from evomerge.search.space import load_search_space
from evomerge.trial_export import export_trial
from evomerge.zoo import ensure_zoo

# The hand-made merges the evolved one must beat, as mergekit users would write them.
BASELINE_RECIPES = {
    "task_arithmetic (uniform, weight 0.5)": {"method": "task_arithmetic", "params": {"weight": 0.5}},
    "task_arithmetic (uniform, weight 1.0)": {"method": "task_arithmetic", "params": {"weight": 1.0}},
    "ties (weight 1.0, density 0.5)": {"method": "ties", "params": {"weight": 1.0, "density": 0.5}},
}


DEMO_VALIDATE_TOP = 5


def normalized_accuracy(results: dict[str, dict[str, float]], experts: list[str]) -> dict[str, dict[str, float]]:
    """Share of the expert's gain over the base each model keeps, per task (FusionBench-style normalized
    accuracy, measured from the base): ``(acc - base) / (expert - base)``; 1 = the expert's level.

    A task without an expert of its own (a composite one) is normalized by the best expert on it, so
    above 1 means better than every expert. ``nan`` where that reference does not beat the base.
    """
    base = results["base"]
    tasks = list(base)
    reference = {t: results[f"expert {t}"][t] if t in experts else
                 max(results[f"expert {e}"][t] for e in experts) for t in tasks}
    return {name: {t: (scores[t] - base[t]) / (reference[t] - base[t]) if reference[t] > base[t] else float("nan")
                   for t in tasks}
            for name, scores in results.items()}


def print_normalized_table(results: dict[str, dict[str, float]], tasks: list[str], experts: list[str]) -> None:
    normalized = normalized_accuracy(results, experts)
    table = Table(title="accuracy (normalized: share of the expert's gain over the base kept; composite tasks: "
                        "of the best expert's)")
    table.add_column("model")
    for task in tasks:
        table.add_column(task if task in experts else f"{task} (composite)", justify="right")
    for name, scores in results.items():
        table.add_row(name, *(f"{scores[t]:.3f} ({normalized[name][t]:.2f})" for t in tasks))
    full_width_console().print(table)


def _calibrated_accuracy(run_dir: Path, benchmarks: dict, name: str) -> dict[str, float] | None:
    """``name``'s accuracy per benchmark from the calibration's responses, or None unless it answered every item
    (a study that reused known item parameters scored its endpoints on the subsets only)."""
    scores = {}
    for bench_name, bench in benchmarks.items():
        path = responses_path(run_dir, bench_name)
        matrix = ResponseMatrix.load(path) if path.exists() else None
        if (matrix is None or name not in matrix.model_names or list(matrix.item_ids) != [i.id for i in bench.items]
                or not matrix.complete(name)):
            return None
        scores[bench_name] = float(matrix.row(name).mean())
    return scores


def moved_to_zoo(raw: Any, zoo: str, to: str) -> Any:
    """A space (or any part of one) with every path in the zoo folder ``zoo`` moved into ``to``."""
    if isinstance(raw, str) and (raw == zoo or raw.startswith(zoo + "/")):
        return to + raw[len(zoo):]
    if isinstance(raw, dict):
        return {k: moved_to_zoo(v, zoo, to) for k, v in raw.items()}
    if isinstance(raw, list):
        return [moved_to_zoo(v, zoo, to) for v in raw]
    return raw


def seeded_space(space_path: Path, zoo_seed: int) -> Path:
    """The demo space pointed at a zoo built with ``zoo_seed`` (``runs/zoo`` -> ``runs/zoo-seedN``,
    run ``NAME-seedN``), written beside the runs: another seed stands in for another machine,
    whose training gives other experts, without touching the seed-0 zoo and run."""
    raw = yaml.safe_load(space_path.read_text())
    zoo = str(raw.get("zoo") or "").rstrip("/")
    if not zoo:
        raise EvomergeError(f"{space_path} names no zoo: --zoo-seed needs a space built on the zoo")
    seeded = f"{zoo}-seed{zoo_seed}"
    raw = moved_to_zoo(raw, zoo, seeded)
    raw["name"] = f"{raw.get('name', space_path.stem)}-seed{zoo_seed}"
    out = Path(seeded).parent / f"{raw['name']}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run_demo(space_path: str | Path = "search_spaces/demo.yaml", trials: int | None = None, progress: bool = True,
             validate_top: int = DEMO_VALIDATE_TOP, zoo_seed: int = 0, validate_items: int | None | str = "race") -> int:
    space_path = Path(space_path)
    if not space_path.exists():
        raise EvomergeError(f"demo search space not found: {space_path} (run the demo from the repository root)")
    if zoo_seed:
        space_path = seeded_space(space_path, zoo_seed)
    zoo = load_search_space(space_path).zoo
    if zoo:
        say(f"model zoo: {zoo}" + (f" (seed {zoo_seed})" if zoo_seed else ""))
        ensure_zoo(zoo, seed=zoo_seed, progress=progress)

    space, run_dir = start_run(space_path)
    search = MergeSearch(space, run_dir, progress=progress)
    study, _ = search.run(trials)
    # The top estimate is biased upwards (winner's curse): validate the best-estimated (default 5)
    # trials on more items (a race; every item with validate_items=None) and export the best of them.
    exported = export_trial(run_dir, out_dir=run_dir / "best", validate_top=validate_top, progress=progress,
                            builder=search.builder, validate_items=validate_items)
    say(f"best merge exported to {exported}")

    # The final table is the demo's own cost (a search needs none of it): every model on every item,
    # except answers the run already has (calibration's endpoints, the validated winner).
    benchmarks = search.benchmarks
    n_items = sum(len(b.items) for b in benchmarks.values())
    ledger = CostLedger(study, "final_table")
    models: dict = {"base": space.base, **{f"expert {n}": p for n, p in space.experts.items()}}
    results = {}
    with ledger.timed(say if progress else None,
                      what="every model on every item: the demo's comparison, which a search does not need"):
        for label, name in [("base", "base"), *((f"expert {n}", n) for n in space.experts)]:
            scores = _calibrated_accuracy(run_dir, benchmarks, name)
            if scores is None:
                scores = evaluate_models({label: models[label]}, benchmarks, base=space.base)[label]  # a LoRA expert: on the space's base
                ledger.add(items=n_items, models=1)
            results[label] = scores
        core, model, tokenizer = search.builder.core, search.builder.model, search.tokenizer  # already loaded
        for name, recipe in BASELINE_RECIPES.items():
            core.merge_into(model, Recipe.from_dict(recipe), seed=space.seed)
            results.update(evaluate_models({name: (model, tokenizer)}, benchmarks))
            ledger.add(items=n_items, models=1)
        ranking = Ranking.of(space)
        measured = ranking.measured(study).get(ranking.winner(study).trial.number)  # the trial export wrote
        if measured is not None and set(measured) == set(benchmarks):
            results["evolved (exported)"] = measured  # validation scored this very model on every item
        else:
            results.update(evaluate_models({"evolved (exported)": exported}, benchmarks))
            ledger.add(items=n_items, models=1)
    study.set_user_attr(StudyKey.FINAL_TABLE, results)  # what tools/bench_cost.py reports
    tasks = list(benchmarks)
    print_accuracy_table(results, tasks, title=accuracy_title(benchmarks))
    print_normalized_table(results, tasks, list(space.experts))

    def mean(scores):
        return sum(scores[t] for t in tasks) / len(tasks)

    evolved = mean(results["evolved (exported)"])
    rivals = {n: mean(s) for n, s in results.items() if n not in ("evolved (exported)", "base")}
    best_rival = max(rivals, key=rivals.get)
    verdict = "beats" if evolved > rivals[best_rival] else "does NOT beat"
    say(f"evolved merge mean accuracy {evolved:.3f} {verdict} the best other model ({best_rival}: {rivals[best_rival]:.3f})")
    print_costs(study, f"what run {space.name!r} spent")
    return 0

