"""Benchmark the IRT estimator: fit time, ability-estimate time, per-candidate scoring cost.

Issue targets: fitting 50 models x 10k items takes seconds, and the ability of
one model on n items is estimated in milliseconds. Data is drawn from a known
2PL model, so the figures also show how well the fit recovers it.

    python tools/bench_irt.py                  # 50 x 10k, dims 1-3, ~1.5 min on 2 cores
    python tools/bench_irt.py --models 20 --items 2000 --dims 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.estimate.estimators import fit_subset_estimator  # noqa: E402
from evomerge.estimate.irt import estimate_theta, fit_irt, item_probabilities  # noqa: E402


def draw_responses(n_models: int, n_items: int, dims: int, seed: int):
    """Responses from a known multidimensional 2PL model (true probabilities returned too)."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((n_models, dims))
    a = np.abs(rng.standard_normal((n_items, dims))) * 0.7 + 0.4
    b = rng.standard_normal(n_items)
    p = item_probabilities(theta, a, b)
    return a, b, p, rng.random(p.shape) < p


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_fit(n_models: int, n_items: int, dims_list: list[int]) -> None:
    print(f"\nIRT fit, {n_models} models x {n_items} items (numba, MAP, alternating Newton sweeps)")
    print(f"{'dims':>4} {'fit s':>7} {'sweeps':>6} {'mean |p_fit - p_true|':>22}")
    for dims in dims_list:
        _, _, p, y = draw_responses(n_models, n_items, dims, seed=dims)
        start = time.perf_counter()
        fit = fit_irt(y, dims=dims)
        seconds = time.perf_counter() - start
        error = float(np.abs(fit.probabilities() - p).mean())
        print(f"{dims:>4} {seconds:>7.2f} {fit.n_sweeps:>6} {error:>22.3f}")


def bench_ability(sizes: list[int], repeats: int) -> None:
    print("\nAbility estimate of one model (MAP Newton, dims 2)")
    print(f"{'items':>6} {'ms':>8}")
    a, b, _, y = draw_responses(1, max(sizes), 2, seed=7)
    for n in sizes:
        ms = median_ms(lambda: estimate_theta(y[0, :n], a[:n], b[:n]), repeats)
        print(f"{n:>6} {ms:>8.3f}")


def bench_candidate(n_models: int, n_items: int, subset_sizes: list[int], repeats: int) -> None:
    """Per-candidate estimator cost in a search: every estimator from one subset's answers."""
    print(f"\nPer-candidate prediction, all six estimators ({n_models} calibration models x {n_items} items)")
    print(f"{'subset':>6} {'calibrate s':>11} {'predict ms':>10}")
    _, _, _, y = draw_responses(n_models, n_items, 2, seed=11)
    names = [f"m{i}" for i in range(n_models)]
    for n in subset_sizes:
        start = time.perf_counter()
        est = fit_subset_estimator(y, names, names[:4], n, strategy="anchor-irt", dims=2)
        calibrate = time.perf_counter() - start
        answers = y[-1, est.indices]
        ms = median_ms(lambda: est.predict_all(answers), repeats)
        print(f"{n:>6} {calibrate:>11.2f} {ms:>10.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--dims", default="1,2,3", help="comma-separated IRT dimensions for the fit timing")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-candidate", action="store_true", help="skip the calibration + prediction timing")
    args = parser.parse_args(argv)

    import numba
    start = time.perf_counter()
    _, _, _, y = draw_responses(3, 20, 2, seed=0)
    fit_irt(y, dims=2)
    print(f"numba {numba.__version__}, threads {numba.config.NUMBA_NUM_THREADS}; "
          f"first fit incl. JIT compile / cache load: {time.perf_counter() - start:.2f} s")

    bench_fit(args.models, args.items, [int(d) for d in args.dims.split(",")])
    bench_ability([10, 20, 50, 100, 1000], args.repeats)
    if not args.skip_candidate:
        bench_candidate(8, 1000, [10, 20, 50, 100], args.repeats)         # zoo-sized calibration
        bench_candidate(args.models, args.items, [100], args.repeats)    # large-benchmark calibration
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
