"""Benchmark one search trial: where its time goes, and what it would cost MERGE^3-style.

Per candidate the search merges in memory, scores each benchmark's subset and
predicts the full accuracy. MERGE^3 / Mergenetic instead write every
candidate to disk and reload it before scoring; the "disk round trip" row
times that (save_pretrained + from_pretrained of the merged model), and the
"full benchmarks" row what scoring every item would cost without the estimator.
Then a short real search into a temporary run folder gives the time per trial
including the optimizer and the storage writes, and the cost of `ask` (sample
and store a genome) is compared with Optuna's one commit per gene.

    python tools/bench_search.py                         # demo space on the zoo (built if missing)
    python tools/bench_search.py --space my.yaml --candidates 10 --trials 20
    python tools/bench_search.py --round-trip-model runs/.cache/bench_merge_full_bfloat16_3/base   # + a bigger model's save/load
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.benchmarks import score_items  # noqa: E402
from evomerge.search.run import MergeSearch  # noqa: E402
from evomerge.search.space import load_search_space  # noqa: E402


def quiet_libraries() -> None:
    """No per-load progress bars or study-created lines between the figures."""
    import optuna
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def random_genomes(search: MergeSearch, count: int, seed: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{n: float(rng.uniform(lo, hi)) for n, (lo, hi) in search.genome.items()} for _ in range(count)]


def disk_round_trip(model, folder: Path):
    """What a write-and-reload pipeline pays per candidate before it can score."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(str(folder), safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=model.dtype).to(model.device)
    shutil.rmtree(folder)
    return reloaded


def bigger_model_round_trip(path: str, repeats: int = 3) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    gigabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_big_"))
    try:
        seconds = statistics.median(timed(lambda: disk_round_trip(model, tmp / f"r{i}"))[0] for i in range(repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndisk round trip of {path} ({params / 1e6:.0f}M params, {model.dtype}, {gigabytes:.2f} GB): "
          f"{seconds:.2f} s per candidate (median of {repeats})")


def component_times(search: MergeSearch, genomes, full_every: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"merge": [], "subset scoring": [], "estimate": [], "disk round trip": [],
                                     "full benchmarks": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    for i, genome in enumerate(genomes):
        seconds, candidate = timed(lambda: search.builder.candidate(genome))   # merge in place / assemble a path
        model = candidate.model
        times["merge"].append(seconds)
        scoring = estimating = 0.0
        for name, bench in search.benchmarks.items():
            estimator = search.estimators[name]
            seconds, correct = timed(lambda: score_items(model, search.tokenizer, bench,
                                                         indices=estimator.indices, batch_size=search.batch_size))
            scoring += seconds
            seconds, _ = timed(lambda: estimator.predict(np.asarray(correct, bool), method=search.space.estimator))
            estimating += seconds
        times["subset scoring"].append(scoring)
        times["estimate"].append(estimating)
        times["disk round trip"].append(timed(lambda: disk_round_trip(model, tmp / f"c{i}"))[0])
        if i % full_every == 0:
            times["full benchmarks"].append(sum(
                timed(lambda: score_items(model, search.tokenizer, bench, batch_size=search.batch_size))[0]
                for bench in search.benchmarks.values()))
    shutil.rmtree(tmp, ignore_errors=True)
    return times


def bench_ask(gene_counts: list[int], trials: int = 15) -> None:
    """Sampling + storing a genome with Optuna's CMA-ES into SQLite: per-gene commits vs one commit."""
    import optuna
    from optuna.distributions import FloatDistribution

    from evomerge.search.storage import suggest_genome

    print(f"\nask (CMA-ES sample + store the genome in SQLite), median of {trials} trials")
    print(f"{'genes':>6} {'per-gene commits s':>18} {'one commit s':>12}")
    for genes in gene_counts:
        genome = {f"g{i}": FloatDistribution(0.0, 1.0) for i in range(genes)}
        row = []
        for batched in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                study = optuna.create_study(storage=f"sqlite:///{tmp}/ask.db",
                                            sampler=optuna.samplers.CmaEsSampler(seed=0))
                times = []
                for _ in range(trials):
                    start = time.perf_counter()
                    trial = study.ask()
                    if batched:
                        suggest_genome(trial, genome)
                    else:
                        for name, distribution in genome.items():
                            trial._suggest(name, distribution)  # Optuna's own path: a commit per gene
                    times.append(time.perf_counter() - start)
                    study.tell(trial, sum(trial.params.values()))
                row.append(statistics.median(times))
        print(f"{genes:>6} {row[0]:>18.3f} {row[1]:>12.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    parser.add_argument("--candidates", type=int, default=8, help="random genomes timed component by component")
    parser.add_argument("--full-every", type=int, default=4, help="score the full benchmarks on every k-th candidate")
    parser.add_argument("--trials", type=int, default=20, help="trials of the real search timed end to end")
    parser.add_argument("--round-trip-model", help="also time save + load of this (bigger) checkpoint")
    parser.add_argument("--ask-genes", default="30,384", help="genome sizes for the ask timing ('' to skip)")
    args = parser.parse_args(argv)
    quiet_libraries()

    space = load_search_space(args.space)
    if space.zoo:
        from evomerge.zoo import ensure_zoo
        ensure_zoo(space.zoo)
    work = Path(tempfile.mkdtemp(prefix="bench_search_run_"))
    try:
        cached = ROOT / "runs" / space.name
        for folder in ("responses", "estimators"):   # reuse a finished run's calibration when there is one
            if (cached / folder).is_dir():
                shutil.copytree(cached / folder, work / folder)
        search = MergeSearch(space, work, progress=False)
        seconds, _ = timed(search.prepare)
        subset = {n: len(e.indices) for n, e in search.estimators.items()}
        full = {n: len(b.items) for n, b in search.benchmarks.items()}
        print(f"space {args.space}: {len(search.genome)} genes, device {search.builder.device}, "
              f"dtype {search.builder.dtype}; calibration {seconds:.1f} s")
        print("items per benchmark, subset / full: " + ", ".join(f"{n} {subset[n]}/{full[n]}" for n in full))

        genomes = random_genomes(search, args.candidates, seed=1)
        component_times(search, genomes[:1], args.full_every)       # warm-up (allocations, caches)
        times = component_times(search, genomes, args.full_every)
        print(f"\nper candidate, median of {args.candidates} random genomes")
        print(f"{'step':<34} {'s':>8}")
        for name in ("merge", "subset scoring", "estimate"):
            print(f"{name:<34} {statistics.median(times[name]):>8.3f}")
        ours = sum(statistics.median(times[n]) for n in ("merge", "subset scoring", "estimate"))
        disk = statistics.median(times["disk round trip"])
        full_s = statistics.median(times["full benchmarks"])
        merge = statistics.median(times["merge"])
        print(f"{'= evomerge trial (in memory)':<34} {ours:>8.3f}")
        print(f"{'disk round trip (save + load)':<34} {disk:>8.3f}")
        print(f"{'full benchmarks (no estimator)':<34} {full_s:>8.3f}")
        print(f"\nwrite-and-reload with the same subset: {ours + disk:.3f} s ({(ours + disk) / ours:.1f}x ours); "
              f"full scoring in memory: {full_s + merge:.3f} s ({(full_s + merge) / ours:.1f}x ours)")

        start = time.perf_counter()
        study, _ = search.run(args.trials)
        wall = time.perf_counter() - start
        per_trial = statistics.median(t.duration.total_seconds() for t in study.trials if t.duration)
        print(f"\nreal search, {args.trials} trials into SQLite: {wall:.1f} s in all (with optimizer "
              f"start-up); median trial {per_trial:.3f} s = ask (sampling, genome commit) + the steps "
              f"above + tell, vs {ours:.3f} s in memory")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.round_trip_model:
        bigger_model_round_trip(args.round_trip_model)
    if args.ask_genes:
        bench_ask([int(g) for g in args.ask_genes.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
