"""A merge search: the candidate builder, the calibrated estimators and a study, wired together.

The run folder (`runs/NAME/`) holds a copy of the search space (data-flow
sources pinned), the Optuna SQLite storage (unless an RDB URL is given) and a
cache of the calibration. The calibration itself is stored in the study's
database (`evomerge.search.calibration`), so a resumed search, and every worker
on any machine, scores the same items with the same estimators and starts in seconds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from optuna.study import Study

from evomerge.console import say
from evomerge.estimate import SubsetEstimator
from evomerge.search.calibration import Calibration
from evomerge.search.candidates import CandidateBuilder, make_builder
from evomerge.search.costs import CostLedger, TrialCosts, phase_done, phase_label
from evomerge.search.data_statistics import UnlabelledSet, collect_statistics, unlabelled_sets
from evomerge.search.driver import SearchDriver, SearchSummary
from evomerge.search.genome import uniform_genome
from evomerge.search.optimizers import make_optimizer
from evomerge.search.plan import learning_plan
from evomerge.search.learning import CoefficientLearner
from evomerge.search.preflight import check_data_sources, check_inputs, needs_data
from evomerge.search.racing import StagedScorer
from evomerge.search.records import StudyKey, TrialKey, complete_trials, genome_key
from evomerge.search.runs import open_run_study
from evomerge.search.sources import pinned_trials, resolve_sources
from evomerge.search.space import SearchSpace, check_learnable
from evomerge.search.study import enqueue_first, enqueue_missing
from evomerge.search.workers import study_lock


def learned_label(space: SearchSpace) -> str:
    """How a learned genome is named in `status`, the report and the demo table."""
    granularity = {"global": "task-wise", "layer": "layer-wise"}.get(space.merge.granularity, "per layer group")
    return f"adamerging ({granularity}{', attention / mlp' if space.merge.split_modules else ''})"


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
        self.builder: CandidateBuilder = make_builder(resolve_sources(space, pinned_trials(self.run_dir)), self.run_dir)
        self.space = self.builder.space
        self.tokenizer = self.builder.tokenizer
        self.genome = self.builder.genome
        self.calibration = Calibration(self.space, self.run_dir, self.builder, self.benchmarks,
                                       progress=progress, batch_size=batch_size)
        self.estimators: dict[str, SubsetEstimator] = {}
        self._scorer: StagedScorer | None = None
        self._baseline_keys: set[tuple] | None = None
        self._unlabelled: dict[str, UnlabelledSet] | None = None

    def unlabelled(self) -> dict[str, UnlabelledSet]:
        """The benchmarks' unlabelled prompts (data statistics, coefficient learning), read once."""
        if self._unlabelled is None:
            self._unlabelled = unlabelled_sets(self.space, self.benchmarks, progress=self.progress)
        return self._unlabelled

    def prepare(self, study: Study | None = None) -> None:
        """Collect the data statistics the merge method reads (before calibration: its merges need them),
        then fit or load each benchmark's estimator (`Calibration.estimators`)."""
        if needs_data(self.space):
            collect_statistics(self.space, self.run_dir, self.builder, self.unlabelled(), study, self.progress)
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
        learned = study.user_attrs.get(StudyKey.LEARNED, {})
        if learned:  # a learned genome is scored until a trial of it completes (a kill mid-scoring loses nothing)
            with study_lock(study, "baselines"):
                enqueue_missing(study, [(entry["genome"], {TrialKey.BASELINE: label}) for label, entry in learned.items()])
        return study

    def learn(self, study: Study) -> dict[str, float]:
        """The space's coefficients learned from unlabelled prompts (AdaMerging, `evomerge.search.learning`),
        kept in the study at once (a kill afterwards loses nothing) and enqueued as a named trial; a study
        that holds them, learned with the same settings, is not taught again."""
        label = learned_label(self.space)
        settings = dataclasses.asdict(self.space.learn)
        stored = dict(study.user_attrs.get(StudyKey.LEARNED, {}))
        if label not in stored or stored[label].get("settings") != settings:
            check_learnable(self.space.merge.method)
            check_data_sources(self.space, "evomerge learn")
            core = self.builder.core
            learning_plan(core.plan, core.layout, core.budgets)  # refused here when it cannot fit
            learner = CoefficientLearner(self.builder, self.unlabelled(), {b.name: b.weight for b in self.space.benchmarks},
                                         self.space.learn, seed=self.space.data.seed)
            if self.progress:
                say(f"learning {len(learner.names)} coefficients ({label}) on the entropy of the merged model's "
                    f"answers to {sum(len(s.items) for s in self.unlabelled().values())} unlabelled prompts")
            with CostLedger(study, "learning").timed(say if self.progress else None) as ledger:  # prompts read and seconds, in the study
                result = learner.learn(progress=self.progress)
                ledger.add(items=result.prompts, models=1)
            stored[label] = {"genome": result.genome, "settings": settings, "seconds": round(result.seconds, 2),
                             "loss_first": result.losses[0], "loss_last": result.losses[-1]}
            study.set_user_attr(StudyKey.LEARNED, stored)
        genome = stored[label]["genome"]
        enqueue_missing(study, [(genome, {TrialKey.BASELINE: label})])
        return genome

    def start_at(self, study: Study, values: dict[str, float]) -> dict[str, float]:
        """The genome of ``values`` everywhere (``optimizer.init``), enqueued as a named trial: CMA-ES's mean
        starts there and the search never ends below it."""
        genome = uniform_genome(self.builder.genes, values)
        label = "start: " + ", ".join(f"{name} {value:g}" for name, value in values.items())
        with study_lock(study, "baselines"):
            enqueue_missing(study, [(genome, {TrialKey.BASELINE: label})])
        return genome

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
        if self.builder.inert:
            say(f"not searched: the coefficients of {', '.join(sorted(self.builder.inert))} (no expert changes "
                f"their tensors; {len(self.builder.genes)} genes left)")
        self.prepare(study)
        init = self.space.optimizer_init
        start = self.learn(study) if init == "learned" else self.start_at(study, init) if init else None
        optimizer = make_optimizer(self.space.optimizer, self.genome, self.directions, seed=self.space.seed,
                                   budget=budget, start=start)
        driver = SearchDriver(study, optimizer, progress=self.progress)
        self.scorer.bind(study)
        costs = TrialCosts(CostLedger(study, "trials"))  # items and seconds of the trials, in the study
        before = costs.ledger.cost
        if self.progress:
            say(f"{phase_label('trials')}: started ({max(budget - len(complete_trials(study)), 0)} trials to go; "
                "the bar shows the time left)")
        try:
            summary = driver.run(self.objective, budget, callbacks=[costs])
        except BaseException:
            costs.close(best_effort=True)  # never hides what stopped the run
            raise
        costs.close()
        if self.progress:
            say(phase_done("trials", costs.ledger.cost.items - before.items, costs.ledger.cost.seconds - before.seconds))
        return study, summary
