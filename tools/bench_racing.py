"""Racing vs fixed subsets on the zoo: the exported merge's measured accuracy for the items spent.

Per seed, the demo space (`search_spaces/demo.yaml`, pointed at `--zoo`, optimizer
seed = the seed) is searched three ways with the same budget of scored items (the
fixed-40 search's: `--trials` x 40 items x benchmarks):

* `fixed20`, `fixed40`: every candidate on 20 / 40 anchor items per benchmark;
* `race`: `evaluation: {stages: --stages, top_k: --top-k, level: --level}`.

Searches stop at the trial that would exceed the budget. At 50% and 100% of it,
the trial `evomerge export` would pick among the trials run so far is scored on
every item: its measured accuracy, the winner's-curse gap (its estimate minus
that measurement), the items and the search wall time (sum of trial durations,
calibration excluded; it is shared: every search of a seed starts from the same
calibration responses) are reported, per seed and as means over seeds.

    python tools/bench_racing.py --zoo runs/zoo --seeds 0,1,2 --out runs/bench-racing
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.benchmarks import score_items  # noqa: E402
from evomerge.estimate import responses_path  # noqa: E402
from evomerge.search.records import Ranking, trial_items  # noqa: E402
from evomerge.search.run import MergeSearch  # noqa: E402
from evomerge.search.space import parse_search_space  # noqa: E402

FRACTIONS = (0.5, 1.0)


def quiet_libraries() -> None:
    import optuna
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def demo_space(zoo: Path, name: str, seed: int, evaluation: dict) -> dict:
    """The demo space on ``zoo``, with this seed and this way of scoring candidates."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())

    def moved(path: str) -> str:
        return str(zoo / Path(path).relative_to("runs/zoo")) if path.startswith("runs/zoo") else path

    raw["name"], raw["zoo"] = name, str(zoo)
    raw["models"]["base"] = moved(raw["models"]["base"])
    raw["models"]["experts"] = {k: moved(v) for k, v in raw["models"]["experts"].items()}
    for entry in raw["benchmarks"]:
        entry["path"] = moved(entry["path"])
    raw["optimizer"]["seed"] = seed
    raw["device"] = "cpu"
    raw["estimator"].pop("subset_size", None)
    if "stages" in evaluation and len(evaluation["stages"]) == 1:
        raw["estimator"]["subset_size"] = evaluation["stages"][0]
    else:
        raw["evaluation"] = evaluation
    return raw


def run_until(search: MergeSearch, budget_items: int, chunk: int) -> None:
    """Search in chunks of trials until the study has scored ``budget_items`` items."""
    n_trials = 0
    while True:
        n_trials += chunk
        study, _ = search.run(n_trials)  # continues the run folder's study
        if sum(trial_items(t) for t in complete(study)) >= budget_items:
            return


def complete(study) -> list:
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def within_budget(trials: list, budget_items: float) -> list:
    """The trials a search stopped at ``budget_items`` would have run (in order, cumulative items)."""
    kept, spent = [], 0
    for trial in trials:
        spent += trial_items(trial)
        if spent > budget_items:
            break
        kept.append(trial)
    return kept


def measure(search: MergeSearch, trial, cache: dict) -> dict[str, float]:
    """Accuracy of the trial's model on every item of every benchmark (cached by trial number)."""
    key = str(trial.number)
    if key not in cache:
        model = search.builder.rebuild(trial.user_attrs)
        cache[key] = {name: float(np.mean(score_items(model, search.tokenizer, bench, batch_size=search.batch_size)))
                      for name, bench in search.benchmarks.items()}
    return cache[key]


def bench_one(zoo: Path, out: Path, seed: int, name: str, evaluation: dict, budget_items: int, chunk: int,
              calibrated: Path | None) -> list[dict]:
    raw = demo_space(zoo, name, seed, evaluation)
    run_dir = out / f"seed{seed}" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "space.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    space = parse_search_space(raw, source=str(run_dir / "space.yaml"))
    if calibrated is not None and not (run_dir / "responses").exists():
        shutil.copytree(calibrated / "responses", run_dir / "responses")  # same seed: same calibration models
    search = MergeSearch(space, run_dir, progress=False)
    study_done = (run_dir / "done").exists()
    if not study_done:
        run_until(search, budget_items, chunk)
        (run_dir / "done").write_text("")
    else:
        search.prepare()
    from evomerge.search.runs import open_existing_study

    trials = complete(open_existing_study(run_dir))
    ranking = Ranking.of(space)
    cache_path = run_dir / "measured.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    for fraction in FRACTIONS:
        ran = within_budget(trials, fraction * budget_items)
        ranked = sorted(ran, key=lambda t: -ranking.fitness(t.values))
        chosen = ranking.preferred(ranked).trial
        measured = measure(search, chosen, cache)
        cache_path.write_text(json.dumps(cache))
        measured_fitness = ranking.fitness([measured[b.name] for b in space.benchmarks])
        estimated = ranking.fitness(chosen.values)
        rows.append({
            "seed": seed, "config": name, "fraction": fraction, "trials": len(ran),
            "items": int(sum(trial_items(t) for t in ran)),
            "wall_s": float(sum((t.datetime_complete - t.datetime_start).total_seconds() for t in ran)),
            "chosen": chosen.number, "chosen_items": trial_items(chosen), "estimated": estimated,
            "measured": measured_fitness, "gap": estimated - measured_fitness, "measured_per_task": measured,
        })
    return rows


def summary_markdown(rows: list[dict], budget_items: int) -> str:
    lines = ["| search | budget | trials | items scored | wall time (s) | measured accuracy of the export | "
             "estimate - measured |", "|---|---|---|---|---|---|---|"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for fraction in FRACTIONS:
        for config in configs:
            group = [r for r in rows if r["config"] == config and r["fraction"] == fraction]

            def cell(key, fmt):
                values = np.array([r[key] for r in group], dtype=float)
                return f"{values.mean():{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"

            lines.append(f"| {config} | {fraction:.0%} of {budget_items} | {cell('trials', '.0f')} | "
                         f"{cell('items', '.0f')} | {cell('wall_s', '.0f')} | {cell('measured', '.3f')} | "
                         f"{cell('gap', '+.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="runs/zoo")
    parser.add_argument("--out", default="runs/bench-racing")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=80, help="fixed-40 trials that set the item budget")
    parser.add_argument("--stages", default="10,30,100", help="racing stages (items per benchmark; last may be all)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--level", type=float, default=0.9, help="racing: level of the intervals that decide promotion")
    parser.add_argument("--configs", default="fixed20,fixed40,race")
    parser.add_argument("--chunk", type=int, default=20, help="trials per search call while filling the budget")
    args = parser.parse_args(argv)
    quiet_libraries()
    zoo, out = Path(args.zoo).resolve(), Path(args.out)
    stages = [s if s == "all" else int(s) for s in args.stages.split(",")]
    configs = {"fixed20": {"stages": [20]}, "fixed40": {"stages": [40]},
               "race": {"stages": stages, "top_k": args.top_k, "level": args.level}}
    n_bench = len(yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())["benchmarks"])
    budget_items = args.trials * 40 * n_bench
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        calibrated = None
        for name in args.configs.split(","):
            print(f"seed {seed}: {name}", file=sys.stderr, flush=True)
            rows += bench_one(zoo, out, seed, name, configs[name], budget_items, args.chunk, calibrated)
            if calibrated is None and responses_path(out / f"seed{seed}" / name, "x").parent.exists():
                calibrated = out / f"seed{seed}" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_racing.json").write_text(json.dumps(rows, indent=1))
    text = summary_markdown(rows, budget_items)
    (out / "bench_racing.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
