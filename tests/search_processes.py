"""Run `evomerge search` as several worker processes at once (processes: torch and transformers keep
process-wide state, which two searches in one process would share)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_search_workers(space: Path, runs_root: Path, workers: int = 2, timeout: float = 300) -> list[str]:
    """Start ``workers`` searches of ``space`` together; assert each exits 0; return the tail of each output."""
    command = [sys.executable, "-m", "evomerge.cli", "search", str(space), "--runs-root", str(runs_root),
               "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(workers)]
    outputs = [proc.communicate(timeout=timeout)[0].decode()[-3000:] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * workers, outputs
    return outputs
