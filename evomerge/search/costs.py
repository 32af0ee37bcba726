"""What a run spends, phase by phase: item evaluations and seconds, kept in the study.

A search's trials are cheap (a few dozen items per benchmark); the work around
them (calibration, validation, the demo's final table) can cost more, so every
run counts it. Phases (`PHASES`), in the order a run meets them: ``statistics``
(the data statistics a data-informed method reads: each expert reading its
unlabelled prompts), ``calibration`` (models scored to fit the item parameters,
and the fits), ``learning`` (coefficients learned from unlabelled prompts: every
prompt of every step), ``trials`` (the search loop: every trial's scored items,
and its wall time including the optimizer's bookkeeping), ``validation`` (the
top trials re-scored) and ``final_table`` (the demo's comparison of every model
on every item: a demo-only cost). ``statistics`` and ``learning`` count
unlabelled prompts read (one model reading one prompt; a learning step reads
its batch forward and backward), the others benchmark items answered.

Each process keeps its own figures in memory and writes them under its own study
user attr (``StudyKey.COST`` + phase + the worker's host, pid and start), so
workers sharing a study never overwrite each other's counts (no read-modify-write
of a shared key); `study_costs` sums them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from optuna.study import Study
from optuna.trial import FrozenTrial
from rich.table import Table

from evomerge.console import duration, full_width_console
from evomerge.errors import EvomergeError
from evomerge.search.records import StudyKey, TrialKey, trial_items
from evomerge.search.workers import worker_identity

PHASES = ("statistics", "calibration", "learning", "trials", "validation", "final_table")
SEARCH_OVERHEAD = ("calibration", "validation")
"""The phases every search adds to its trials (the final table is the demo's; statistics and learning
are a data-informed search's own, counted in prompts, and shown apart)."""
LABELS = {"statistics": "statistics (prompts)", "learning": "learning (prompts)",
          "final_table": "final table (demo only)"}
PHASE_NAMES = {"statistics": "data statistics", "trials": "search", "final_table": "final table"}
"""The phases as the console names them while they run."""
FLUSH_S = 10.0
"""A ledger writes its figures at most this often while it counts (and always when asked to)."""


@dataclass
class PhaseCost:
    """Item evaluations (one model answering one item), models scored, and seconds of one phase."""

    items: int = 0
    models: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"items": int(self.items), "models": int(self.models), "seconds": round(float(self.seconds), 3)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PhaseCost":
        return cls(int(data.get("items", 0)), int(data.get("models", 0)), float(data.get("seconds", 0.0)))

    def __add__(self, other: "PhaseCost") -> "PhaseCost":
        return PhaseCost(self.items + other.items, self.models + other.models, self.seconds + other.seconds)


def phase_label(phase: str) -> str:
    return PHASE_NAMES.get(phase, phase)


def phase_done(phase: str, items: int, seconds: float) -> str:
    """The line that ends a phase on the console: its time, and what it scored."""
    unit = "prompts read" if phase in ("statistics", "learning") else "item evaluations"
    what = f"{items:,} {unit}" if items else "nothing scored: reused"
    return f"{phase_label(phase)}: done in {duration(seconds)} ({what})"


def _worker_key() -> str:
    worker = worker_identity()
    return f"{worker['host']}:{worker['pid']}:{worker['start']}"


class CostLedger:
    """One process's figures for one phase, written to the study under the process's own key.

    ``study`` None: counted, never written (a calibration without a study).
    """

    def __init__(self, study: Study | None, phase: str):
        if phase not in PHASES:
            raise EvomergeError(f"unknown cost phase {phase!r}; choose one of {', '.join(PHASES)}")
        self.study, self.phase = study, phase
        self.key = f"{StudyKey.COST}{phase}:{_worker_key()}"
        stored = study.user_attrs.get(self.key) if study is not None else None
        self.cost = PhaseCost.from_dict(stored) if stored else PhaseCost()  # this process's earlier figures
        self._written = time.monotonic()

    def add(self, items: int = 0, seconds: float = 0.0, models: int = 0, *, flush: bool = False) -> None:
        self.cost = self.cost + PhaseCost(int(items), int(models), float(seconds))
        if flush or time.monotonic() - self._written >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.study is not None:
            self.study.set_user_attr(self.key, self.cost.to_dict())
        self._written = time.monotonic()

    @contextmanager
    def timed(self, announce: Callable[[str], None] | None = None, what: str = "") -> Iterator["CostLedger"]:
        """Adds the seconds spent inside (items are added by the caller) and writes on the way out;
        ``announce`` (e.g. `say`) tells the user when the phase starts (and ``what`` it does) and what it
        took when it ends."""
        started, before = time.perf_counter(), self.cost
        if announce is not None:
            announce(f"{phase_label(self.phase)}: started" + (f" ({what})" if what else ""))
        try:
            yield self
        finally:
            self.add(seconds=time.perf_counter() - started, flush=True)
        if announce is not None:
            announce(phase_done(self.phase, self.cost.items - before.items, self.cost.seconds - before.seconds))


class TrialCosts:
    """A search-loop callback: each finished trial's scored items (none for a duplicate, whose stored
    result is reused) and the loop's seconds since the previous one, so bookkeeping counts too."""

    def __init__(self, ledger: CostLedger):
        self.ledger = ledger
        self._last = time.perf_counter()

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        now = time.perf_counter()
        items = 0 if TrialKey.DUPLICATE_OF in trial.user_attrs else trial_items(trial)
        self.ledger.add(items=items, seconds=now - self._last, models=1)
        self._last = now

    def close(self, best_effort: bool = False) -> None:
        """The seconds after the last trial (waiting for other workers' trials), written; ``best_effort``:
        while something else stops the run, a storage that refuses the write is left to say so itself."""
        now = time.perf_counter()
        self.ledger.add(seconds=now - self._last)
        self._last = now
        try:
            self.ledger.flush()
        except Exception:
            if not best_effort:
                raise


def study_costs(study: Study) -> dict[str, PhaseCost]:
    """Every phase's figures summed over the processes that worked on ``study`` (phases never run: absent)."""
    totals: dict[str, PhaseCost] = {}
    for key, value in study.user_attrs.items():
        if not key.startswith(StudyKey.COST) or not isinstance(value, Mapping):
            continue
        phase = key[len(StudyKey.COST):].split(":", 1)[0]
        if phase in PHASES:
            totals[phase] = totals.get(phase, PhaseCost()) + PhaseCost.from_dict(value)
    return {phase: totals[phase] for phase in PHASES if phase in totals}


def cost_rows(costs: Mapping[str, PhaseCost]) -> list[tuple[str, str, str, str]]:
    """(phase, models or trials, item evaluations, seconds) as printed by status, the report and the demo,
    then the search's own overhead (calibration + validation) against the trials."""
    rows = []
    for phase, cost in costs.items():
        label = LABELS.get(phase, phase)
        rows.append((label, f"{cost.models}", f"{cost.items:,}", f"{cost.seconds:.1f}"))
    trials = costs.get("trials")
    overhead = [costs[p] for p in SEARCH_OVERHEAD if p in costs]
    if trials is not None and trials.items and overhead:
        total = sum(overhead, PhaseCost())
        rows.append(("calibration + validation / trials", "",
                     f"{total.items / trials.items:.2f}x", f"{total.seconds / max(trials.seconds, 1e-9):.2f}x"))
    return rows


COST_COLUMNS = ("phase", "models / trials", "item evaluations", "seconds")


def print_costs(study: Study, title: str = "what the run spent") -> None:
    """The cost table (`cost_rows`), when the study recorded any."""
    costs = study_costs(study)
    if not costs:
        return
    table = Table(title=f"{title} (item evaluations: one model answering one item)")
    for column in COST_COLUMNS:
        table.add_column(column, justify="left" if column == "phase" else "right")
    for row in cost_rows(costs):
        table.add_row(*row)
    full_width_console().print(table)
