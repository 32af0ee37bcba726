"""A racing search that stops between two stages, for the kill -9 test in test_racing.py.

usage: _racing_kill_worker.py SPACE RUNS_ROOT MARKER N
On its N-th promotion the worker writes the number of the trial in flight to
MARKER and sleeps, so the test can kill it while that trial is between stages.
"""

import sys
import time
from pathlib import Path

from evomerge.cli import main
from evomerge.search import racing


def run() -> int:
    space, runs_root, marker, nth = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    promote, promotions = racing.StagedScorer._promote, []

    def promote_then_stall(self, upper):
        promotions.append(upper)
        if len(promotions) == nth:
            from optuna.trial import TrialState

            running = self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            marker.write_text(str(max(t.number for t in running)))
            time.sleep(600)
        return promote(self, upper)

    racing.StagedScorer._promote = promote_then_stall
    return main(["search", space, "--runs-root", runs_root, "--no-progress"])


if __name__ == "__main__":
    sys.exit(run())
