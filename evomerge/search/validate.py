"""Re-score the top trials on the full benchmarks before choosing one to export.

The search keeps the trial with the best *estimated* accuracy, and among
hundreds of noisy estimates the top one is biased upwards (winner's curse: in
the demo 0.401 estimated vs 0.359 measured). Scoring the top K trials on every
item costs K full evaluations and picks the best *measured* one. Results are
kept as study user attrs (`full_accuracy:<trial>`), so the Optuna storage
stays the source of truth and a second validation re-scores nothing; each
item's answer is written to `RUN/validation/trial<N>/<benchmark>.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.console import full_width_console, say
from evomerge.errors import EvomergeError
from evomerge.search.runs import load_run_space, open_existing_study
from evomerge.search.study import ranked_trials, weighted_mean

FULL_ACCURACY_ATTR = "full_accuracy:"


@dataclass
class ValidatedTrial:
    number: int
    estimated: dict[str, float]
    measured: dict[str, float]
    weights: dict[str, float]

    @property
    def measured_mean(self) -> float:
        return _weighted_mean(self.measured, self.weights)

    @property
    def estimated_mean(self) -> float:
        return _weighted_mean(self.estimated, self.weights)


def _weighted_mean(scores: dict[str, float], weights: dict[str, float]) -> float:
    names = [n for n in weights if n in scores]
    if not names:
        return float("nan")
    return weighted_mean([scores[n] for n in names], [weights[n] for n in names])


def records_path(run_dir: str | Path, trial_number: int, bench_name: str) -> Path:
    """Where validation keeps a trial's answer to every item of a benchmark (prompt, generation,
    extracted answer, target, correct), so a user can see why an item failed."""
    return Path(run_dir) / "validation" / f"trial{trial_number}" / f"{bench_name}.jsonl"


def stored_full_accuracies(study) -> dict[int, dict[str, float]]:
    """Trial number -> measured full-benchmark accuracy per benchmark, for trials validated so far."""
    return {int(key[len(FULL_ACCURACY_ATTR):]): value for key, value in study.user_attrs.items()
            if key.startswith(FULL_ACCURACY_ATTR)}


def validate_top_trials(run_dir: str | Path, top: int, storage: str | None = None,
                        progress: bool = True, batch_size: int = 128, builder=None) -> list[ValidatedTrial]:
    """Score the ``top`` best-estimated trials on every benchmark item (cached in the study).

    Returns them best measured first. ``builder``: a candidate builder already holding
    the run's models (else they are loaded when a trial needs scoring).
    """
    from evomerge.benchmarks import score_records, write_records
    from evomerge.search.candidates import make_builder

    if top < 1:
        raise EvomergeError(f"the number of top trials to validate must be at least 1, got {top}")
    space = load_run_space(run_dir)
    study = open_existing_study(run_dir, storage)
    weights = {b.name: b.weight for b in space.benchmarks}
    candidates = ranked_trials(study, list(weights.values()))[:top]
    if not candidates:
        raise EvomergeError(f"run {run_dir} has no complete trial to validate yet")
    measured = stored_full_accuracies(study)
    for trial in candidates:  # raced onto a last stage of every item: its estimates are measurements
        if trial.number not in measured and _scored_on_every_item(trial, space):
            measured[trial.number] = dict(trial.user_attrs["estimates"])
    missing = [t for t in candidates if t.number not in measured]
    if missing:
        benchmarks = {b.name: b.load() for b in space.benchmarks}
        if builder is None:
            builder = make_builder(space)
        tokenizer = builder.tokenizer
        for i, trial in enumerate(missing, 1):
            if progress:
                say(f"validating trial {trial.number} ({i}/{len(missing)}) on all "
                    f"{sum(len(b.items) for b in benchmarks.values())} benchmark items")
            model = builder.rebuild(trial.user_attrs)
            scores = {}
            for name, bench in benchmarks.items():
                scored = score_records(model, tokenizer, bench, batch_size=batch_size, progress=progress)
                write_records(records_path(run_dir, trial.number, name), scored.records)
                scores[name] = float(np.mean(scored.correct))
            study.set_user_attr(f"{FULL_ACCURACY_ATTR}{trial.number}", scores)  # kept at once: resumable
            measured[trial.number] = scores
    rows = [ValidatedTrial(t.number, dict(t.user_attrs.get("estimates", {})), measured[t.number], weights)
            for t in candidates]
    return sorted(rows, key=lambda r: -r.measured_mean)


def _scored_on_every_item(trial, space) -> bool:
    from evomerge.search.racing import STAGE_ATTR

    return space.stages[-1] == "all" and trial.user_attrs.get(STAGE_ATTR) == len(space.stages) - 1


def print_validation_table(rows: list[ValidatedTrial]) -> None:
    from rich.table import Table

    table = Table(title="top trials: estimated vs measured full-benchmark accuracy")
    table.add_column("trial", justify="right")
    table.add_column("estimated", justify="right")
    table.add_column("measured", justify="right")
    tasks = list(rows[0].weights)
    for task in tasks:
        table.add_column(f"{task} (meas.)", justify="right")
    for row in rows:
        table.add_row(str(row.number), f"{row.estimated_mean:.3f}", f"{row.measured_mean:.3f}",
                      *(f"{row.measured.get(t, float('nan')):.3f}" for t in tasks))
    full_width_console().print(table)
