"""Staged scoring of a candidate: spend benchmark items on the candidates that can still win.

Each benchmark's estimator holds nested stages of items, fixed at calibration
(`evaluation: {stages: [10, 30, 100], top_k: 5}` in the space; one stage without
it). A candidate is scored on the first stage; while the upper end of its fitness
interval still reaches the current ``top_k``-th best fitness of the study's
complete trials, it is promoted to the next stage, where only the new items are
scored and the estimate is redone from every answer so far. The others stop.
The enqueued baselines (base, each expert alone, uniform merges) are reference
points scored on the first stage only: while fewer than ``top_k`` trials are
complete every candidate is promoted, and the baselines come first, so racing
them would spend the largest stages on models calibration already measured.

Whatever the stage reached, the trial reports one set of values (the estimates
of its last stage), so every optimizer works unchanged. A trial keeps its stage,
the items it was scored on and its intervals as user attrs; a trial killed
between stages was never told, so a resumed study fails it like any other
interrupted trial. The threshold is read from the study's storage, so workers
sharing a study race against each other's results.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from optuna.study import Study

from evomerge.benchmarks import score_records
from evomerge.estimate import SubsetEstimator
from evomerge.search.records import Ranking, TrialKey, complete_trials


def answers_string(correct: np.ndarray) -> str:
    """Subset answers stored on a trial as a compact '0101...' string."""
    return "".join("1" if c else "0" for c in correct)


class StagedScorer:
    """Scores a model stage by stage and decides promotions; one instance per search process."""

    def __init__(self, benchmarks: Mapping[str, Any], estimators: Mapping[str, SubsetEstimator], *,
                 method: str, weights: Sequence[float], per_task: bool, top_k: int = 5,
                 level: float = 0.9, batch_size: int = 128):
        self.benchmarks = dict(benchmarks)
        self.estimators = dict(estimators)
        self.method, self.per_task = method, per_task
        self.weights = np.asarray(weights, dtype=float)
        self.ranking = Ranking(dict(zip(self.benchmarks, map(float, weights))))
        self.top_k, self.level, self.batch_size = top_k, level, batch_size
        counts = {len(e.stages) for e in self.estimators.values()}
        if len(counts) != 1:
            raise ValueError(f"estimators disagree on the number of stages: {counts}")
        self.n_stages = counts.pop()
        self._study = None

    def bind(self, study: Study) -> None:
        """The study whose complete trials set the promotion threshold."""
        self._study = study

    def threshold(self) -> float | None:
        """The ``top_k``-th best fitness among complete trials (None while there are fewer)."""
        if self._study is None:
            return None
        trials = complete_trials(self._study)
        if len(trials) < self.top_k:
            return None
        scores = sorted((self.ranking.fitness(t.values) for t in trials), reverse=True)
        return scores[self.top_k - 1]

    def score(self, model, tokenizer, *, promote: bool = True) -> tuple[list[float], dict]:
        """Values for the optimizer and the trial's attrs, after the last stage the model reached
        (the first stage only when ``promote`` is false)."""
        answered: dict[str, dict[int, bool]] = {name: {} for name in self.benchmarks}
        margins: dict[str, dict[int, float]] = {name: {} for name in self.benchmarks}   # where the kind gives them
        by_stage = []
        for stage in range(self.n_stages):
            estimates, answers = {}, {}
            for name, bench in self.benchmarks.items():
                estimator = self.estimators[name]
                indices = estimator.stage_indices(stage)
                new = [int(i) for i in indices if int(i) not in answered[name]]
                if new:
                    scored = score_records(model, tokenizer, bench, indices=new, batch_size=self.batch_size,
                                           records=False)
                    answered[name].update(zip(new, np.asarray(scored.correct, dtype=bool).tolist()))
                    if scored.margins is not None:
                        margins[name].update(zip(new, np.asarray(scored.margins, dtype=float).tolist()))
                answers[name] = np.array([answered[name][int(i)] for i in indices], dtype=bool)
                estimates[name] = estimator.estimate(
                    answers[name], self.method, stage=stage, level=self.level,
                    subset_margins=np.array([margins[name].get(int(i), np.nan) for i in indices]))
            value, margin = self._fitness(estimates)
            by_stage.append(value)
            if stage == self.n_stages - 1 or not promote or not self._promote(value + margin):
                break
        per_task = [estimates[name].value for name in self.benchmarks]
        values = per_task if self.per_task else [value]
        attrs = {
            TrialKey.ESTIMATES: {name: e.value for name, e in estimates.items()},
            TrialKey.ANSWERS: {name: answers_string(a) for name, a in answers.items()},
            TrialKey.INTERVALS: {name: [e.low, e.high] for name, e in estimates.items()},
            TrialKey.FITNESS_INTERVAL: [max(0.0, value - margin), min(1.0, value + margin)],
            TrialKey.STAGE: stage,
            TrialKey.ITEMS: int(sum(len(a) for a in answers.values())),
            TrialKey.STAGE_FITNESS: by_stage,
        }
        return values, attrs

    def _fitness(self, estimates) -> tuple[float, float]:
        """Weighted mean of the benchmarks' estimates and its margin (benchmarks' errors independent)."""
        share = self.weights / self.weights.sum()
        value = float(np.dot(share, [estimates[n].value for n in self.benchmarks]))
        margin = float(np.sqrt(np.sum((share * [estimates[n].margin for n in self.benchmarks]) ** 2)))
        return value, margin

    def _promote(self, upper: float) -> bool:
        threshold = self.threshold()
        return threshold is None or upper >= threshold
