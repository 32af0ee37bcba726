"""One search worker in its own process, for tests/test_workers_postgres.py.

usage: _pg_worker.py SPACE RUN_DIR STORAGE_URL [STALL_AT] [SLEEP_S]
Runs `evomerge search SPACE --run-dir RUN_DIR --storage STORAGE_URL`. Each trial's
objective sleeps SLEEP_S first (so a test can act mid-search); on its STALL_AT-th
trial (1-based, 0: never) the worker writes RUN_DIR/stalled and sleeps, so the test
can kill it with -9 while that trial runs.
"""

import sys
import time
from pathlib import Path

from evomerge.cli import main
from evomerge.search.run import MergeSearch


def run() -> int:
    space, run_dir, url = sys.argv[1:4]
    stall_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    sleep_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    objective, calls = MergeSearch.objective, []

    def slow_objective(self, params):
        calls.append(params)
        if len(calls) == stall_at:
            (Path(run_dir) / "stalled").write_text("stalled")
            time.sleep(600)
        time.sleep(sleep_s)
        return objective(self, params)

    MergeSearch.objective = slow_objective
    return main(["search", space, "--run-dir", run_dir, "--storage", url, "--no-progress"])


if __name__ == "__main__":
    sys.exit(run())
