"""What a search stores about its trials, read back as typed records; how trials rank and which one wins.

Every key a trial or a study keeps in the Optuna storage is named here once
(`TrialKey`, `StudyKey`), a stored trial reads as one `TrialRecord`, and one
`Ranking` (the space's benchmark weights and scoring stages) orders the trials
and picks the run's `winner`: the trial that `evomerge export` exports,
`evomerge status` and the report name, and a data-flow space takes as its
source when it names the run. Reading only: nothing here writes to a study.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError
from evomerge.search.storage import enqueued


class TrialKey:
    """User attrs of a trial."""

    WORKER = "worker"                       # {"host", "pid", "start"} of the process running it
    ERROR = "error"                         # why it failed ("stale: ...", "interrupted", "EvomergeError: ...")
    WALL_TIME = "wall_time_s"               # seconds from its genome's arrival to its result
    DUPLICATE_OF = "duplicate_of"           # number of the earlier trial with this genome, whose result it reuses
    BASELINE = "baseline"                   # name of an enqueued reference genome ("expert arith", "base", ...)
    ESTIMATES = "estimates"                 # benchmark -> estimated full-benchmark accuracy
    ANSWERS = "answers"                     # benchmark -> the subset's answers as a "0110..." string
    INTERVALS = "intervals"                 # benchmark -> [low, high] of its estimate
    FITNESS_INTERVAL = "fitness_interval"   # [low, high] of the weighted fitness
    STAGE = "stage"                         # last scoring stage reached (0-based; racing)
    ITEMS = "items"                         # benchmark items it was scored on, over all benchmarks
    STAGE_FITNESS = "fitness_by_stage"      # fitness after each stage reached
    MERGE_S = "merge_s"                     # seconds building its model
    SCORE_S = "score_s"                     # seconds scoring it
    RECIPE = "recipe"                       # parameter-space merge: the Recipe as a dict ...
    MERGE_SEED = "merge_seed"               # ... and the seed of its random masks
    PATH = "path"                           # data-flow merge: the DataFlowPath as a dict ...
    PATH_TEXT = "path_text"                 # ... described ("lang[0:2] arith[2:4]")
    DFS_SOURCES = "dfs_sources"             # ... and the identity of each source it runs through

    #: Attrs describing who ran a trial or why it is special: never copied onto a duplicate.
    OWN = (WORKER, ERROR, WALL_TIME, DUPLICATE_OF, BASELINE)


class StudyKey:
    """User attrs of a study."""

    CONFIG = "evomerge_config"              # the space and resolved inputs a resume must find unchanged
    FULL_ACCURACY = "full_accuracy:"        # + trial number: benchmark -> accuracy on every item (validation)
    VALIDATED = "validated:"                # + trial number: {accuracy, sd, items} per benchmark, raced_out: validated on a sample
    NEVERGRAD_BUDGET = "evomerge_nevergrad_budget"  # the budget nevergrad was first built with (exact replay)
    GENES = "evomerge_genes"                # gene name -> [parameter, owner, group]: the genome's structure
    LEARNED = "evomerge_learned"            # label -> {genome, losses, seconds}: coefficients learned from data
    COST = "evomerge_cost:"                 # + phase + ":" + worker: {items, models, seconds} that process spent
    FINAL_TABLE = "evomerge_final_table"    # the demo's comparison: model -> benchmark -> accuracy on every item


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples and paths turned into JSON types (Optuna stores attrs as JSON)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise EvomergeError(f"cannot store {type(value).__name__} value {value!r} in the study (not JSON)")


def genome_key(params: Mapping[str, float]) -> tuple:
    """A genome as a hashable key: the same genome (up to float noise) gives the same key."""
    return tuple(sorted((name, value if isinstance(value, str) else round(float(value), 12))
                        for name, value in params.items()))


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """The fitness over several benchmarks: their accuracies weighted by the space's benchmark weights."""
    return float(np.dot(weights, values) / np.sum(weights))


def complete_trials(study: Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def best_trials(study: Study) -> list[FrozenTrial]:
    """Optuna's view: single objective ``[best]`` (or ``[]``); several: the Pareto front."""
    if not complete_trials(study):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return list(study.best_trials)


def validated_accuracies(study: Study) -> dict[int, dict[str, float]]:
    """Trial number -> accuracy per benchmark on every item, for the trials validation re-scored."""
    return {int(key[len(StudyKey.FULL_ACCURACY):]): dict(value) for key, value in study.user_attrs.items()
            if key.startswith(StudyKey.FULL_ACCURACY)}


def sampled_validations(study: Study) -> dict[int, dict]:
    """Trial number -> ``{"accuracy": {benchmark: ...}, "sd": {...}, "items": {...}}`` for the trials
    validation estimated from a sample of the items (a race stopped before every item)."""
    return {int(key[len(StudyKey.VALIDATED):]): dict(value) for key, value in study.user_attrs.items()
            if key.startswith(StudyKey.VALIDATED) and isinstance(value, Mapping)}


def trial_items(trial: FrozenTrial) -> int:
    """Items a trial was scored on (trials from before racing: the length of their stored answers)."""
    items = trial.user_attrs.get(TrialKey.ITEMS)
    if items is not None:
        return int(items)
    return sum(len(a) for a in trial.user_attrs.get(TrialKey.ANSWERS, {}).values())


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class TrialRecord:
    """One stored trial, typed; ``fitness`` is the ranking's (weighted mean) estimate, None unless COMPLETE."""

    number: int
    state: str
    values: list[float] | None
    fitness: float | None
    params: dict[str, float]
    estimates: dict[str, float]
    answers: dict[str, str]
    baseline: str | None
    error: str | None
    duration_s: float | None
    merge_s: float | None
    score_s: float | None
    stage: int | None
    items: int
    fitness_interval: tuple[float, float] | None
    duplicate_of: int | None
    attrs: dict

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def recipe(self) -> dict | None:
        return self.attrs.get(TrialKey.RECIPE)

    @property
    def method(self) -> str | None:
        """The merge method of a parameter-space trial (from its recipe)."""
        return (self.recipe or {}).get("method")

    @property
    def path_text(self) -> str | None:
        return self.attrs.get(TrialKey.PATH_TEXT)


@dataclass(frozen=True)
class Winner:
    """The trial a run stands for, and why it is that one."""

    trial: FrozenTrial
    reason: str


@dataclass(frozen=True)
class Ranking:
    """How a run's trials are ordered: its benchmarks' weights, and whether its last scoring stage
    scores every item (a trial raced onto it is measured, not estimated)."""

    weights: dict[str, float]
    n_stages: int = 1
    last_stage_all: bool = False

    @classmethod
    def of(cls, space) -> "Ranking":
        """The ranking of a `SearchSpace`'s runs."""
        return cls({b.name: b.weight for b in space.benchmarks}, len(space.stages), space.stages[-1] == "all")

    @property
    def tasks(self) -> list[str]:
        return list(self.weights)

    def fitness(self, values: Sequence[float]) -> float:
        """One number per trial: its value, or with one objective per benchmark their weighted mean."""
        weights = list(self.weights.values())
        if len(weights) == len(values) > 1:
            return weighted_mean(values, weights)
        return float(np.mean(values))

    def mean(self, scores: Mapping[str, float]) -> float:
        """Weighted mean of per-benchmark scores (the benchmarks present; nan when none is)."""
        names = [n for n in self.weights if n in scores]
        if not names:
            return float("nan")
        return weighted_mean([scores[n] for n in names], [self.weights[n] for n in names])

    def ranked(self, study: Study) -> list[FrozenTrial]:
        """Complete trials, best estimate first (several objectives: by their weighted mean)."""
        return sorted(complete_trials(study), key=lambda t: -self.fitness(t.values))

    def scored_on_every_item(self, trial: FrozenTrial) -> bool:
        return self.last_stage_all and trial.user_attrs.get(TrialKey.STAGE) == self.n_stages - 1

    def measured(self, study: Study) -> dict[int, dict[str, float]]:
        """Trial number -> accuracy per benchmark on every item: trials validation re-scored, and
        complete trials raced onto a last stage of every item (their estimates are measurements)."""
        measured = {}
        for trial in complete_trials(study):
            if self.scored_on_every_item(trial):
                measured[trial.number] = dict(trial.user_attrs.get(TrialKey.ESTIMATES, {}))
        measured.update(validated_accuracies(study))
        return measured

    def validated(self, study: Study) -> dict[int, dict[str, float]]:
        """Trial number -> accuracy per benchmark as validation found it: measured on every item
        (`measured`), or estimated by a validation race from its subset and a sample of the other
        items, the same sample for every trial it compared."""
        validated = {n: dict(v.get("accuracy", {})) for n, v in sampled_validations(study).items()}
        validated.update(self.measured(study))
        return validated

    def winner(self, study: Study) -> Winner | None:
        """The run's result: the best validated trial once any is validated (measured on every item,
        or the last ones standing in a validation race: a trial the race stopped behind another never
        wins, its figure rests on fewer items); else the best estimate, where estimates tied within the
        best one's interval go to the trial scored on the most items. None before the first complete trial."""
        ranked = self.ranked(study)
        if not ranked:
            return None
        complete = {t.number: t for t in ranked}
        measured = {n: scores for n, scores in self.measured(study).items() if n in complete}
        raced_out = {n for n, record in sampled_validations(study).items() if record.get("raced_out")}
        validated = {n: scores for n, scores in self.validated(study).items() if n in complete and n not in raced_out}
        if validated:
            number = max(validated, key=lambda n: (self.mean(validated[n]), self.fitness(complete[n].values), -n))
            if len(validated) == len(measured):
                return Winner(complete[number], f"best measured of {len(measured)} measured on every item")
            how = "measured on every item" if number in measured else "validated on a sample of the items"
            return Winner(complete[number], f"best of {len(validated)} validated ({how})")
        return self.preferred(ranked)

    def preferred(self, ranked: Sequence[FrozenTrial]) -> Winner:
        """Among estimates (``ranked``, best first), the trial to keep.

        Estimates that tie within the best trial's interval (at least its lower end)
        are not told apart by their values; among them the trial scored on the most
        items wins (then the higher estimate), since its figure is the better measured.
        """
        best = ranked[0]
        interval = best.user_attrs.get(TrialKey.FITNESS_INTERVAL)
        if not interval:
            return Winner(best, "best estimate")
        ties = [t for t in ranked if self.fitness(t.values) >= interval[0]]
        chosen = max(ties, key=lambda t: (trial_items(t), self.fitness(t.values)))
        if chosen is best:
            return Winner(best, "best estimate")
        return Winner(chosen, f"most items among {len(ties)} estimates within the best one's interval")

    def record(self, trial: FrozenTrial) -> TrialRecord:
        """``trial`` read as a typed record."""
        attrs = dict(trial.user_attrs)
        values = list(trial.values) if trial.values is not None else None
        complete = trial.state == TrialState.COMPLETE and values is not None
        baseline = attrs.get(TrialKey.BASELINE)
        if baseline is None and enqueued(trial):  # enqueued, by an evomerge that named none
            baseline = "enqueued"
        interval = attrs.get(TrialKey.FITNESS_INTERVAL)
        stage = attrs.get(TrialKey.STAGE)
        duplicate = attrs.get(TrialKey.DUPLICATE_OF)
        return TrialRecord(
            number=trial.number, state=trial.state.name, values=values,
            fitness=self.fitness(values) if complete else None, params=dict(trial.params),
            estimates={k: float(v) for k, v in attrs.get(TrialKey.ESTIMATES, {}).items()},
            answers=dict(attrs.get(TrialKey.ANSWERS, {})), baseline=baseline, error=attrs.get(TrialKey.ERROR),
            duration_s=trial.duration.total_seconds() if trial.duration is not None else None,
            merge_s=_float(attrs.get(TrialKey.MERGE_S)), score_s=_float(attrs.get(TrialKey.SCORE_S)),
            stage=None if stage is None else int(stage), items=trial_items(trial),
            fitness_interval=tuple(interval) if interval else None,
            duplicate_of=None if duplicate is None else int(duplicate), attrs=attrs,
        )

    def records(self, study: Study) -> list[TrialRecord]:
        """Every trial of the study (any state), as typed records, in trial order."""
        return [self.record(t) for t in study.get_trials(deepcopy=False)]
