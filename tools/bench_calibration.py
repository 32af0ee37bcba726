"""The estimator error each calibration design buys, averaged over seeds (issue 26).

One `estimate-check` run scores its models once; this refits its cached answers
as each calibration design would (``evomerge.estimate.check.fit_design``) under
several seeds -- the seed picks the subset, each calibration merge's sample and
the cross-validation folds, so one seed's error is one draw of a subset and can
flatter or wrong a design by more than the designs differ -- and prints gmp-IRT's
(``--methods``: each named estimator's) mean absolute error on the check's held-out merges, per design and subset size,
averaged over the seeds and the benchmarks, with the answers each design needs
per benchmark.

``--sample N`` refits as a study of a benchmark entry with ``sample: N`` calibrates
(the same seeded N items `Benchmark.sampled` draws) and measures the error against
each held-out merge's accuracy on **every** item: the estimator's own error and
the sample's together.

Designs: ``all:N`` (N calibration merges on every item), ``NxM`` (N merges on the
subset's items and M random others each), ``endpoints`` (no merge), ``NxM+refit``
(NxM, then the check's other held-out merges refitted in with their answers on the
subset only, as a search's trials would be if calibration refitted as they arrive:
the held-out merges in four folds, each predicted by a fit holding the other three). The merges
are the check's first N extra models, so its run needs ``--n-extra`` >= the
largest N:

    evomerge estimate-check --zoo runs/zoo --out runs/ec-demo0 --n-heldout 20 --n-extra 8 --sizes 10,20,40,100 --n-timing 0
    python tools/bench_calibration.py --checks runs/ec-demo0,runs/ec-demo1 --designs all:8,4x60,4x120 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.benchmarks.items import sample_indices  # noqa: E402
from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.estimate import ResponseMatrix  # noqa: E402
from evomerge.estimate import METHODS  # noqa: E402
from evomerge.estimate.check import fit_design  # noqa: E402

DEFAULT_METHOD = "gmpirt"


REFIT_FOLDS = 4
"""``NxM+refit``: the held-out merges in this many folds, each predicted with the others refitted in as trials."""


def parse_design(text: str) -> tuple[int, int | None, bool]:
    """(calibration merges, items beyond the subset each (None: every item), whether trials are refitted in)."""
    if text == "endpoints":
        return 0, None, False
    if text.startswith("all:") and text[4:].isdigit():
        return int(text[4:]), None, False
    sampled, _, refit = text.partition("+")
    merges, _, items = sampled.partition("x")
    if not (merges.isdigit() and items.isdigit()) or refit not in ("", "refit"):
        raise EvomergeError(f"design {text!r}: use all:N, NxM, NxM+refit or endpoints")
    return int(merges), int(items), bool(refit)


def check_facts(check: Path) -> dict:
    path = check / "estimate_check.json"
    if not path.exists():
        raise EvomergeError(f"{check} has no estimate_check.json (run `evomerge estimate-check --out {check}` first)")
    return json.loads(path.read_text())["facts"]


def sampled_items(matrix: ResponseMatrix, n: int | None, seed: int = 0) -> ResponseMatrix:
    """The matrix on the items a benchmark entry's ``sample: {n, seed}`` scores (`Benchmark.sampled`)."""
    if n is None or n >= matrix.n_items:
        return matrix
    keep = sample_indices(matrix.n_items, n, seed)
    return ResponseMatrix(matrix.correct[:, keep], matrix.model_names, [matrix.item_ids[i] for i in keep],
                          matrix.benchmark, None if matrix.observed is None else matrix.observed[:, keep],
                          None if matrix.margins is None else matrix.margins[:, keep])


def design_errors(matrix: ResponseMatrix, endpoints: list[str], extras: list[str], heldout: dict[str, float],
                  design: str, size: int, seed: int, strategy: str, dims: int,
                  methods: tuple[str, ...] = (DEFAULT_METHOD,)) -> tuple[dict[str, float], int]:
    """Each method's (gmp-IRT's) mean absolute error on the held-out models (``heldout``: name -> accuracy on every item of the
    whole benchmark), calibrated and estimated on ``matrix`` (the benchmark, or its sample); and the answers
    the design needed."""
    merges, items, refit = parse_design(design)
    if merges > len(extras):
        raise EvomergeError(f"design {design} needs {merges} extra models; {matrix.benchmark} has {len(extras)}")
    names = list(heldout)
    # refit: each fold of held-out merges predicted by a fit that also has the other folds' subset answers
    folds = np.array_split(np.arange(len(names)), REFIT_FOLDS) if refit else [np.arange(len(names))]
    errors = {method: [] for method in methods}
    for fold in folds:
        trials = [n for i, n in enumerate(names) if refit and i not in fold]
        estimator, answers = fit_design(matrix, endpoints + extras[:merges], endpoints, [size], strategy, seed,
                                        dims, items, None, trial_names=trials)
        indices = estimator.stage_indices(0)
        for i in fold:
            found = estimator.predict_all(matrix.row(names[i])[indices], methods, stage=0,
                                          subset_margins=matrix.margin_row(names[i])[indices])
            for method in methods:
                errors[method].append(abs(found[method] - heldout[names[i]]))
    return {method: float(np.mean(e)) for method, e in errors.items()}, answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", required=True, help="comma-separated estimate-check folders (their responses/)")
    parser.add_argument("--designs", default="all:8,all:4,4x60,4x120,4x250,8x60,8x120,8x250")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--sizes", default="10,20,40,100")
    parser.add_argument("--dims", type=int, default=None, help="IRT dimensions (default: each check's own)")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="calibrate and estimate on a benchmark sample of N items (the error still against every item)")
    parser.add_argument("--sample-seed", type=int, default=0, help="the benchmark sample's seed (with --sample)")
    parser.add_argument("--methods", default=DEFAULT_METHOD,
                        help="comma-separated estimators (gmpirt, margin, ...: evomerge.estimate.METHODS)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    checks = [Path(c) for c in args.checks.split(",")]
    designs = args.designs.split(",")
    for design in designs:
        parse_design(design)
    methods = tuple(args.methods.split(","))
    for method in methods:
        if method not in METHODS:
            raise EvomergeError(f"unknown estimator {method!r}; choose among {', '.join(METHODS)}")
    # a row per design, or per design and estimator when several are compared
    labels = {(d, m): d if len(methods) == 1 else f"{d} {m}" for d in designs for m in methods}
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    # error[design][size][check] = per benchmark and seed; answers[design][size] likewise
    error = {d: {s: {c.name: [] for c in checks} for s in sizes} for d in labels.values()}
    answers = {d: {s: [] for s in sizes} for d in labels.values()}
    for check in checks:
        facts = check_facts(check)
        for path in sorted((check / "responses").glob("*.npz")):
            whole = ResponseMatrix.load(path)
            names = whole.model_names
            endpoints = facts.get("endpoint_names") or [n for n in names if n == "base" or n.startswith("expert:")]
            extras = [n for n in names if n.startswith("extra")]
            heldout = {n: float(whole.row(n).mean()) for n in names if n.startswith("heldout")}
            studied = sampled_items(whole, args.sample, args.sample_seed)
            strategy, dims = facts.get("strategy", "anchor-irt"), args.dims or int(facts.get("dims", 2))
            for design in designs:
                for size in sizes:
                    for seed in seeds:
                        found, n = design_errors(studied, endpoints, extras, heldout, design, size, seed, strategy,
                                                 dims, methods)
                        for method, e in found.items():
                            error[labels[design, method]][size][check.name].append(e)
                            answers[labels[design, method]][size].append(n)
            print(f"{check.name}/{path.stem}: {len(designs)} designs x {len(sizes)} sizes x {len(seeds)} seeds "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    names = [c.name for c in checks]
    print(f"\n{', '.join(methods)}: mean absolute error on the held-out merges, mean over {len(seeds)} seeds ({args.seeds}) and "
          "the benchmarks, per check and over all; answers per benchmark (mean)"
          + (f"; calibrated and estimated on a sample of {args.sample} items (seed {args.sample_seed}), the error "
             "against every item"
             if args.sample else "") + "\n")
    print("| design | items | " + " | ".join(names) + " | all | answers per benchmark |")
    print("|---" * (len(names) + 4) + "|")
    rows = []
    for size in sizes:
        for design in labels.values():
            per_check = [float(np.mean(error[design][size][n])) for n in names]
            mean = float(np.mean(per_check))
            rows.append({"design": design, "size": size, "per_check": dict(zip(names, per_check)), "all": mean,
                         "answers": float(np.mean(answers[design][size])), "seeds": seeds,
                         "sample": args.sample, "sample_seed": args.sample_seed})
            print(f"| {design} | {size} | " + " | ".join(f"{v:.3f}" for v in per_check)
                  + f" | {mean:.3f} | {np.mean(answers[design][size]):,.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "checks": [str(c) for c in checks]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
