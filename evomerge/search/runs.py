"""Run folders (`runs/NAME/`): where a search keeps its space, its storage URL and its caches.

A folder becomes a run once a search has opened or created its study: only
then are the space (`space.yaml`, paths resolved) and a `--storage` URL
(`storage.url`) written there. The study decides what a start means (see
`evomerge.search.study.open_study`): it continues when it holds trials of the
same space, and takes a new space while it holds no result, so a first start
that failed, was killed during calibration or raced another worker never
blocks the folder. Read-only commands (`status`, `validate`, `export`) never
write to the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from optuna.study import Study

from evomerge.errors import EvomergeError
from evomerge.files import write_text_atomic
from evomerge.search.dfs_space import RUN_SPACE_FILE
from evomerge.search.space import SearchSpace, load_search_space
from evomerge.search.study import load_study, open_study

SPACE_FILE = RUN_SPACE_FILE
STORAGE_FILE = "storage.url"


def run_dir_for(space: SearchSpace, runs_root: str | Path = "runs") -> Path:
    """`RUNS_ROOT/<name>` (a space's name never leads outside it: see `space._run_name`)."""
    return Path(runs_root) / space.name


def start_run(space_path: str | Path, runs_root: str | Path = "runs",
              run_dir: str | Path | None = None) -> tuple[SearchSpace, Path]:
    """Load and check the space and find its run folder; nothing is written yet."""
    space = load_search_space(space_path)
    return space, Path(run_dir) if run_dir else run_dir_for(space, runs_root)


def load_run_space(run_dir: str | Path) -> SearchSpace:
    """The search space a run was started with."""
    path = Path(run_dir) / SPACE_FILE
    if not path.exists():
        raise EvomergeError(
            f"{run_dir} is not an evomerge run folder (no {SPACE_FILE}); start one with `evomerge search SPACE.yaml`"
        )
    return load_search_space(path)


def dump_space(space: SearchSpace) -> str:
    """The space as stored in a run folder: its name and resolved paths, so it loads from anywhere."""
    return yaml.safe_dump({"name": space.name, **space.raw}, sort_keys=False)


def storage_for(run_dir: str | Path, storage: str | None = None) -> str | None:
    """The study's storage URL: the one given now, else the one a search remembered, else None (SQLite)."""
    if storage:
        return storage
    path = Path(run_dir) / STORAGE_FILE
    return (path.read_text().strip() or None) if path.exists() else None


def open_run_study(run_dir: str | Path, space: SearchSpace, storage: str | None,
                   directions: Sequence[str], config: Mapping[str, Any]) -> Study:
    """Create or continue the run's study, then record the space and storage in the folder."""
    run_dir = Path(run_dir)
    storage = storage_for(run_dir, storage)
    study = open_study(storage or run_dir, space.name, directions, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    for path, text in ((run_dir / SPACE_FILE, dump_space(space)), (run_dir / STORAGE_FILE, storage)):
        if text and not (path.exists() and path.read_text() == text):
            write_text_atomic(path, text)
    return study


def open_existing_study(run_dir: str | Path, storage: str | None = None) -> Study:
    """Load a run's study to read it (no config check, nothing enqueued, nothing written)."""
    space = load_run_space(run_dir)
    return load_study(storage_for(run_dir, storage) or run_dir, space.name)
