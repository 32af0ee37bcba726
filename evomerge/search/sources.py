"""Data-flow sources that are other runs: resolved once when a search starts, then pinned.

A space may name a finished parameter-space run as a data-flow source
(``{name: ps, source: runs/demo}``). Parsing keeps it a reference; here it is
resolved: the run's winner (`records.Ranking.winner`, the trial `evomerge export`
would export) when the space names no trial, and that trial's recipe read from
the run's study. The chosen trial is written into the space (``trial: N``), so
the run folder's stored space pins it: every later resume, status, report or
export of the data-flow run uses that very merge, whatever the source run does next.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.search.dfs_space import DataFlowSource
from evomerge.search.records import Ranking, TrialKey, complete_trials
from evomerge.search.runs import SPACE_FILE, load_run_space, open_existing_study
from evomerge.search.space import SearchSpace


def pinned_trials(run_dir: str | Path) -> dict[tuple[str, str], int]:
    """(source name, run folder) -> trial, as the space stored in ``run_dir`` pins them (empty for a new run)."""
    if not (Path(run_dir) / SPACE_FILE).is_file():
        return {}
    stored = load_run_space(run_dir)
    if stored.dfs is None:
        return {}
    return {(s.name, s.run): s.trial for s in stored.dfs.sources if s.run is not None and s.trial is not None}


def resolve_sources(space: SearchSpace, pinned: dict[tuple[str, str], int] | None = None) -> SearchSpace:
    """``space`` with every run source resolved (a copy; ``space`` itself when nothing is to resolve).

    A source without a trial takes the one ``pinned`` gives it (what this run's folder
    pinned at its first start), else the source run's winner, and the space's raw
    form records it, so the run folder stores it pinned.
    """
    if space.dfs is None or all(s.resolved for s in space.dfs.sources):
        return space
    raw = copy.deepcopy(space.raw)
    sources = []
    for index, source in enumerate(space.dfs.sources):
        if not source.resolved:
            source = _resolved(source, (pinned or {}).get((source.name, source.run)),
                               f"{space.name}: dfs.sources[{index}] ({source.name})")
            raw["dfs"]["sources"][index]["trial"] = source.trial
        sources.append(source)
    dfs = dataclasses.replace(space.dfs, sources=sources)
    return dataclasses.replace(space, dfs=dfs, raw=raw)


def _resolved(source: DataFlowSource, pinned: int | None, where: str) -> DataFlowSource:
    folder = Path(source.run)
    run_space = load_run_space(folder)
    study = open_existing_study(folder)
    trial = source.trial if source.trial is not None else pinned
    complete = {t.number: t for t in complete_trials(study)}
    if trial is None:
        if len(complete) < run_space.trials:
            raise EvomergeError(
                f"{where}: run {folder} is unfinished ({len(complete)} of {run_space.trials} trials complete); "
                f"finish it with `evomerge resume {folder}` or pick a trial with `trial: N`")
        trial = Ranking.of(run_space).winner(study).trial.number
    elif trial not in complete:
        raise EvomergeError(f"{where}: trial {trial} is not a complete trial of run {folder}")
    attrs = complete[trial].user_attrs
    return dataclasses.replace(source, trial=int(trial), recipe=attrs[TrialKey.RECIPE],
                               merge_seed=int(attrs[TrialKey.MERGE_SEED]))
