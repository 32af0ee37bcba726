"""Re-score the top trials on more items before choosing one to export: a race, or every item.

The search keeps the trial with the best *estimated* accuracy, and among
hundreds of noisy estimates the top one is biased upwards (winner's curse: in
the demo 0.401 estimated vs 0.359 measured). Validation scores the top K trials
on more items and picks the best of them.

**The race** (the default) scores them on growing random samples of the items
outside their first-stage subset, the same sample for every trial, so trials
are compared on the same items (paired). A trial's accuracy on a benchmark is
then a difference estimator: its subset answers, the IRT prediction of every
other item at the ability its subset answers give, and the mean residual
``answer - prediction`` on the sample scaled to the other items: unbiased
whatever the prediction's error, exact once the sample holds every item. After
each round a trial whose fitness lies below the leader's with 95% confidence
(the paired difference's interval) stops, and the others go on to a sample
twice as large, until one is left, every item is scored, or the race's budget
of item evaluations per benchmark is spent (the last rounds then keep the
best few). **Every item** (``items=None``, `evomerge validate --all-items`):
each of the K trials on every item, as before the race.

Results are study user attrs (`records.StudyKey.FULL_ACCURACY` when measured on every
item, else `StudyKey.VALIDATED` with the estimate, its sd and the items), so the Optuna
storage stays the source of truth and a second validation re-scores nothing; the race's
answers are written per item to ``RUN/validation/trial<N>/<benchmark>.jsonl``. Items
and seconds go to the study's cost record (`costs`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from optuna.study import Study
from optuna.trial import FrozenTrial
from rich.table import Table

from evomerge.benchmarks import Benchmark, score_records, write_records
from evomerge.console import full_width_console, say
from evomerge.errors import EvomergeError
from evomerge.estimate import SubsetEstimator
from evomerge.search.calibration import estimator_path
from evomerge.search.calibration_store import CalibrationStore
from evomerge.search.candidates import CandidateBuilder, make_builder
from evomerge.search.costs import CostLedger
from evomerge.search.records import Ranking, StudyKey, TrialKey, sampled_validations
from evomerge.search.runs import load_run_space, open_existing_study
from evomerge.search.space import SearchSpace

CONFIDENCE = 0.95
"""A raced trial stops once its fitness is below the leader's with this confidence (one-sided)."""
ITEMS_PER_CANDIDATE = 2
"""The race's default budget per benchmark: this many times the first stage's items, per trial raced."""


@dataclass
class ValidatedTrial:
    number: int
    estimated: dict[str, float]
    measured: dict[str, float]        # per benchmark: accuracy on every item, or the race's estimate
    ranking: Ranking
    items: dict[str, int] = field(default_factory=dict)   # items it answered per benchmark (subset + sample)
    exact: bool = True                # measured on every item

    @property
    def measured_mean(self) -> float:
        return self.ranking.mean(self.measured)

    @property
    def estimated_mean(self) -> float:
        return self.ranking.mean(self.estimated)


def records_path(run_dir: str | Path, trial_number: int, bench_name: str) -> Path:
    """Where validation keeps a trial's answer to every item it scored (prompt, generation,
    extracted answer, target, correct), so a user can see why an item failed."""
    return Path(run_dir) / "validation" / f"trial{trial_number}" / f"{bench_name}.jsonl"


def default_race_items(space: SearchSpace, top: int) -> int:
    """The race's item evaluations per benchmark unless told: `ITEMS_PER_CANDIDATE` subsets' worth per trial."""
    return ITEMS_PER_CANDIDATE * space.subset_size * top


def validate_top_trials(run_dir: str | Path, top: int, storage: str | None = None, progress: bool = True,
                        batch_size: int = 128, builder: CandidateBuilder | None = None,
                        items: int | None | str = "race") -> list[ValidatedTrial]:
    """Validate the ``top`` best-estimated trials (results kept in the study); best validated first.

    ``items``: the race's budget of item evaluations per benchmark (``"race"``: the default,
    `default_race_items`), or None to score every trial on every item. ``builder``: a candidate
    builder already holding the run's models (else they are loaded when a trial needs scoring).
    """
    if top < 1:
        raise EvomergeError(f"the number of top trials to validate must be at least 1, got {top}")
    space = load_run_space(run_dir)
    study = open_existing_study(run_dir, storage)
    ranking = Ranking.of(space)
    candidates = ranking.ranked(study)[:top]
    if not candidates:
        raise EvomergeError(f"run {run_dir} has no complete trial to validate yet")
    if items == "race":
        items = default_race_items(space, top)
    ledger = CostLedger(study, "validation")
    with ledger.timed(say if progress else None):
        if items is None:
            _score_every_item(run_dir, space, study, ranking, candidates, builder, batch_size, progress, ledger)
        else:
            _race(run_dir, space, study, ranking, candidates, builder, batch_size, progress, ledger, int(items))
    measured, sampled = ranking.measured(study), sampled_validations(study)
    rows = []
    for trial in candidates:
        estimated = dict(trial.user_attrs.get(TrialKey.ESTIMATES, {}))
        if trial.number in measured:
            counts = {name: None for name in ranking.tasks}
            rows.append(ValidatedTrial(trial.number, estimated, measured[trial.number], ranking, counts, True))
        elif trial.number in sampled:
            record = sampled[trial.number]
            rows.append(ValidatedTrial(trial.number, estimated, dict(record["accuracy"]), ranking,
                                       dict(record.get("items", {})), False))
    return sorted(rows, key=lambda r: -r.measured_mean)


def _score_every_item(run_dir, space, study, ranking, candidates, builder, batch_size, progress, ledger) -> None:
    measured = ranking.measured(study)  # raced onto a last stage of every item: already measured
    missing = [t for t in candidates if t.number not in measured]
    if not missing:
        return
    benchmarks = {b.name: b.load() for b in space.benchmarks}
    builder = builder or make_builder(space, run_dir)
    n_items = sum(len(b.items) for b in benchmarks.values())
    for i, trial in enumerate(missing, 1):
        if progress:
            say(f"validating trial {trial.number} ({i}/{len(missing)}) on all {n_items} benchmark items")
        model = builder.rebuild(trial.user_attrs)
        scores = {}
        for name, bench in benchmarks.items():
            scored = score_records(model, builder.tokenizer, bench, batch_size=batch_size, progress=progress)
            write_records(records_path(run_dir, trial.number, name), scored.records)
            scores[name] = float(np.mean(scored.correct))
        ledger.add(items=n_items, models=1, flush=True)
        study.set_user_attr(f"{StudyKey.FULL_ACCURACY}{trial.number}", scores)  # kept at once: resumable


# ---------------------------------------------------------------------------- the race
@dataclass
class _Lane:
    """One raced trial on one benchmark: what it answered, and the IRT prediction of every item."""

    answers: dict[int, bool]
    predicted: np.ndarray


class _Race:
    """The raced trials' answers and the paired statistics that compare them."""

    def __init__(self, estimators: dict[str, SubsetEstimator], benchmarks: dict[str, Benchmark], ranking: Ranking,
                 method: str, seed: int):
        self.estimators, self.benchmarks, self.ranking = estimators, benchmarks, ranking
        self.share = {name: ranking.weights[name] / sum(ranking.weights.values()) for name in benchmarks}
        self.first = {name: est.stage_indices(0) for name, est in estimators.items()}
        self.order = {}  # one random order of the items outside the first stage, the same for every trial
        for k, (name, est) in enumerate(estimators.items()):
            rest = np.setdiff1d(np.arange(est.n_total), self.first[name])
            self.order[name] = np.random.default_rng(seed + 15_485_863 + k).permutation(rest)
        self.method = method
        self.lanes: dict[int, dict[str, _Lane]] = {}

    def enter(self, trial: FrozenTrial) -> None:
        """A trial's stored answers (every stage it reached) and its predictions from the first stage's."""
        stored = trial.user_attrs.get(TrialKey.ANSWERS, {})
        stage = int(trial.user_attrs.get(TrialKey.STAGE, 0) or 0)
        lanes = {}
        for name, est in self.estimators.items():
            indices = est.stage_indices(min(stage, len(est.stages) - 1))
            text = stored.get(name, "")
            if len(text) != len(indices):
                raise EvomergeError(f"trial {trial.number} stored {len(text)} answers for benchmark {name!r}, whose "
                                    f"stage {stage} has {len(indices)} items (was the calibration replaced?)")
            answers = {int(i): c == "1" for i, c in zip(indices, text)}
            first = np.array([answers[int(i)] for i in self.first[name]], dtype=bool)
            lanes[name] = _Lane(answers, est.item_probabilities(first, self.method, stage=0))
        self.lanes[trial.number] = lanes

    def todo(self, number: int, name: str, sample: int) -> list[int]:
        """The items of the first ``sample`` of the order this trial has not answered yet."""
        answers = self.lanes[number][name].answers
        return [int(i) for i in self.order[name][:sample] if int(i) not in answers]

    def _residuals(self, number: int, name: str, sample: int) -> np.ndarray:
        lane = self.lanes[number][name]
        items = self.order[name][:sample]
        return np.array([float(lane.answers[int(i)]) for i in items]) - lane.predicted[items]

    def accuracy(self, number: int, name: str, sample: int) -> tuple[float, float]:
        """(estimate, sd) of the trial's accuracy on every item from its first stage and ``sample`` items."""
        lane, first, n_total = self.lanes[number][name], self.first[name], self.estimators[name].n_total
        n_rest = n_total - len(first)
        known = sum(lane.answers[int(i)] for i in first)
        if sample >= n_rest:  # every item answered: measured
            return float((known + sum(lane.answers[int(i)] for i in self.order[name])) / n_total), 0.0
        residual = self._residuals(number, name, sample)
        rest = np.ones(n_total, dtype=bool)
        rest[first] = False
        value = (known + lane.predicted[rest].sum() + n_rest * residual.mean()) / n_total
        return float(np.clip(value, 0.0, 1.0)), float(self._sd(residual, n_rest, n_total, sample))

    @staticmethod
    def _sd(residual: np.ndarray, n_rest: int, n_total: int, sample: int) -> float:
        """sd of the mean residual scaled to the items beyond the subset. The per-item variance is at
        least ``1 / (n + 2)`` (one disagreement in a sample that saw none), so a small sample where two
        trials happened to agree everywhere never passes for certainty."""
        variance = residual.var(ddof=1) if len(residual) > 1 else 0.25
        variance = max(float(variance), 1.0 / (len(residual) + 2))
        return math.sqrt(variance / sample * (1.0 - sample / n_rest)) * n_rest / n_total

    def fitness(self, number: int, samples: dict[str, int]) -> float:
        """The trial's weighted fitness from its first stage and the first ``samples`` items of each order."""
        return sum(self.share[n] * self.accuracy(number, n, samples[n])[0] for n in self.benchmarks)

    def difference_sd(self, number: int, leader: int, samples: dict[str, int]) -> float:
        """sd of fitness(number) - fitness(leader): their residuals paired item by item."""
        variance = 0.0
        for name in self.benchmarks:
            n_total = self.estimators[name].n_total
            n_rest, sample = n_total - len(self.first[name]), samples[name]
            if sample >= n_rest:
                continue
            paired = self._residuals(number, name, sample) - self._residuals(leader, name, sample)
            variance += (self.share[name] * self._sd(paired, n_rest, n_total, sample)) ** 2
        return math.sqrt(variance)


def _study_estimators(run_dir: str | Path, study: Study, names: list[str]) -> dict[str, SubsetEstimator]:
    """The estimators the trials were scored with: the study's stored calibration, else the folder's cache."""
    store = CalibrationStore.of(study, create=False)
    stored = (store.estimators() if store is not None else None) or {}
    estimators = {}
    for name in names:
        if name in stored:
            estimators[name] = stored[name]
        elif estimator_path(run_dir, name).exists():
            estimators[name] = SubsetEstimator.load(estimator_path(run_dir, name))
        else:
            raise EvomergeError(f"run {run_dir} has no calibration for benchmark {name!r} to race its trials with "
                                "(validate with --all-items)")
    return estimators


def _race(run_dir, space, study, ranking, candidates, builder, batch_size, progress, ledger, budget: int) -> None:
    """Race the candidates not yet validated (see the module doc); ``budget``: item evaluations per benchmark."""
    known = ranking.validated(study)
    racing = {t.number: t for t in candidates if t.number not in known}
    if not racing:
        return
    benchmarks = {b.name: b.load() for b in space.benchmarks}
    race = _Race(_study_estimators(run_dir, study, list(benchmarks)), benchmarks, ranking, space.estimator, space.seed)
    for trial in racing.values():
        race.enter(trial)
    builder = builder or make_builder(space, run_dir)
    n_rest = {name: len(race.order[name]) for name in benchmarks}
    samples = {name: 0 for name in benchmarks}
    spent = {name: 0 for name in benchmarks}
    reached: dict[int, dict[str, int]] = {}
    raced_out: set[int] = set()
    alive, step, z = list(racing), max(2, space.subset_size // 2), NormalDist().inv_cdf(CONFIDENCE)
    while True:
        left = min(budget - spent[name] for name in benchmarks)
        if left < len(alive) * step:  # the budget ends the race: the best two (or one) go on
            raced_out.update(alive[2:])
            alive = alive[:2]
            step = left // len(alive)
            if step < 2:
                break
        targets = {name: min(samples[name] + step, n_rest[name]) for name in benchmarks}
        if progress:
            say(f"validation race: {len(alive)} trial(s) on a sample of "
                + ", ".join(f"{targets[n]} of {n_rest[n]} {n}" for n in benchmarks) + " items beyond their subsets")
        for number in alive:
            model = None
            for name, bench in benchmarks.items():
                todo = race.todo(number, name, targets[name])
                if not todo:
                    continue
                model = model if model is not None else builder.rebuild(racing[number].user_attrs)
                scored = score_records(model, builder.tokenizer, bench, indices=todo, batch_size=batch_size,
                                       progress=False)
                race.lanes[number][name].answers.update(zip(todo, np.asarray(scored.correct, dtype=bool).tolist()))
                _append_records(records_path(run_dir, number, name), scored.records)
                spent[name] += len(todo)
                ledger.add(items=len(todo))
            ledger.add(models=1, flush=True)
            reached[number] = dict(targets)
        samples = targets
        alive.sort(key=lambda n: -race.fitness(n, samples))
        leader = alive[0]
        lead = race.fitness(leader, samples)
        behind = {n for n in alive[1:] if race.fitness(n, samples) + z * race.difference_sd(n, leader, samples) < lead}
        raced_out |= behind
        alive = [n for n in alive if n not in behind]
        if (len(alive) == 1 and len(racing) > 1) or all(samples[n] >= n_rest[n] for n in benchmarks):
            break  # the winner is clear (a single trial, with nothing to choose, is measured as far as the budget goes)
        step *= 2
    for number, sample in reached.items():
        _store(study, race, number, sample, n_rest, number in raced_out)


def _store(study: Study, race: _Race, number: int, sample: dict[str, int], n_rest: dict[str, int],
           raced_out: bool) -> None:
    """A raced trial's result: measured when it answered every item, else the estimate, its sd, items, and
    whether it stopped behind another (its figure, from fewer items, is then not set against the survivors')."""
    figures = {name: race.accuracy(number, name, sample[name]) for name in race.benchmarks}
    accuracy = {name: value for name, (value, _) in figures.items()}
    if all(sample[name] >= n_rest[name] for name in race.benchmarks):
        study.set_user_attr(f"{StudyKey.FULL_ACCURACY}{number}", accuracy)
        return
    study.set_user_attr(f"{StudyKey.VALIDATED}{number}", {
        "accuracy": accuracy, "sd": {name: sd for name, (_, sd) in figures.items()},
        "items": {name: len(race.first[name]) + sample[name] for name in race.benchmarks},
        "raced_out": bool(raced_out)})


def _append_records(path: Path, records: list[dict]) -> None:
    """Add a round's per-item records to a trial's validation file (one line per item it answered)."""
    existing = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    write_records(path, [*existing, *records])


def print_validation_table(rows: list[ValidatedTrial]) -> None:
    table = Table(title="top trials: estimated vs validated full-benchmark accuracy")
    table.add_column("trial", justify="right")
    table.add_column("estimated", justify="right")
    table.add_column("validated", justify="right")
    tasks = rows[0].ranking.tasks
    for task in tasks:
        table.add_column(f"{task} (val.)", justify="right")
    table.add_column("items", justify="right")
    for row in rows:
        items = "all" if row.exact else " / ".join(str(row.items.get(t, "")) for t in tasks)
        table.add_row(str(row.number), f"{row.estimated_mean:.3f}", f"{row.measured_mean:.3f}",
                      *(f"{row.measured.get(t, float('nan')):.3f}" for t in tasks), items)
    full_width_console().print(table)
