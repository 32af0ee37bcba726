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

import numpy as np
from optuna.study import Study

from evomerge.errors import EvomergeError
from evomerge.estimate import ResponseMatrix, SubsetEstimator, responses_path
from evomerge.merge.loading import open_model
from evomerge.search.calibration import estimator_path
from evomerge.search.calibration_store import CalibrationStore
from evomerge.search.candidates import genes_of
from evomerge.search.costs import PhaseCost, study_costs
from evomerge.search.genome import Gene
from evomerge.search.records import Ranking, StudyKey, TrialRecord
from evomerge.search.runs import load_run_space, open_existing_study
from evomerge.search.storage import storage_description


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
    ranking: Ranking
    experts: list[str]
    n_objectives: int
    estimator: str
    trials: list[TrialRecord]
    measured: dict[int, dict[str, float]]
    winner: tuple[int, str] | None     # the run's winner (`Ranking.winner`): trial number and why
    calibration: list[CalibrationPoint]
    genes: dict[str, Gene]
    costs: dict[str, PhaseCost] = field(default_factory=dict)  # phase -> item evaluations and seconds
    made_at: str = field(default_factory=lambda: datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))

    @property
    def tasks(self) -> list[str]:
        return self.ranking.tasks

    @property
    def weights(self) -> dict[str, float]:
        return self.ranking.weights

    @property
    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.complete]

    def measured_fitness(self, number: int) -> float | None:
        scores = self.measured.get(number)
        return None if not scores else self.ranking.mean(scores)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts

    def best(self) -> tuple[TrialRecord | None, str]:
        """The trial to show as the result (the run's winner, the one `evomerge export` exports), and why."""
        if self.winner is None:
            return None, "no complete trial yet"
        number, why = self.winner
        return self.trial(number), why

    def trial(self, number: int) -> TrialRecord:
        return next(t for t in self.trials if t.number == number)


def load_study_data(run_dir: str | Path, storage: str | None = None, study: Study | None = None) -> StudyData:
    """Everything the report draws, read from the run folder and its study (``study``: already open)."""
    run_dir = Path(run_dir)
    space = load_run_space(run_dir)
    if study is None:
        study = open_existing_study(run_dir, storage)
    ranking = Ranking.of(space)
    trials = ranking.records(study)
    measured = ranking.measured(study)
    winner = ranking.winner(study)
    calibration = _validated_points(trials, measured) + _calibration_model_points(run_dir, ranking.tasks,
                                                                                  space.estimator, study)
    return StudyData(
        run_dir=run_dir, study_name=study.study_name, storage=storage_description(study), ranking=ranking,
        experts=space.expert_names, n_objectives=len(study.directions), estimator=space.estimator, trials=trials,
        measured=measured, winner=None if winner is None else (winner.trial.number, winner.reason),
        calibration=calibration, genes=_genes(study, space), costs=study_costs(study),
    )


def _genes(study: Study, space) -> dict[str, Gene]:
    """The genome's structure: as the search stored it, else (a study from before) rebuilt from the
    space and the base model's headers; empty when neither is at hand."""
    stored_bounds = study.user_attrs.get(StudyKey.CONFIG, {}).get("genome", {})
    stored = study.user_attrs.get(StudyKey.GENES)
    if stored:
        genes = {}
        for name, (param, owner, group) in stored.items():
            bounds = stored_bounds.get(name, [float("nan"), float("nan")])
            if all(isinstance(b, str) for b in bounds):  # the method gene: its choices
                genes[name] = Gene(param, owner, group, float("nan"), float("nan"), choices=tuple(bounds))
            else:
                genes[name] = Gene(param, owner, group, float(bounds[0]), float(bounds[1]))
        return genes
    try:
        return genes_of(space, open_model(space.base).num_layers)
    except (EvomergeError, OSError):  # models moved or gone: the report draws what it can without the genome
        return {}


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

    Read from the study's storage (`evomerge.search.calibration_store`), else from the run folder's cache.
    """
    store = CalibrationStore.of(study, create=False) if study is not None else None
    stored = store.estimators() if store is not None else None
    points = []
    for task in tasks:
        estimator_file = estimator_path(run_dir, task)
        responses_file = responses_path(run_dir, task)
        if stored and task in stored and store.get_responses(task) is not None:
            estimator, matrix = stored[task], store.get_responses(task)
        elif estimator_file.exists() and responses_file.exists():
            estimator, matrix = SubsetEstimator.load(estimator_file), ResponseMatrix.load(responses_file)
        else:
            continue
        if matrix.n_items != estimator.n_total:
            continue  # responses of another benchmark version: nothing comparable
        for name, row, seen in zip(matrix.model_names, matrix.correct, matrix.mask):
            if not seen.all():
                continue  # scored on a sample of the items (calibration on less): its accuracy is not measured
            estimated = estimator.predict(row[estimator.indices], method=method,
                                          subset_margins=matrix.margin_row(name)[estimator.indices])
            points.append(CalibrationPoint(name, "calibration model", task, float(estimated), float(np.mean(row))))
    return points
