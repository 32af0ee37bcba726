"""Re-score the top trials on the full benchmarks before choosing one to export.

The search keeps the trial with the best *estimated* accuracy, and among
hundreds of noisy estimates the top one is biased upwards (winner's curse: in
the demo 0.401 estimated vs 0.359 measured). Scoring the top K trials on every
item costs K full evaluations and picks the best *measured* one. Results are
kept as study user attrs (`records.StudyKey.FULL_ACCURACY`), so the Optuna
storage stays the source of truth and a second validation re-scores nothing;
each item's answer is written to `RUN/validation/trial<N>/<benchmark>.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from evomerge.benchmarks import score_records, write_records
from evomerge.console import full_width_console, say
from evomerge.errors import EvomergeError
from evomerge.search.candidates import CandidateBuilder, make_builder
from evomerge.search.records import Ranking, StudyKey, TrialKey
from evomerge.search.runs import load_run_space, open_existing_study


@dataclass
class ValidatedTrial:
    number: int
    estimated: dict[str, float]
    measured: dict[str, float]
    ranking: Ranking

    @property
    def measured_mean(self) -> float:
        return self.ranking.mean(self.measured)

    @property
    def estimated_mean(self) -> float:
        return self.ranking.mean(self.estimated)


def records_path(run_dir: str | Path, trial_number: int, bench_name: str) -> Path:
    """Where validation keeps a trial's answer to every item of a benchmark (prompt, generation,
    extracted answer, target, correct), so a user can see why an item failed."""
    return Path(run_dir) / "validation" / f"trial{trial_number}" / f"{bench_name}.jsonl"


def validate_top_trials(run_dir: str | Path, top: int, storage: str | None = None, progress: bool = True,
                        batch_size: int = 128, builder: CandidateBuilder | None = None) -> list[ValidatedTrial]:
    """Score the ``top`` best-estimated trials on every benchmark item (kept in the study).

    Returns them best measured first. ``builder``: a candidate builder already holding
    the run's models (else they are loaded when a trial needs scoring).
    """
    if top < 1:
        raise EvomergeError(f"the number of top trials to validate must be at least 1, got {top}")
    space = load_run_space(run_dir)
    study = open_existing_study(run_dir, storage)
    ranking = Ranking.of(space)
    candidates = ranking.ranked(study)[:top]
    if not candidates:
        raise EvomergeError(f"run {run_dir} has no complete trial to validate yet")
    measured = ranking.measured(study)  # raced onto a last stage of every item: already measured
    missing = [t for t in candidates if t.number not in measured]
    if missing:
        benchmarks = {b.name: b.load() for b in space.benchmarks}
        if builder is None:
            builder = make_builder(space, run_dir)
        for i, trial in enumerate(missing, 1):
            if progress:
                say(f"validating trial {trial.number} ({i}/{len(missing)}) on all "
                    f"{sum(len(b.items) for b in benchmarks.values())} benchmark items")
            model = builder.rebuild(trial.user_attrs)
            scores = {}
            for name, bench in benchmarks.items():
                scored = score_records(model, builder.tokenizer, bench, batch_size=batch_size, progress=progress)
                write_records(records_path(run_dir, trial.number, name), scored.records)
                scores[name] = float(np.mean(scored.correct))
            study.set_user_attr(f"{StudyKey.FULL_ACCURACY}{trial.number}", scores)  # kept at once: resumable
            measured[trial.number] = scores
    rows = [ValidatedTrial(t.number, dict(t.user_attrs.get(TrialKey.ESTIMATES, {})), measured[t.number], ranking)
            for t in candidates]
    return sorted(rows, key=lambda r: -r.measured_mean)


def print_validation_table(rows: list[ValidatedTrial]) -> None:
    table = Table(title="top trials: estimated vs measured full-benchmark accuracy")
    table.add_column("trial", justify="right")
    table.add_column("estimated", justify="right")
    table.add_column("measured", justify="right")
    tasks = rows[0].ranking.tasks
    for task in tasks:
        table.add_column(f"{task} (meas.)", justify="right")
    for row in rows:
        table.add_row(str(row.number), f"{row.estimated_mean:.3f}", f"{row.measured_mean:.3f}",
                      *(f"{row.measured.get(t, float('nan')):.3f}" for t in tasks))
    full_width_console().print(table)
