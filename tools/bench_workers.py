"""Throughput of one study shared by 1, 4 and 16 worker processes, on SQLite and on PostgreSQL.

usage: python tools/bench_workers.py [--workers 1 4 16] [--trials-per-worker 10] [--sleep 0.05]

Each worker is a process running evomerge's driver loop (`SearchDriver`, random
sampler, the same storage wrapper as `evomerge search`) on a stub objective that
sleeps ``--sleep`` seconds (no model: what is measured is the storage and the
loop). Reported per backend and worker count: trials per second (complete trials
over the span from the first trial's start to the last one's end, so process
start-up is not counted), the median and 95th percentile of a worker's ask and
tell latency, and the failed trials and worker errors (a "database is locked"
would show there). PostgreSQL is a throwaway server from tests/postgres_server.py
(Debian's postgresql binaries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GENOME = {"x0": (0.0, 1.0), "x1": (0.0, 1.0), "x2": (0.0, 1.0)}


def worker(url: str, n_trials: int, sleep_s: float, out: str) -> None:
    from evomerge.search.optimizers import make_optimizer
    from evomerge.search.driver import SearchDriver
    from evomerge.search.study import open_study

    study = open_study(url, "bench", ["maximize"], {"bench": "workers"})
    optimizer = make_optimizer("random", GENOME, ["maximize"], seed=0, budget=n_trials)
    latency = {"ask": [], "tell": []}
    for name in ("ask", "tell"):
        method = getattr(optimizer, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            started = time.perf_counter()
            result = _method(*args, **kwargs)
            latency[_name].append(time.perf_counter() - started)
            return result
        setattr(optimizer, name, timed)

    def objective(params):
        time.sleep(sleep_s)
        return [-sum((v - 0.5) ** 2 for v in params.values())], {}

    SearchDriver(study, optimizer, progress=False).run(objective, n_trials)
    Path(out).write_text(json.dumps(latency))


def run_case(url: str, n_workers: int, n_trials: int, sleep_s: float, folder: Path) -> dict:
    import optuna
    from optuna.trial import TrialState

    from evomerge.search.storage import open_storage

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    outs = [folder / f"latency-{n_workers}-{i}.json" for i in range(n_workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, str(n_trials), str(sleep_s), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for out in outs]
    outputs = [p.communicate(timeout=1800)[0].decode() for p in procs]
    errors = [o.strip().splitlines()[-1] for p, o in zip(procs, outputs) if p.returncode != 0]
    locked = sum("database is locked" in o for o in outputs)
    study = optuna.load_study(study_name="bench", storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in trials)).total_seconds()
    latency = {"ask": [], "tell": []}
    for out in outs:
        if out.exists():
            for key, values in json.loads(out.read_text()).items():
                latency[key] += values
    row = {"workers": n_workers, "complete": len(done), "failed": len(trials) - len(done),
           "trials_per_s": len(done) / span, "errors": errors, "locked_messages": locked}
    for key, values in latency.items():
        row[f"{key}_ms_median"] = 1000 * float(np.median(values)) if values else float("nan")
        row[f"{key}_ms_p95"] = 1000 * float(np.percentile(values, 95)) if values else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--trials-per-worker", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds the stub objective takes")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args()
    from postgres_server import PostgresServer

    print(f"stub objective {args.sleep * 1000:.0f} ms, {args.trials_per_worker} trials per worker, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"{'backend':<11} {'workers':>7} {'complete':>8} {'failed':>6} {'trials/s':>9} "
          f"{'ask ms (med/p95)':>17} {'tell ms (med/p95)':>18}  errors")
    server = PostgresServer().start() if "postgresql" in args.backends else None
    try:
        for backend in args.backends:
            for n in args.workers:
                with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
                    url = (f"sqlite:///{tmp}/study.db" if backend == "sqlite"
                           else server.new_database(f"bench{n}"))
                    row = run_case(url, n, n * args.trials_per_worker, args.sleep, Path(tmp))
                errors = "; ".join(row["errors"])[:200] or "-"
                if row["locked_messages"]:
                    errors += f" ({row['locked_messages']} outputs say 'database is locked')"
                print(f"{backend:<11} {n:>7} {row['complete']:>8} {row['failed']:>6} {row['trials_per_s']:>9.1f} "
                      f"{row['ask_ms_median']:>8.1f}/{row['ask_ms_p95']:<8.1f} "
                      f"{row['tell_ms_median']:>8.1f}/{row['tell_ms_p95']:<9.1f} {errors}", flush=True)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    else:
        main()
