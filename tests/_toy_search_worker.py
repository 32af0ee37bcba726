"""A toy search in its own process, for the kill -9 / resume test in test_study.py.

usage: _toy_search_worker.py RUN_DIR OPTIMIZER N_TRIALS (new|resume) [SLEEP_S]  (both modes open the same way)
Each objective call sleeps SLEEP_S (so the test can kill mid-trial) and
appends the genome it is evaluating to RUN_DIR/evaluated.jsonl.
"""

import json
import sys
import time
from pathlib import Path

from evomerge.search.optimizers import make_optimizer
from evomerge.search.driver import SearchDriver
from evomerge.search.study import open_study

GENOME_SPACE = {"x0": (-1.0, 1.0), "x1": (-1.0, 1.0), "x2": (0.0, 2.0)}
TARGET = {"x0": 0.3, "x1": -0.2, "x2": 1.1}


def main() -> None:
    run_dir, optimizer_name, n_trials, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sleep_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.2
    log = Path(run_dir) / "evaluated.jsonl"
    config = {"optimizer": optimizer_name, "genome_space": GENOME_SPACE, "n_trials": n_trials}
    study = open_study(run_dir, "toy", ["maximize"], config)
    optimizer = make_optimizer(optimizer_name, GENOME_SPACE, ["maximize"], seed=7, budget=n_trials)

    def objective(params):
        with log.open("a") as out:
            out.write(json.dumps(params) + "\n")
        time.sleep(sleep_s)
        value = -sum((params[k] - TARGET[k]) ** 2 for k in GENOME_SPACE)
        return [value], {"task_scores": {"toy": value}}

    SearchDriver(study, optimizer, progress=False).run(objective, n_trials)


if __name__ == "__main__":
    main()
