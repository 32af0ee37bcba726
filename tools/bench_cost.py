"""What a demo search costs, phase by phase, before and after calibrating and validating on less (issue 26).

Runs `evomerge demo` (a subprocess, so its wall time is a user's) on a space
variant per design and reads what the run recorded in its study: item
evaluations, models and seconds per phase (`evomerge.search.costs`), the time
from the command's start to the first scored trial, and the demo's final table
(the exported merge measured on every item):

* ``before``: every calibration model on every item (``calibration_items: all``), a 2-dim IRT model, gmp-IRT,
  item parameters fitted by the study (``item_params: fit``), the top 5 validated
  on every item (``--validate-items all``): the search as it was;
* ``after``: the defaults (4 calibration merges on the subsets' items and a sample,
  the validation race), ``item_params: fit`` so the study fits its own;
* ``after-gmpirt``: the defaults with gmp-IRT as the estimator (the default until the margin
  estimator was measured; runs/demo-after-4-merges were made so);
* ``margin``: the defaults with the margin estimator named (the default since);
* ``after-8-merges``: the same with 8 calibration merges (the default until 4 were measured as good);
* ``after-250``: the defaults with 250 sampled items per calibration merge, the design that keeps
  the estimate-check error at 20-100 items (docs/estimate.md, "Over seeds");
* ``full-calibration``: every calibration model on every item, the space's IRT dims, the race;
* ``reuse``: the defaults, run after ``after`` on the same zoo: the item bank's
  parameters and subsets, the endpoints scored on the subsets only;
* ``sample-600``: the defaults with every benchmark entry at ``sample: 600`` (a first study
  of a large benchmark on a seeded random 600 of its items); its exported merge is then also
  scored on every item of the whole benchmarks, the figure the other designs' final table gives.

    python tools/bench_cost.py --zoo-seed 0 --designs before,after,reuse --out runs/bench-cost
    python tools/bench_cost.py --space SPACE --designs before,after --optimizer-seeds 1,2 --out runs/bench-cost
    python tools/bench_cost.py --zoo runs/zoo-5000 --designs before,after,reuse --out runs/bench-cost-5000
    python tools/bench_cost.py --top-error-of runs/demo-after,runs/demo-before --top-error 8

``--top-error K`` then scores each run's K best-estimated trials on every item
(`evomerge validate --top K --all-items`, after the run's costs are read, so they
do not count) and reports the mean |estimated - measured| of their fitness: the
estimator's error on the trials a search ends with, which random held-out merges
(`estimate-check`) do not show. ``--top-error-of`` does only that, for runs made
already.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.demo import moved_to_zoo  # noqa: E402
from evomerge.evaluation import benchmarks_for, evaluate_models  # noqa: E402
from evomerge.search.costs import PHASES, SEARCH_OVERHEAD, study_costs  # noqa: E402
from evomerge.search.records import StudyKey, complete_trials  # noqa: E402
from evomerge.search.runs import open_existing_study  # noqa: E402
from evomerge.search.validate import validate_top_trials  # noqa: E402

DESIGNS = {  # design -> (estimator keys, demo --validate-items, each benchmark entry's sample: or None)
    "before": ({"calibration_items": "all", "item_params": "fit", "dims": 2, "method": "gmpirt"}, "all", None),
    "after": ({"item_params": "fit"}, None, None),
    "after-gmpirt": ({"item_params": "fit", "method": "gmpirt"}, None, None),
    "margin": ({"item_params": "fit", "method": "margin"}, None, None),
    "after-8-merges": ({"item_params": "fit", "calibration_merges": 8}, None, None),
    "after-250": ({"item_params": "fit", "calibration_items": 250}, None, None),
    "full-calibration": ({"calibration_items": "all", "item_params": "fit"}, None, None),
    "reuse": ({}, None, None),
    "sample-600": ({"item_params": "fit"}, None, 600),
}


def space_variant(space: Path, design: str, out: Path, optimizer_seed: int | None = None,
                  zoo: str | None = None) -> Path:
    raw = yaml.safe_load(space.read_text())
    estimator, _, sample = DESIGNS[design]
    raw["name"] = f"{raw.get('name', space.stem)}-{design}"
    if zoo is not None:
        raw = moved_to_zoo(raw, "runs/zoo", zoo)  # e.g. a 5,000-item build
        raw["name"] += f"-{Path(zoo).name}"
    if optimizer_seed is not None:  # another search of the same zoo: the optimizer's and calibration merges' seed
        raw["optimizer"] = {**(raw.get("optimizer") or {}), "seed": optimizer_seed}
        raw["name"] += f"-opt{optimizer_seed}"
    raw["estimator"] = {**(raw.get("estimator") or {}), **estimator}
    if sample is not None:
        raw["benchmarks"] = [{**entry, "sample": sample} for entry in raw["benchmarks"]]
    path = out / f"{raw['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(space: Path, design: str, zoo_seed: int, trials: int | None, out: Path,
        optimizer_seed: int | None = None, zoo: str | None = None) -> dict:
    variant = space_variant(space, design, out, optimizer_seed, zoo)
    name = yaml.safe_load(variant.read_text())["name"] + (f"-seed{zoo_seed}" if zoo_seed else "")
    command = [sys.executable, "-m", "evomerge.cli", "demo", "--space", str(variant), "--no-progress",
               "--zoo-seed", str(zoo_seed)]
    _, validate_items, sample = DESIGNS[design]
    if validate_items:
        command += ["--validate-items", validate_items]
    if trials:
        command += ["--trials", str(trials)]
    started_at = datetime.datetime.now()
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    study = open_existing_study(ROOT / "runs" / name)
    first = min(t.datetime_complete for t in complete_trials(study))
    costs = {phase: cost.to_dict() for phase, cost in study_costs(study).items()}
    table = study.user_attrs.get(StudyKey.FINAL_TABLE, {})
    evolved = table.get("evolved (exported)", {})
    on_sample = evolved if sample is not None else None
    if sample is not None:  # the final table measured the sample: measure the export on every item too
        whole = benchmarks_for(None, str(variant), whole=True)
        evolved = evaluate_models({"evolved": ROOT / "runs" / name / "best"}, whole)["evolved"]
    load = os.getloadavg()
    return {"design": design, "run": name, "zoo_seed": zoo_seed, "optimizer_seed": optimizer_seed, "wall_s": round(wall, 1),
            "first_trial_s": round((first - started_at).total_seconds(), 1), "costs": costs,
            "evolved": evolved, "evolved_mean": sum(evolved.values()) / len(evolved) if evolved else None,
            "evolved_on_sample": on_sample,
            "load_after": [round(v, 2) for v in load]}


def top_error(run_dir: Path, top: int) -> dict:
    """Mean |estimated - measured| fitness of the run's ``top`` best-estimated trials, each scored on every item."""
    rows = [r for r in validate_top_trials(run_dir, top, progress=False, items=None) if r.exact]
    errors = [abs(r.estimated_mean - r.measured_mean) for r in rows]
    return {"top_error": round(sum(errors) / len(errors), 4) if errors else None, "top_error_trials": len(errors),
            "top_overrated": round(sum(r.estimated_mean - r.measured_mean for r in rows) / len(rows), 4) if rows else None}


def markdown(rows: list[dict]) -> str:
    phases = [p for p in PHASES if any(p in row["costs"] for row in rows)]  # a demo space collects no statistics
    head = ["design", "zoo seed", "optimizer seed", *(f"{p} items / s" for p in phases), "cal.+val. / trials (items)",
            "first trial (s)", "wall (s)", "exported merge (mean acc.)"]
    with_top = any(row.get("top_error") is not None for row in rows)
    if with_top:
        head += ["top-K error (overrated)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        costs = row["costs"]
        cells = [row["design"], str(row["zoo_seed"]), str(row.get("optimizer_seed") or 0)]
        for phase in phases:
            cost = costs.get(phase)
            cells.append(f"{cost['items']:,} / {cost['seconds']:.0f}" if cost else "-")
        trials = costs.get("trials", {}).get("items") or 0
        overhead = sum(costs.get(p, {}).get("items", 0) for p in SEARCH_OVERHEAD)
        cells += [f"{overhead / trials:.2f}x" if trials else "-", str(row["first_trial_s"]), str(row["wall_s"]),
                  f"{row['evolved_mean']:.3f}" if row["evolved_mean"] is not None else "-"]
        if with_top:
            cells.append(f"{row['top_error']:.3f} ({row['top_overrated']:+.3f}), {row['top_error_trials']} trials"
                         if row.get("top_error") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="search_spaces/demo.yaml")
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--designs", default="before,after,reuse")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--optimizer-seeds", default=None,
                        help="comma-separated optimizer seeds: one search per seed and design (default: the space's)")
    parser.add_argument("--zoo", help="a zoo folder replacing the space's runs/zoo (e.g. runs/zoo-5000 from "
                                      "`evomerge make-zoo --out runs/zoo-5000 --bench-items 5000`)")
    parser.add_argument("--top-error", type=int, default=0, metavar="K",
                        help="score each run's K best-estimated trials on every item and report the estimate's error")
    parser.add_argument("--top-error-of", default=None, metavar="RUNS",
                        help="comma-separated run folders made already: only their top-K error (with --top-error K)")
    parser.add_argument("--out", default="runs/bench-cost")
    args = parser.parse_args()
    os.chdir(ROOT)  # the runs' spaces name their models relative to the repository
    if args.top_error_of:
        for run_dir in args.top_error_of.split(","):
            print(json.dumps({"run": run_dir, **top_error(Path(run_dir), args.top_error or 8)}), flush=True)
        return 0
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    seeds = [None] if args.optimizer_seeds is None else [int(s) for s in args.optimizer_seeds.split(",")]
    for seed in seeds:
        for design in args.designs.split(","):
            row = run(ROOT / args.space, design, args.zoo_seed, args.trials, out, seed, args.zoo)
            if args.top_error:
                row.update(top_error(ROOT / "runs" / row["run"], args.top_error))
            rows.append(row)
            with open(out / "results.jsonl", "a") as results:
                results.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
