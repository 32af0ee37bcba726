"""Merges that learn from data against hand-set and black-box evolved ones, every model scored on every item.

For one family (a search space: the demo zoo by default), each of these is merged and scored on
all items of the space's benchmarks, raw and normalized (the share of each expert's gain over the
base kept, as `evomerge demo` prints it), with the wall time of what it took:

* base, each expert; uniform task arithmetic (weight 0.5 and 1.0), TIES (1.0, density 0.5): hand-set;
* Fisher merging and RegMean (uniform weights, their defaults), from statistics of each expert on
  its own task's unlabelled prompts (the benchmarks' `data:` sources);
* AdaMerging, task-wise (one weight per expert) and layer-wise (one per expert and layer), learned
  on the entropy of the merged model's answers to unlabelled prompts;
* the black-box evolved merge: the space searched as shipped, its top 5 validated, the best exported
  (as `evomerge demo` does);
* the seeded evolved merges, each with the same budget of scored trials at the space's granularity:
  task arithmetic starting at the learned coefficients (`optimizer: {init: learned}`), with the
  learned genome it starts from; and RegMean with its expert weights and alpha searched, starting at
  RegMean's own defaults (`optimizer: {init: defaults}`);
* the space's method and RegMean as a method gene (`method: [ties, regmean]`, TPE, the same budget):
  both methods' uniform merges and RegMean's defaults are its baselines, so the search starts from
  the better of the two families on this one.

    python tools/bench_datamerge.py --space search_spaces/demo.yaml --zoo runs/zoo --out runs/bench-datamerge
    python tools/bench_datamerge.py --space search_spaces/smol_demo.yaml --out runs/bench-datamerge-smol

`--arms` runs some of them only, adding their rows to the report already in ``--out`` (the endpoints'
rows come from there when they are not re-run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.demo import moved_to_zoo, normalized_accuracy  # noqa: E402
from evomerge.evaluation import evaluate_models  # noqa: E402
from evomerge.merge import Recipe  # noqa: E402
from evomerge.search.data_statistics import collect_statistics  # noqa: E402
from evomerge.search.learning import CoefficientLearner  # noqa: E402
from evomerge.search.records import StudyKey  # noqa: E402
from evomerge.search.run import MergeSearch, learned_label  # noqa: E402
from evomerge.search.runs import open_existing_study  # noqa: E402
from evomerge.search.space import load_search_space  # noqa: E402
from evomerge.search.validate import validate_top_trials  # noqa: E402
from evomerge.trial_export import export_trial  # noqa: E402
from evomerge.zoo import ensure_zoo, zoo_is_complete  # noqa: E402

HAND_SET = {
    "task_arithmetic (uniform 0.5)": {"method": "task_arithmetic", "params": {"weight": 0.5}},
    "task_arithmetic (uniform 1.0)": {"method": "task_arithmetic", "params": {"weight": 1.0}},
    "ties (1.0, density 0.5)": {"method": "ties", "params": {"weight": 1.0, "density": 0.5}},
}
VALIDATE_TOP = 5
ARMS = ("endpoints", "hand-set", "fisher", "regmean", "adamerging", "blackbox", "seeded-learned", "seeded-regmean",
        "methods-regmean")
GRANULARITY_KEYS = ("granularity", "layer_groups", "split_modules")  # how finely a space's merge is searched
REGMEAN_SEARCH = {"weight": [0.0, 1.5], "alpha": [0.5, 1.0]}  # around RegMean's defaults (1.0, 0.9)


def quiet_libraries() -> None:
    import optuna
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def load_raw(space: Path, zoo: Path | None, zoo_seed: int, trials: int | None) -> dict:
    """The space with its `runs/zoo` paths moved onto ``zoo`` (built for ``zoo_seed`` when missing)."""
    raw = yaml.safe_load(space.read_text())
    if zoo is not None:
        if not zoo_is_complete(zoo):  # a finished zoo of any profile is used as it is
            ensure_zoo(zoo, seed=zoo_seed, progress=False)
        raw = moved_to_zoo(raw, "runs/zoo", str(zoo))
        raw.pop("zoo", None)
    if trials:
        raw["optimizer"]["trials"] = trials
    raw["device"] = "cpu"
    return raw


def variant(raw: dict, out: Path, name: str, **merge) -> Path:
    """``raw`` with its merge section replaced (method, granularity ...), written as ``out/name.yaml``."""
    changed = copy.deepcopy(raw)
    changed["name"] = name
    changed["merge"] = {**{k: v for k, v in raw["merge"].items() if k in GRANULARITY_KEYS}, **merge}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    return path


def searched(raw: dict, out: Path, name: str) -> tuple[dict, MergeSearch, float]:
    """Search ``raw`` to its budget, validate the top trials, export the best measured one."""
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": name}, sort_keys=False))
    search = MergeSearch(load_search_space(path), out / name, progress=False)
    started = time.perf_counter()
    search.run()
    rows = validate_top_trials(out / name, VALIDATE_TOP, progress=False, builder=search.builder)
    seconds = time.perf_counter() - started
    exported = export_trial(out / name, trial_number=rows[0].number, out_dir=out / name / "best", progress=False,
                            builder=search.builder, force=True)
    return {"export": exported, "trial": rows[0].number}, search, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/demo.yaml")
    parser.add_argument("--zoo", help="zoo folder standing for the space's runs/zoo (built when missing)")
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-datamerge")
    parser.add_argument("--trials", type=int, help="budget of both searches (default: the space's)")
    parser.add_argument("--steps", type=int, help="AdaMerging steps (default: the space's learn.steps)")
    parser.add_argument("--optimizer-seed", type=int,
                        help="every search's optimizer.seed (default: the space's); a search's spread between "
                             "seeds is the yardstick for a difference between arms")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)} (default: all)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := sorted(set(arms) - set(ARMS)):
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    quiet_libraries()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = load_raw(Path(args.space), Path(args.zoo).resolve() if args.zoo else None, args.zoo_seed, args.trials)
    if args.steps:
        raw.setdefault("learn", {})["steps"] = args.steps
    if args.optimizer_seed is not None:
        raw.setdefault("optimizer", {})["seed"] = args.optimizer_seed
    experts = list(raw["models"]["experts"])
    n = len(experts)
    previous = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    results: dict[str, dict] = {} if set(arms) == set(ARMS) else previous.get("results", {})
    seconds: dict[str, dict] = {} if set(arms) == set(ARMS) else previous.get("seconds", {})

    # hand-set merges and the endpoints, in one task-arithmetic builder
    ta = MergeSearch(load_search_space(variant(raw, out, "ta", method="task_arithmetic",
                                               params={"weight": [0.0, 1.5]})), out / "ta", progress=False)
    benchmarks, tokenizer = ta.benchmarks, ta.tokenizer
    if "endpoints" in arms or "base" not in results:
        results.update(evaluate_models({"base": raw["models"]["base"],
                                        **{f"expert {e}": p for e, p in raw["models"]["experts"].items()}}, benchmarks,
                                       base=raw["models"]["base"]))  # LoRA experts merge into the space's base
    for label, recipe in HAND_SET.items() if "hand-set" in arms else ():
        ta.builder.core.merge_into(ta.builder.model, Recipe.from_dict(recipe), seed=0)
        results.update(evaluate_models({label: (ta.builder.model, tokenizer)}, benchmarks))
    print("hand-set merges scored", file=sys.stderr, flush=True)

    # data-informed methods: statistics, then the merge with their defaults
    for method, params in (("fisher", {"weight": [1.0] * n}), ("regmean", {"weight": [1.0] * n, "alpha": 0.9})):
        if method not in arms:
            continue
        search = MergeSearch(load_search_space(variant(raw, out, method, method=method, granularity="global")),
                             out / method, progress=False)
        started = time.perf_counter()
        collect_statistics(search.space, out / method, search.builder, search.unlabelled(), progress=False)
        seconds[method] = {"statistics_s": round(time.perf_counter() - started, 1)}
        search.builder.core.merge_into(search.builder.model, Recipe(method, params), seed=0)
        results.update(evaluate_models({f"{method} (uniform)": (search.builder.model, tokenizer)}, benchmarks))
        print(f"{method} scored", file=sys.stderr, flush=True)

    # AdaMerging, task-wise and layer-wise
    for granularity in ("global", "layer") if "adamerging" in arms else ():
        search = MergeSearch(load_search_space(variant(raw, out, f"adamerging-{granularity}", method="task_arithmetic",
                                                       granularity=granularity, split_modules=False,
                                                       params={"weight": [0.0, 1.5]})),
                             out / f"adamerging-{granularity}", progress=False)
        learner = CoefficientLearner(search.builder, search.unlabelled(), {b.name: b.weight for b in search.space.benchmarks},
                                     search.space.learn, seed=search.space.data.seed)
        result = learner.learn(progress=False)
        label = learned_label(search.space)
        seconds[label] = {"learning_s": round(result.seconds, 1), "loss_first": round(result.losses[0], 4),
                          "loss_last": round(result.losses[-1], 4)}
        recipe = search.builder.recipe(result.genome)
        search.builder.core.merge_into(search.builder.model, recipe, seed=0)
        results.update(evaluate_models({label: (search.builder.model, tokenizer)}, benchmarks))
        print(f"{label} scored", file=sys.stderr, flush=True)

    # black-box and seeded evolution, the same budget of scored trials
    kept = {k: v for k, v in raw["merge"].items() if k in GRANULARITY_KEYS}
    if "blackbox" in arms:
        blackbox, _, blackbox_s = searched(raw, out, "evolved-blackbox")
        results.update(evaluate_models({f"evolved, black-box ({raw['merge']['method']})": blackbox["export"]},
                                       benchmarks))
        seconds["evolved, black-box"] = {"search_and_validation_s": round(blackbox_s, 1),
                                         "trials": raw["optimizer"]["trials"]}
    if "seeded-learned" in arms:
        seeded_raw = copy.deepcopy(raw)
        seeded_raw["merge"] = {**kept, "method": "task_arithmetic", "params": {"weight": [0.0, 1.5]}}
        seeded_raw["optimizer"] = {**raw["optimizer"], "name": "cmaes", "init": "learned"}
        seeded, seeded_search, seeded_s = searched(seeded_raw, out, "evolved-seeded")
        study = open_existing_study(out / "evolved-seeded")
        learned = study.user_attrs[StudyKey.LEARNED]
        learned_name = learned_label(seeded_search.space)
        recipe = seeded_search.builder.recipe(learned[learned_name]["genome"])
        seeded_search.builder.core.merge_into(seeded_search.builder.model, recipe, seed=0)
        results.update(evaluate_models({f"{learned_name} (seed of the search)": (seeded_search.builder.model,
                                                                                 tokenizer)}, benchmarks))
        results.update(evaluate_models({"evolved, seeded (task_arithmetic from adamerging)": seeded["export"]},
                                       benchmarks))
        seconds["evolved, seeded"] = {"search_and_validation_s": round(seeded_s, 1),
                                      "trials": raw["optimizer"]["trials"],
                                      "learning_s": learned[learned_name]["seconds"]}
    if "seeded-regmean" in arms:
        regmean_raw = copy.deepcopy(raw)
        regmean_raw["merge"] = {**kept, "method": "regmean", "params": REGMEAN_SEARCH}
        regmean_raw["optimizer"] = {**raw["optimizer"], "name": "cmaes", "init": "defaults"}
        seeded, _, seeded_s = searched(regmean_raw, out, "evolved-seeded-regmean")
        results.update(evaluate_models({"evolved, seeded (regmean from its defaults)": seeded["export"]},
                                       benchmarks))
        seconds["evolved, seeded (regmean)"] = {"statistics_search_and_validation_s": round(seeded_s, 1),
                                                "trials": raw["optimizer"]["trials"]}
    if "methods-regmean" in arms:
        both_raw = copy.deepcopy(raw)
        own = raw["merge"]["method"]
        both_raw["merge"] = {**kept, "method": [own, "regmean"],
                             "params": {**raw["merge"].get("params", {}), **REGMEAN_SEARCH}}
        both_raw["optimizer"] = {**raw["optimizer"], "name": "tpe"}
        both, _, both_s = searched(both_raw, out, "evolved-methods-regmean")
        results.update(evaluate_models({f"evolved, {own} or regmean (method gene, TPE)": both["export"]},
                                       benchmarks))
        seconds[f"evolved, {own} or regmean"] = {"statistics_search_and_validation_s": round(both_s, 1),
                                                 "trials": raw["optimizer"]["trials"]}

    tasks = list(benchmarks)
    normalized = normalized_accuracy(results, [t for t in experts if t in tasks])
    lines = [f"| model | {' | '.join(tasks)} | mean | normalized mean |", "|---" * (len(tasks) + 3) + "|"]
    for name, scores in results.items():
        mean = sum(scores[t] for t in tasks) / len(tasks)
        norm = [normalized[name][t] for t in tasks if normalized[name][t] == normalized[name][t]]
        cells = [f"{scores[t]:.3f} ({normalized[name][t]:.2f})" for t in tasks]
        lines.append(f"| {name} | {' | '.join(cells)} | {mean:.3f} | {sum(norm) / len(norm):.2f} |")
    text = "\n".join(lines)
    print(text)
    print(json.dumps(seconds, indent=1))
    (out / "report.json").write_text(json.dumps({"space": args.space, "zoo": args.zoo, "zoo_seed": args.zoo_seed,
                                                 "optimizer_seed": raw["optimizer"].get("seed", 0),
                                                 "results": results, "normalized": normalized, "seconds": seconds},
                                                indent=1))
    (out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
