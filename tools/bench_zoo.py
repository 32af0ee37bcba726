#!/usr/bin/env python
"""Zoo mergeability: base, experts and hand-made merges of a zoo scored on every benchmark item.

For each zoo (built with `make-zoo` first, or here with --build SEED...), prints accuracy per task
and the share of each expert's gain over the base that each merge keeps on that expert's task
(normalized accuracy, FusionBench style: (merge - base) / (expert - base)).

    python tools/bench_zoo.py --zoo runs/zoo
    python tools/bench_zoo.py --build 0 1 2 --profile full --out runs/zoo-seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo import BASELINE_RECIPES  # noqa: E402


def zoo_benchmarks(zoo_dir: Path, limit: int | None = None) -> dict:
    """Every benchmark of the zoo, loaded with the entry options its manifest gives."""
    from evomerge.benchmarks import load_benchmark
    from evomerge.zoo import load_zoo_manifest

    manifest = load_zoo_manifest(zoo_dir)
    options = manifest.get("benchmarks", {})
    benches = {}
    for task, rel in manifest["bench"].items():
        bench = load_benchmark(zoo_dir / rel, name=task, **options.get(task, {}))
        if limit:
            bench = dataclasses.replace(bench, items=bench.items[:limit])
        benches[task] = bench
    return benches


def score_zoo(zoo_dir: Path, limit: int | None = None, recipes: dict | None = None) -> dict[str, dict[str, float]]:
    """name -> {task: accuracy} for the base, each expert and each of ``recipes`` (default: the demo's)."""
    import torch

    from evomerge.evaluation import evaluate_models
    from evomerge.merge import MergeCore, Recipe
    from evomerge.zoo import load_zoo_manifest

    manifest = load_zoo_manifest(zoo_dir)
    benches = zoo_benchmarks(zoo_dir, limit)
    models = {"base": zoo_dir / manifest["base"],
              **{f"expert {t}": zoo_dir / rel for t, rel in manifest["experts"].items()}}
    results = evaluate_models(models, benches)
    core = MergeCore(zoo_dir / manifest["base"], [zoo_dir / rel for rel in manifest["experts"].values()], device="cpu")
    model, tokenizer = core.new_model()
    for name, recipe in (BASELINE_RECIPES if recipes is None else recipes).items():
        with torch.no_grad():
            core.merge_into(model, Recipe.from_dict(recipe), seed=0)
        results.update(evaluate_models({name: (model, tokenizer)}, benches))
    return results


def kept_gain(results: dict, name: str, task: str) -> float:
    """Share of the expert's gain over the base that ``name`` keeps on ``task``."""
    base, expert = results["base"][task], results[f"expert {task}"][task]
    return (results[name][task] - base) / (expert - base) if expert > base else float("nan")


def print_results(zoo_dir: Path, results: dict) -> None:
    tasks = list(next(iter(results.values())))
    experts = [n[len("expert "):] for n in results if n.startswith("expert ")]
    print(f"\n{zoo_dir}")
    print("| model | " + " | ".join(tasks) + " | mean | kept gain (" + ", ".join(experts) + ") |")
    print("|---" * (len(tasks) + 3) + "|")
    for name, scores in results.items():
        kept = "" if name == "base" or name.startswith("expert ") else \
            " / ".join(f"{kept_gain(results, name, t):.2f}" for t in experts)
        mean = sum(scores.values()) / len(scores)
        print(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | {mean:.3f} | {kept} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", nargs="*", default=[], help="existing zoo folders")
    parser.add_argument("--build", nargs="*", type=int, default=[], help="seeds to build (into --out/seed-N)")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--out", default="runs/zoo-seeds")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items per task")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)
    from evomerge.zoo import ensure_zoo, load_zoo_manifest

    zoos = [Path(z) for z in args.zoo]
    for seed in args.build:
        started = time.time()
        zoos.append(ensure_zoo(Path(args.out) / f"{args.profile}-seed-{seed}", seed=seed, profile=args.profile,
                               progress=False))
        print(f"seed {seed}: zoo ready in {time.time() - started:.0f} s "
              f"(build {load_zoo_manifest(zoos[-1])['build_seconds']} s)", flush=True)
    everything = {}
    for zoo_dir in zoos:
        started = time.time()
        results = score_zoo(zoo_dir, args.limit)
        print_results(zoo_dir, results)
        print(f"scored in {time.time() - started:.0f} s", flush=True)
        everything[str(zoo_dir)] = results
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
