"""`evomerge search` with `optimizer.init: learned` that stalls while the learned trial is scored, for the
kill -9 test in test_data_merging.py.

usage: _learn_kill_worker.py SPACE RUN_DIR MARKER
"""

import sys
import time
from pathlib import Path

from evomerge.cli import main
from evomerge.search import run as run_module


def go() -> int:
    space, run_dir, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    objective = run_module.MergeSearch.objective

    def stall_on_the_learned(self, params):
        learned = self.open().user_attrs.get("evomerge_learned", {})
        if any(entry["genome"] == params for entry in learned.values()):
            marker.write_text("scoring")
            time.sleep(600)
        return objective(self, params)

    run_module.MergeSearch.objective = stall_on_the_learned
    return main(["search", space, "--run-dir", run_dir, "--no-progress"])


if __name__ == "__main__":
    sys.exit(go())
