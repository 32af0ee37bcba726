"""What a report shows, read from a run: its study (any Optuna storage), validation and calibration.

Reading only: the study is loaded, never written, so a report can be made
while workers are still searching (their RUNNING trials are counted, not
drawn). Calibration figures come from the responses and estimators stored in the
study (the run folder's cache for runs from before): each calibration model's
subset answers are re-estimated with the study's estimator and set against its
full-benchmark accuracy.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# the objective's timing attrs (evomerge.search.run.MergeSearch.objective)
MERGE_ATTR, SCORE_ATTR = "merge_s", "score_s"


@dataclass
class TrialRecord:
    """One trial as the figures need it; ``fitness`` is the (weighted mean) estimate, None unless COMPLETE."""

    number: int
    state: str
    values: list[float] | None
    fitness: float | None
    estimates: dict[str, float]
    params: dict[str, float]
    baseline: str | None
    duration_s: float | None
    merge_s: float | None
    score_s: float | None

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"


@dataclass
class CalibrationPoint:
    """An estimate next to the measured full-benchmark accuracy of the same model on one benchmark."""

    model: str
    kind: str  # "calibration model" | "validated trial"
    task: str
    estimated: float
    measured: float


@dataclass
class StudyData:
    run_dir: Path
    study_name: str
    storage: str
    tasks: list[str]
    weights: dict[str, float]
    experts: list[str]
    n_objectives: int
    estimator: str
    trials: list[TrialRecord]
    measured: dict[int, dict[str, float]]
    calibration: list[CalibrationPoint]
    genome_bounds: dict[str, tuple[float, float]]
    made_at: str = field(default_factory=lambda: datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))

    @property
    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.complete]

    def measured_fitness(self, number: int) -> float | None:
        scores = self.measured.get(number)
        return None if not scores else weighted(scores, self.weights)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts

    def best(self) -> tuple[TrialRecord | None, str]:
        """The trial to show as the result, and why: best measured once any is validated, else best estimated."""
        by_number = {t.number: t for t in self.complete}
        validated = [n for n in self.measured if n in by_number]
        if validated:
            number = max(validated, key=lambda n: self.measured_fitness(n))
            return by_number[number], f"best measured of {len(validated)} validated"
        if not by_number:
            return None, "no complete trial yet"
        return max(by_number.values(), key=lambda t: t.fitness), "best estimated"

    def trial(self, number: int) -> TrialRecord:
        return next(t for t in self.trials if t.number == number)


def weighted(scores: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted mean of per-benchmark scores (the search's fitness over benchmarks)."""
    from evomerge.search.study import weighted_mean

    names = [n for n in weights if n in scores]
    return weighted_mean([scores[n] for n in names], [weights[n] for n in names]) if names else float("nan")


def load_study_data(run_dir: str | Path, storage: str | None = None, study=None) -> StudyData:
    """Everything the report draws, read from the run folder and its study (``study``: already open)."""
    from evomerge.search.runs import load_run_space, open_existing_study
    from evomerge.search.study import CONFIG_ATTR
    from evomerge.search.validate import stored_full_accuracies

    run_dir = Path(run_dir)
    space = load_run_space(run_dir)
    if study is None:
        study = open_existing_study(run_dir, storage)
    tasks = [b.name for b in space.benchmarks]
    weights = {b.name: b.weight for b in space.benchmarks}
    trials = [_record(t, tasks, weights) for t in study.get_trials(deepcopy=False)]
    measured = stored_full_accuracies(study)
    config = study.user_attrs.get(CONFIG_ATTR, {})
    bounds = {name: (float(lo), float(hi)) for name, (lo, hi) in config.get("genome", {}).items()}
    calibration = _validated_points(trials, measured) + _calibration_model_points(run_dir, tasks, space.estimator, study)
    return StudyData(
        run_dir=run_dir, study_name=study.study_name, storage=_shown_storage(study), tasks=tasks, weights=weights,
        experts=space.expert_names, n_objectives=len(study.directions), estimator=space.estimator, trials=trials,
        measured=measured, calibration=calibration, genome_bounds=bounds,
    )


def _record(trial, tasks: list[str], weights: dict[str, float]) -> TrialRecord:
    from evomerge.search.run import BASELINE_ATTR

    attrs = trial.user_attrs
    values = list(trial.values) if trial.values is not None else None
    fitness = None
    if values is not None and trial.state.name == "COMPLETE":
        fitness = weighted(dict(zip(tasks, values)), weights) if len(values) > 1 else float(values[0])
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    baseline = attrs.get(BASELINE_ATTR)  # "uniform weight 1, density 0.7", "base", "expert arith", ...
    if baseline is None and "fixed_params" in trial.system_attrs:  # enqueued, by an evomerge that named none
        baseline = "enqueued"
    return TrialRecord(
        number=trial.number, state=trial.state.name, values=values, fitness=fitness,
        estimates={k: float(v) for k, v in attrs.get("estimates", {}).items()}, params=dict(trial.params),
        baseline=baseline, duration_s=duration, merge_s=_float(attrs.get(MERGE_ATTR)),
        score_s=_float(attrs.get(SCORE_ATTR)),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _validated_points(trials: list[TrialRecord], measured: dict[int, dict[str, float]]) -> list[CalibrationPoint]:
    by_number = {t.number: t for t in trials}
    points = []
    for number, scores in sorted(measured.items()):
        trial = by_number.get(number)
        if trial is None:
            continue
        for task, value in scores.items():
            if task in trial.estimates:
                points.append(CalibrationPoint(f"trial {number}", "validated trial", task,
                                               trial.estimates[task], float(value)))
    return points


def _calibration_model_points(run_dir: Path, tasks: list[str], method: str, study=None) -> list[CalibrationPoint]:
    """Each calibration model's estimate from its own subset answers vs its accuracy on every item.

    Read from the study's storage (`evomerge.search.calibration`), else from the run folder's cache.
    """
    from evomerge.estimate import ResponseMatrix, SubsetEstimator, responses_path
    from evomerge.search.calibration import CalibrationStore

    store = CalibrationStore.of(study, create=False) if study is not None else None
    stored = store.estimators() if store is not None else None
    points = []
    for task in tasks:
        estimator_file = run_dir / "estimators" / f"{task}.json"
        responses_file = responses_path(run_dir, task)
        if stored and task in stored and store.get_responses(task) is not None:
            estimator, matrix = stored[task], store.get_responses(task)
        elif estimator_file.exists() and responses_file.exists():
            estimator, matrix = SubsetEstimator.load(estimator_file), ResponseMatrix.load(responses_file)
        else:
            continue
        if matrix.n_items != estimator.n_total:
            continue  # responses of another benchmark version: nothing comparable
        for name, row in zip(matrix.model_names, matrix.correct):
            estimated = estimator.predict(row[estimator.indices], method=method)
            points.append(CalibrationPoint(name, "calibration model", task, float(estimated), float(np.mean(row))))
    return points


def _shown_storage(study) -> str:
    """The storage URL with any password hidden."""
    url = getattr(getattr(study, "_storage", None), "url", None)
    if url is None:
        storage = getattr(study, "_storage", None)
        url = getattr(getattr(storage, "_backend", None), "url", None)
    if url is None:
        return type(study._storage).__name__
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return str(url)
