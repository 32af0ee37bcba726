"""Data-flow-space merges on the zoo: DFS and PS+DFS against their sources and PS alone, on every item.

Three searches, as a user would run them (`docs/search.md`), with the shipped spaces
pointed at ``--zoo`` and their own budgets (``--trials`` overrides all three):

1. PS: `search_spaces/demo.yaml`, its 5 best-estimated trials validated on every
   item and the best measured one exported, as `evomerge demo` does
   (``--ps-run runs/demo`` takes a finished demo run instead);
2. DFS: `search_spaces/dfs_demo.yaml` (a path through two experts' layers);
3. PS+DFS: `search_spaces/ps_dfs_demo.yaml`, its `ps` source the run of step 1.

Each DFS run exports like `evomerge export RUN --validate-top 5`. Then, per DFS
space, every model is scored on every item of that space's benchmarks: its
sources, PS alone (step 1's export) and the DFS export (what `evomerge eval
EXPORT --space RUN` prints). The same by hand:

    evomerge demo
    evomerge search search_spaces/dfs_demo.yaml && evomerge export runs/dfs_demo --validate-top 5 --out runs/dfs_demo/best
    evomerge eval runs/dfs_demo/best runs/zoo/experts/lang runs/zoo/experts/arith runs/demo/best --space runs/dfs_demo
    (the same with ps_dfs_demo)

    python tools/bench_dfs.py --zoo runs/zoo --out runs/bench-dfs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.evaluation import evaluate_models  # noqa: E402
from evomerge.search.run import MergeSearch  # noqa: E402
from evomerge.search.runs import open_existing_study  # noqa: E402
from evomerge.search.space import load_search_space  # noqa: E402
from evomerge.search.records import complete_trials  # noqa: E402
from evomerge.search.validate import validate_top_trials  # noqa: E402
from evomerge.trial_export import export_trial  # noqa: E402

VALIDATE_TOP = 5


def quiet_libraries() -> None:
    import optuna
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def shipped_space(name: str, zoo: Path, ps_run: Path | None, trials: int | None) -> dict:
    """A shipped space with its `runs/zoo` paths on ``zoo`` and its `runs/demo` source on ``ps_run``."""
    raw = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())

    def moved(path: str) -> str:
        return str(zoo / Path(path).relative_to("runs/zoo")) if str(path).startswith("runs/zoo") else path

    raw.pop("zoo", None)
    raw["models"]["base"] = moved(raw["models"]["base"])
    raw["models"]["experts"] = {k: moved(v) for k, v in raw["models"]["experts"].items()}
    for entry in raw["benchmarks"]:
        entry["path"] = moved(entry["path"])
    for source in (raw.get("dfs") or {}).get("sources", []):
        if isinstance(source, dict) and source.get("source") == "runs/demo":
            source["source"] = str(ps_run)
    if trials:
        raw["optimizer"]["trials"] = trials
    raw["device"] = "cpu"
    return raw


def search_and_export(raw: dict, run_dir: Path) -> dict:
    """Search ``raw`` into ``run_dir`` to its budget, export the best of the top validated trials."""
    run_dir.mkdir(parents=True, exist_ok=True)
    space_file = run_dir.parent / f"{run_dir.name}.yaml"
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    space = load_search_space(space_file)
    search = MergeSearch(space, run_dir, progress=False)
    started = time.perf_counter()
    study, _ = search.run()
    search_s = time.perf_counter() - started
    rows = validate_top_trials(run_dir, VALIDATE_TOP, progress=False, builder=search.builder)
    chosen = rows[0].number  # the best measured of the top estimated, as `export --validate-top` picks
    exported = export_trial(run_dir, trial_number=chosen, out_dir=run_dir / "best", progress=False,
                            builder=search.builder, force=True)
    study = open_existing_study(run_dir)
    trial = next(t for t in complete_trials(study) if t.number == chosen)
    return {"space": space, "search": search, "export": exported, "search_s": search_s,
            "trials": len(complete_trials(study)), "trial": trial, "validated": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="runs/zoo")
    parser.add_argument("--out", default="runs/bench-dfs")
    parser.add_argument("--ps-run", help="a finished, validated parameter-space demo run to use (default: run it)")
    parser.add_argument("--trials", type=int, help="budget of every search (default: each space's own)")
    parser.add_argument("--spaces", default="dfs_demo,ps_dfs_demo", help="which DFS spaces (comma-separated)")
    args = parser.parse_args(argv)
    quiet_libraries()
    zoo, out = Path(args.zoo).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.ps_run:
        ps_run = Path(args.ps_run).resolve()
        ps_export = ps_run / "best"
        ps = None
    else:
        ps_run = out / "demo"
        ps = search_and_export(shipped_space("demo", zoo, None, args.trials), ps_run)
        ps_export = ps["export"]
    print(f"PS run {ps_run}: export {ps_export}", file=sys.stderr, flush=True)

    report, text = {"zoo": str(zoo), "ps_run": str(ps_run), "ps_export": str(ps_export), "spaces": {}}, []
    if ps is not None:
        report["ps"] = {"trials": ps["trials"], "search_s": round(ps["search_s"], 1), "trial": ps["trial"].number}
    for name in args.spaces.split(","):
        print(f"{name}: searching", file=sys.stderr, flush=True)
        done = search_and_export(shipped_space(name, zoo, ps_run, args.trials), out / name)
        space, search = done["space"], done["search"]
        models = {}
        for source in space.dfs.sources:
            label = f"source {source.name}" + (f" (= PS alone, trial {source.trial} of {Path(source.run).name})"
                                               if source.run else "")
            models[label] = ps_export if source.run else Path(source.path)
        if not any(source.run for source in space.dfs.sources):
            models["PS alone (demo export)"] = ps_export
        models["DFS export"] = done["export"]
        print(f"{name}: scoring {len(models)} models on every item", file=sys.stderr, flush=True)
        results = evaluate_models(models, search.benchmarks)
        weights = {b.name: b.weight for b in space.benchmarks}
        tasks = list(weights)

        def mean(scores):
            return sum(weights[t] * scores[t] for t in tasks) / sum(weights.values())

        trial = done["trial"]
        estimated = trial.user_attrs.get("estimates", {}) if trial is not None else {}
        report["spaces"][name] = {
            "trials": done["trials"], "search_s": round(done["search_s"], 1),
            "exported_trial": trial.number if trial is not None else None,
            "path": trial.user_attrs.get("path_text") if trial is not None else None,
            "estimated": estimated, "results": results, "means": {m: mean(s) for m, s in results.items()},
        }
        lines = [f"### {name} ({done['trials']} trials, search with calibration {done['search_s']:.0f} s; exported trial "
                 f"{report['spaces'][name]['exported_trial']}: `{report['spaces'][name]['path']}`)", "",
                 "| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        for model, scores in results.items():
            cells = [f"{scores[t]:.3f}" for t in tasks] + [f"{mean(scores):.3f}"]
            if model == "DFS export":
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        text.append("\n".join(lines))
        del search, done
    (out / "bench_dfs.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench_dfs.md").write_text("\n\n".join(text) + "\n")
    print("\n\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
