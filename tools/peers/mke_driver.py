"""Run mergekit-evolve (mergekit 0.1.5, `mergekit/scripts/evolve.py`) on a CPU-only machine, timing each candidate.

Run by tools/bench_peers.py with the interpreter of a venv that has mergekit-evolve's extra
dependencies (ray, cma, lm_eval) and with tools/peers/ on PYTHONPATH (its sitecustomize.py stubs
lm-eval's vLLM module, which mergekit-evolve imports even without --vllm):

    python tools/peers/mke_driver.py --log CANDIDATES.jsonl --ray-cpus 1 [--cma-seed 0] -- \
        EVOLVE.yml --storage-path DIR --max-fevals 8 ...   # mergekit-evolve's own arguments

What differs from running `mergekit-evolve` itself, each needed here or for measuring only:
* Ray is started first with one *logical* GPU (``ray.init(num_gpus=1)``): mergekit-evolve's actors
  and tasks ask for ``num_gpus=1`` and without a GPU Ray never schedules them (the autoscaler
  repeats "No available node types can fulfill resource request {'CPU': 1.0, 'GPU': 1.0}" and the
  run waits forever). Torch here is a CPU build, so the actor still merges and evaluates on the CPU
  (``--no-merge-cuda``; lm-eval's HF backend picks the CPU when CUDA is absent).
* The evaluation strategy is asked for one genotype at a time (same actor, same order) so that each
  candidate's start and end are known; with one actor the pool runs them one after another anyway.
* ``--cma-seed`` fixes CMA-ES's seed (mergekit-evolve leaves it to the clock), for repeatable races.

Each candidate becomes one line of ``--log``: its index, start and end (seconds since this process
started, and Unix time), score (mergekit-evolve's fitness: the weighted sum of the task metrics on
``limit`` documents), the per-task results and the genotype.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STARTED = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="jsonl: one line per evaluated candidate")
    parser.add_argument("--ray-cpus", type=int, default=1, help="CPUs Ray may schedule on (default 1)")
    parser.add_argument("--cma-seed", type=int, default=None, help="CMA-ES seed (default: mergekit-evolve's, the clock)")
    parser.add_argument("evolve_args", nargs=argparse.REMAINDER, help="-- then mergekit-evolve's arguments")
    args = parser.parse_args()
    evolve_args = args.evolve_args[1:] if args.evolve_args[:1] == ["--"] else args.evolve_args

    import cma
    import numpy as np
    import ray

    ray.init(num_cpus=args.ray_cpus, num_gpus=1, include_dashboard=False, log_to_driver=True)

    from mergekit.evo import strategy
    from mergekit.scripts import evolve

    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - closed in the finally below, after the run
    counter = {"n": 0}

    def one_at_a_time(original):
        def evaluate_genotypes(self, genotypes):
            results = []
            for genotype in genotypes:
                start = time.time()
                (result,) = original(self, [genotype])
                end = time.time()
                counter["n"] += 1
                results.append(result)
                log.write(json.dumps({
                    "candidate": counter["n"], "start_s": start - STARTED, "end_s": end - STARTED,
                    "start_unix": start, "end_unix": end, "score": result.get("score"),
                    "results": _plain(result.get("results")),
                    "genotype": np.asarray(genotype, dtype=float).ravel().tolist(),
                }) + "\n")
            return results
        return evaluate_genotypes

    for cls in (strategy.ActorPoolEvaluationStrategy, strategy.BufferedRayEvaluationStrategy,
                strategy.SerialEvaluationStrategy):
        cls.evaluate_genotypes = one_at_a_time(cls.evaluate_genotypes)

    if args.cma_seed is not None:
        fmin2 = cma.fmin2

        def seeded_fmin2(*a, options=None, **kw):
            return fmin2(*a, options={**(options or {}), "seed": args.cma_seed}, **kw)

        evolve.cma.fmin2 = seeded_fmin2

    try:
        evolve.main.main(evolve_args, standalone_mode=False)
    finally:
        log.close()
        ray.shutdown()


def _plain(value):
    """lm-eval's results as JSON (numbers and strings; anything else as its text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
