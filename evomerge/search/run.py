"""A merge search: the candidate builder, the calibrated estimators and a study, wired together.

The run folder (`runs/NAME/`) holds a copy of the search space (data-flow
sources pinned), the Optuna SQLite storage (unless an RDB URL is given) and a
cache of the calibration. The calibration itself is stored in the study's
database (`evomerge.search.calibration`), so a resumed search, and every worker
on any machine, scores the same items with the same estimators and starts in seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from optuna.study import Study

from evomerge.console import say
from evomerge.estimate import SubsetEstimator
from evomerge.search.calibration import Calibration
from evomerge.search.candidates import CandidateBuilder, make_builder
from evomerge.search.driver import SearchDriver, SearchSummary
from evomerge.search.optimizers import make_optimizer
from evomerge.search.preflight import check_inputs
from evomerge.search.racing import StagedScorer
from evomerge.search.records import StudyKey, TrialKey, complete_trials, genome_key
from evomerge.search.runs import open_run_study
from evomerge.search.sources import pinned_trials, resolve_sources
from evomerge.search.space import SearchSpace
from evomerge.search.study import enqueue_first
from evomerge.search.workers import study_lock


def _synchronize(device) -> None:
    """Wait for queued GPU work, so a timing covers the work and not just its launch."""
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.synchronize()


class MergeSearch:
    """Everything one search process needs, prepared once; `objective` scores one genome.

    The candidate builder (`evomerge.search.candidates`) holds the loaded weights and
    makes the model of a genome: a parameter-space merge or a data-flow path. A run
    named as a data-flow source is resolved here (or taken as this run folder pinned it).
    """

    def __init__(self, space: SearchSpace, run_dir: str | Path, *, storage: str | None = None,
                 progress: bool = True, batch_size: int = 128):
        self.run_dir = Path(run_dir)
        self.storage = storage
        self.progress = progress
        self.batch_size = batch_size
        self.benchmarks = check_inputs(space)  # seconds, before any weight is loaded
        self.builder: CandidateBuilder = make_builder(resolve_sources(space, pinned_trials(self.run_dir)))
        self.space = self.builder.space
        self.tokenizer = self.builder.tokenizer
        self.genome = self.builder.genome
        self.calibration = Calibration(self.space, self.run_dir, self.builder, self.benchmarks,
                                       progress=progress, batch_size=batch_size)
        self.estimators: dict[str, SubsetEstimator] = {}
        self._scorer: StagedScorer | None = None
        self._baseline_keys: set[tuple] | None = None

    def prepare(self, study: Study | None = None) -> None:
        """Fit or load each benchmark's estimator (`Calibration.estimators`)."""
        self.estimators = self.calibration.estimators(study)

    # ------------------------------------------------------------ objective
    def objective(self, params: dict[str, float]) -> tuple[list[float], dict]:
        """Build the genome's model in memory, score it stage by stage (`racing.py`), return its estimates.

        The trial also keeps where its time went (`merge_s`, `score_s`; `evomerge report` plots them).
        """
        started = time.perf_counter()
        candidate = self.builder.candidate(params)
        _synchronize(self.builder.device)
        merged = time.perf_counter()
        values, attrs = self.scorer.score(candidate.model, self.tokenizer, promote=not self._is_baseline(params))
        timings = {TrialKey.MERGE_S: merged - started, TrialKey.SCORE_S: time.perf_counter() - merged}
        return values, {**attrs, **candidate.attrs, **timings}

    def _is_baseline(self, params: dict[str, float]) -> bool:
        """Whether the genome is one of the enqueued baselines (racing scores those on its first stage only)."""
        if self._baseline_keys is None:
            self._baseline_keys = {genome_key(g) for g in self.baseline_genomes().values()} if self.space.baselines else set()
        return genome_key(params) in self._baseline_keys

    @property
    def scorer(self) -> StagedScorer:
        """Stage-by-stage scoring with this search's estimators (after `prepare`)."""
        if self._scorer is None:
            evaluation = self.space.evaluation
            self._scorer = StagedScorer(
                self.benchmarks, self.estimators, method=self.space.estimator,
                weights=[b.weight for b in self.space.benchmarks], per_task=self.space.objectives == "per_task",
                top_k=evaluation.top_k if evaluation else 1, level=evaluation.level if evaluation else 0.9,
                batch_size=self.batch_size)
        return self._scorer

    # ------------------------------------------------------------ study
    @property
    def directions(self) -> list[str]:
        count = len(self.space.benchmarks) if self.space.objectives == "per_task" else 1
        return ["maximize"] * count

    def baseline_genomes(self) -> dict[str, dict[str, float]]:
        """Named genomes the search starts from, so it never ends below them (see the builder)."""
        return self.builder.baseline_genomes()

    def open(self) -> Study:
        """Create or continue the run's study (see `evomerge.search.runs`), baselines enqueued first."""
        config = {**self.space.study_config(), **self.builder.study_config(),
                  "genome": {k: list(v) for k, v in self.genome.items()}}
        study = open_run_study(self.run_dir, self.space, self.storage, self.directions, config)
        genes = {name: gene.to_list() for name, gene in self.builder.genes.items()}
        if study.user_attrs.get(StudyKey.GENES) != genes:
            study.set_user_attr(StudyKey.GENES, genes)  # the genome's structure, for reports
        if self.space.baselines:
            baselines = [(genome, {TrialKey.BASELINE: label}) for label, genome in self.baseline_genomes().items()]
            with study_lock(study, "baselines"):  # workers starting together: one enqueues them
                enqueue_first(study, baselines)
        return study

    def run(self, n_trials: int | None = None) -> tuple[Study, SearchSummary]:
        """Start or continue the search until the study holds the budget of complete trials.

        The study is opened before calibration, so a run killed while calibrating
        is a run folder that `evomerge resume` continues from its cache.
        """
        budget = self.space.trials if n_trials is None else n_trials
        study = self.open()
        done = len(complete_trials(study))
        say(f"{'resuming' if done else 'starting'} search {self.space.name!r} in {self.run_dir}"
            + (f" ({done} of {budget} trials complete)" if done else ""))
        self.prepare(study)
        optimizer = make_optimizer(self.space.optimizer, self.genome, self.directions, seed=self.space.seed, budget=budget)
        driver = SearchDriver(study, optimizer, progress=self.progress)
        self.scorer.bind(study)
        return study, driver.run(self.objective, budget)
