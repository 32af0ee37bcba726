"""Calibration: score the calibration models, fit each benchmark's subset estimator, once per study.

The calibration models are the base, the experts, any extra models (the
endpoints) and a few random merges in the space; their answers fit the IRT item
parameters from which each benchmark's subset and estimator are made. What each
one answers (docs/search.md, "What a search costs"):

* **fitting the items here** (no known parameters): the endpoints answer every
  item; the subsets are chosen from their fit; each calibration merge answers
  the subsets' items and ``calibration_items`` random others (all items with
  ``calibration_items: all``, the subsets then chosen from the whole fit); the
  fitted estimator goes to the item bank (`item_bank`) for later studies;
* **known item parameters** (the item bank holds this benchmark's, or a file names
  them): the endpoints answer the subsets' items only, for their abilities;
  the bank's subsets and cross-validated mixes are kept when the space asks for
  the same stages, else the subsets come from the parameters and the mixes from
  the calibration merges (on the subsets and a sample), if any.

With a study, the calibration lives in the study's database (`calibration_store`):
loaded when stored, else made by exactly one worker under the study's lock while the
others wait, then stored. The run folder's ``responses/`` and ``estimators/`` are a
cache either way, so a run killed while calibrating continues from the answers it had.
Items scored and seconds spent go to the study's cost record (`costs`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from optuna.study import Study

from evomerge.benchmarks import Benchmark, score_records
from evomerge.console import say
from evomerge.errors import EvomergeError
from evomerge.estimate import (ItemParams, ResponseMatrix, SubsetEstimator, fit_abilities, fit_subset_estimator,
                               responses_path, sample_items, subsets_from_item_params, subsets_from_responses)
from evomerge.estimate.extract import Subset, stage_sizes, strategy_name
from evomerge.files import read_json, write_json
from evomerge.search.calibration_store import CalibrationStore, canonical
from evomerge.search.candidates import CandidateBuilder, load_checkpoint
from evomerge.search.costs import CostLedger
from evomerge.search.item_bank import BankEntry, ItemBank
from evomerge.search.optimizers import Choices
from evomerge.search.space import SearchSpace
from evomerge.search.workers import study_lock

CALIBRATION_FILE = "calibration.json"
LARGE_BENCHMARK_RATIO = 2
"""Calibration says how to study less of a benchmark when its endpoints alone answer this many times the trials'."""
ESTIMATORS_DIR = "estimators"

ModelMaker = Callable[[], tuple[object, object]]


def estimator_path(run_dir: str | Path, benchmark: str) -> Path:
    return Path(run_dir) / ESTIMATORS_DIR / f"{benchmark}.json"


def staged_items(subsets: list[Subset]) -> np.ndarray:
    """Every item of the stages a candidate may be scored on (an exact stage, all items, excluded)."""
    items = [s.indices for s in subsets if len(s.indices) < s.n_total]
    return np.unique(np.concatenate(items)) if items else np.zeros(0, dtype=np.int64)


def random_genome(bounds: dict, rng: np.random.Generator) -> dict:
    """One genome drawn uniformly: each gene within its (low, high), a categorical one among its choices."""
    return {name: str(rng.choice(list(b))) if isinstance(b, Choices) else float(rng.uniform(*b))
            for name, b in bounds.items()}


class Calibration:
    """The calibration of one run: which models it scores on which items, what it depends on, and the
    estimators it fits. ``bank``: where item parameters are kept between studies (default: beside the run)."""

    def __init__(self, space: SearchSpace, run_dir: str | Path, builder: CandidateBuilder,
                 benchmarks: dict[str, Benchmark], *, progress: bool = True, batch_size: int = 128,
                 bank: ItemBank | None = None):
        self.space, self.run_dir, self.builder = space, Path(run_dir), builder
        self.benchmarks = benchmarks
        self.progress, self.batch_size = progress, batch_size
        self.bank = bank if bank is not None else ItemBank.beside(self.run_dir)

    def genomes(self) -> dict[str, dict[str, float]]:
        """Random in-space merges whose answers sharpen the IRT item parameters and fit the mixes."""
        rng = np.random.default_rng(self.space.seed + 7919)
        return {f"calib{i}": random_genome(self.builder.genome, rng) for i in range(self.space.calibration_merges)}

    def endpoint_names(self) -> list[str]:
        return ["base", *self.space.expert_names, *self.builder.extra_endpoints()]

    def _endpoints(self) -> Iterator[tuple[str, ModelMaker]]:
        """(name, maker of (model, tokenizer)) of the base, experts, extra models and extra endpoints."""
        tokenizer = self.builder.tokenizer
        for name, path in [("base", self.space.base), *self.space.experts.items()]:
            # scored in the builder's own model where it can: no second copy on the GPU
            yield name, lambda path=path: (self.builder.checkpoint_model(path), tokenizer)
        for path in self.space.extra_models:  # another model family may come with its own tokenizer
            yield f"extra:{Path(path).name}", lambda path=path: load_checkpoint(path, self.builder.dtype,
                                                                                 self.builder.device)
        for name, model in self.builder.extra_endpoints().items():
            yield name, lambda model=model: (model, tokenizer)

    def _merges(self) -> Iterator[tuple[str, ModelMaker]]:
        tokenizer = self.builder.tokenizer
        for name, genome in self.genomes().items():
            yield name, lambda genome=genome: (self.builder.candidate(genome).model, tokenizer)

    def inputs(self) -> dict:
        """What the calibration depends on: the responses on the models, merge space and benchmarks
        (and how many items the calibration merges answer); the estimators also on the estimator settings."""
        raw = self.space.raw
        estimator = dict(raw.get("estimator") or {})
        responses = {key: raw.get(key) for key in ("models", "merge", "dfs", "benchmarks", "device")}
        responses["calibration"] = [estimator.get("extra_models"), estimator.get("calibration_merges"), self.space.seed]
        design = {key: estimator[key] for key in ("calibration_items", "item_params") if key in estimator}
        if design:  # only where the space names them: studies from before keep their inputs
            responses["calibration"].append(design)
        return canonical({"responses": responses, "estimators": estimator})

    def _drop_stale_cache(self) -> None:
        """Forget cached responses / estimators made for another space (replaced before any trial)."""
        record = self.run_dir / CALIBRATION_FILE
        inputs = self.inputs()
        stored = read_json(record, "calibration record") if record.exists() else inputs  # older folders: trusted
        if stored.get("responses") != inputs["responses"]:
            shutil.rmtree(self.run_dir / "responses", ignore_errors=True)
        if stored != inputs:
            shutil.rmtree(self.run_dir / ESTIMATORS_DIR, ignore_errors=True)
        write_json(record, inputs)

    def estimators(self, study: Study | None = None) -> dict[str, SubsetEstimator]:
        """Each benchmark's estimator: fitted here, or loaded from the study's storage or the folder's cache.

        With ``study`` on a database storage the calibration is shared: loaded when stored,
        else made by one worker under the study's lock while the others wait.
        """
        self._drop_stale_cache()
        ledger = CostLedger(study, "calibration")
        store = CalibrationStore.of(study) if study is not None else None
        if store is None:
            with ledger.timed(say if self.progress else None):
                return self._calibrate(None, ledger)
        inputs = self.inputs()
        stored, mine = store.estimators(inputs), False
        if stored is None:
            def done() -> bool:
                nonlocal stored
                stored = store.estimators(inputs)
                return stored is not None

            with study_lock(study, "calibration", wait=say if self.progress else None, done=done) as mine:
                if mine and not done():
                    with ledger.timed(say if self.progress else None):
                        if store.get_json("inputs") != inputs:
                            store.clear()  # made for another space of this study name (no trial was kept)
                            store.put_json("inputs", inputs)
                        for name, estimator in self._calibrate(store, ledger).items():
                            store.put_json(f"estimators/{name}", estimator.to_dict())
                        store.put_json("complete", list(self.benchmarks))
                    stored = store.estimators(inputs)  # what every worker loads, this one included
        where = f"the stored calibration of study {self.space.name!r}"
        missing = set(self.benchmarks) - set(stored)
        if missing:
            raise EvomergeError(f"{where} has no estimator for {sorted(missing)}")
        estimators = {}
        for name in self.benchmarks:
            estimators[name] = checked_stages(stored[name], self.space, where)
            stored[name].save(estimator_path(self.run_dir, name))  # the folder's cache
            responses = store.get_responses(name)
            if responses is not None and not responses_path(self.run_dir, name).exists():
                responses.save(responses_path(self.run_dir, name))
        if self.progress and not mine:
            say(f"loaded the calibration of study {self.space.name!r} from its storage")
        return estimators

    def _calibrate(self, store: CalibrationStore | None, ledger: CostLedger) -> dict[str, SubsetEstimator]:
        """Fit (or load from the folder's cache) each benchmark's estimator; with ``store``,
        responses are stored after every model, so a worker taking over continues from them."""
        estimators = {}
        for bench_name, bench in self.benchmarks.items():
            path = estimator_path(self.run_dir, bench_name)
            if path.exists():
                estimators[bench_name] = checked_stages(SubsetEstimator.load(path), self.space, path)
                continue
            estimator = self._fit(bench_name, bench, store, ledger)
            if self.space.estimator == "margin" and estimator.margin_model is None and self.progress:
                say(f"{bench_name}: no margins to read (its kind gives none, or the endpoints answered the subsets "
                    "only, or fewer than 2 calibration merges answered beyond them): the margin estimator is "
                    "gmp-IRT there")
            estimator.save(path)
            estimators[bench_name] = estimator
        return estimators

    # ------------------------------------------------------------ one benchmark
    def _known(self, bench_name: str, bench: Benchmark) -> ItemParams | BankEntry | None:
        """The benchmark's item parameters when they are known: a file the space names, or the bank's entry."""
        params = self.space.item_params
        if isinstance(params, dict) and bench_name in params:
            return ItemParams.load(params[bench_name]).for_items([item.id for item in bench.items], bench_name)
        if params == "reuse" or isinstance(params, dict):
            return self.bank.load(bench_name, bench, self.space.irt_dims)
        return None

    def _fit(self, bench_name: str, bench: Benchmark, store: CalibrationStore | None,
             ledger: CostLedger) -> SubsetEstimator:
        """One benchmark's estimator: its item parameters fitted here, or known (the bank's, a file's)."""
        sizes = stage_sizes(self.space.stages, len(bench.items), "evaluation.stages")
        strategy = strategy_name(self.space.strategy)
        scorer = _Scorer(self, bench_name, bench, store, ledger)
        known = self._known(bench_name, bench)
        if known is None:
            estimator = self._fit_items(scorer, sizes, strategy)
            self.bank.store(bench_name, bench, estimator, strategy, self.space.name,
                            len(scorer.matrix.model_names))
            return estimator
        if isinstance(known, BankEntry) and known.stages_match(sizes, strategy):
            return self._reuse(scorer, known)
        params = known if isinstance(known, ItemParams) else ItemParams(
            known.estimator.a, known.estimator.b, known.estimator.item_ids, source=str(known.path))
        return self._with_params(scorer, params, sizes, strategy)

    def _fit_items(self, scorer: "_Scorer", sizes: list[int], strategy: str) -> SubsetEstimator:
        """The endpoints on every item, the subsets from them, the calibration merges on the subsets and
        a sample (every item with ``calibration_items: all``, the subsets then from the whole fit unless
        the estimator reads margins)."""
        seed, dims, endpoints = self.space.seed, self.space.irt_dims, self.endpoint_names()
        full = self.space.calibration_items is None
        scorer.say(f"fitting its item parameters: the endpoints on all {scorer.matrix.n_items} items, "
                   + (f"{self.space.calibration_merges} calibration merges too" if full else
                      f"{self.space.calibration_merges} calibration merges on the subsets' items and "
                      f"{self.space.calibration_items} others each"))
        endpoint_answers, trial_answers = len(endpoints) * scorer.matrix.n_items, self.space.trials * sizes[0]
        if endpoint_answers > LARGE_BENCHMARK_RATIO * trial_answers:
            scorer.say(f"the endpoints' {endpoint_answers:,} answers are {endpoint_answers / trial_answers:.0f}x "
                       f"what {self.space.trials} trials answer: a benchmark entry's `sample: N` studies a random "
                       "N of its items; item parameters from a file (estimator.item_params) or from the item "
                       "bank (a second study of these items) skip it (docs/search.md, \"What a search costs\")")
        matrix = scorer.score(self._endpoints(), None)
        # the margin estimator fits a merge's line on the subset: subsets chosen from the merges' own fit
        # favour the items where merges leave their endpoints' line, and bias it (docs/estimate.md)
        from_endpoints = not full or self.space.estimator == "margin"
        subsets = subsets_from_responses(matrix.subset([n for n in endpoints if n in matrix.model_names]), sizes,
                                         strategy, seed, dims) if from_endpoints else None
        matrix = scorer.score(self._merges(), None if full else self._samples(subsets, matrix.n_items))
        return fit_subset_estimator(matrix, None, endpoints, sizes, strategy, seed, dims, subsets=subsets,
                                    benchmark=scorer.bench_name)

    def _reuse(self, scorer: "_Scorer", known: BankEntry) -> SubsetEstimator:
        """The bank's estimator (item parameters, subsets, mixes) with this study's endpoints, whose
        abilities come from their answers on the subsets' items."""
        stored, endpoints = known.estimator, self.endpoint_names()
        staged = staged_items([stage.subset for stage in stored.stages])
        scorer.say(f"reusing the item parameters and subsets of study {known.study!r} ({known.path}); "
                   f"the endpoints on the subsets' {len(staged)} items")
        rows = scorer.score(self._endpoints(), lambda name: staged).subset(endpoints)
        theta = fit_abilities(rows.correct, rows.mask, stored.a, stored.b, stored.theta_sd)
        return dataclasses.replace(stored, endpoint_names=list(endpoints), endpoint_theta=theta,
                                   benchmark=scorer.bench_name)

    def _with_params(self, scorer: "_Scorer", params: ItemParams, sizes: list[int], strategy: str) -> SubsetEstimator:
        """Known item parameters without a study's subsets (a file; the bank's for other stages): the
        subsets from the parameters, the endpoints on their items, the mixes from the calibration merges."""
        subsets = subsets_from_item_params(params.a, params.b, sizes, strategy, self.space.seed,
                                           first=params.first_stage(sizes[0]))
        staged = staged_items(subsets)
        merges = self.space.calibration_merges
        scorer.say(f"item parameters from {params.source}; the endpoints on the subsets' {len(staged)} items"
                   + (f", {merges} calibration merges on those and {self.space.calibration_items or 'all'} "
                      "others each" if merges else ""))
        scorer.score(self._endpoints(), lambda name: staged)
        matrix = scorer.score(self._merges(), self._samples(subsets, scorer.matrix.n_items))
        fallback = {} if params.anchor_weight is None else {"fallback_anchor_weight": params.anchor_weight}
        return fit_subset_estimator(matrix, None, self.endpoint_names(), sizes, strategy, self.space.seed,
                                    params.dims, subsets=subsets, item_params=(params.a, params.b),
                                    benchmark=scorer.bench_name, **fallback)

    def _samples(self, subsets: list[Subset], n_total: int) -> Callable[[str], np.ndarray]:
        """Which items each calibration merge answers: the stages' items and its own random sample of the others."""
        staged = staged_items(subsets)
        names = list(self.genomes())
        if self.space.calibration_items is None:
            return lambda name: np.arange(n_total)
        samples = sample_items(n_total, staged, len(names), self.space.calibration_items, self.space.seed)
        return lambda name: np.union1d(staged, samples[names.index(name)])


class _Scorer:
    """Scores calibration models on a benchmark, skipping answers the cache or the study already holds."""

    def __init__(self, calibration: Calibration, bench_name: str, bench: Benchmark,
                 store: CalibrationStore | None, ledger: CostLedger):
        self.calibration, self.bench_name, self.bench = calibration, bench_name, bench
        self.store, self.ledger = store, ledger
        self.path = responses_path(calibration.run_dir, bench_name)
        matrix = ResponseMatrix.load(self.path) if self.path.exists() else None
        if store is not None:
            matrix = merged(matrix, store.get_responses(bench_name))
        ids = [item.id for item in bench.items]
        self.matrix = matrix if matrix is not None and matrix.item_ids == ids else ResponseMatrix.empty(ids, bench_name)

    def say(self, what: str) -> None:
        if self.calibration.progress:
            where = f"cached in {self.calibration.run_dir}" + (" and the study's storage" if self.store else "")
            say(f"calibrating the {self.bench_name} estimator ({where}): {what}")

    def score(self, models: Iterator[tuple[str, ModelMaker]], items: Callable[[str], np.ndarray] | None) -> ResponseMatrix:
        """Each model's answers on ``items(name)`` (every item when None) that are not known yet."""
        for name, make in models:
            wanted = np.arange(self.matrix.n_items) if items is None else np.asarray(items(name), dtype=np.int64)
            seen = self.matrix.observed_row(name) if name in self.matrix.model_names else None
            todo = wanted if seen is None else wanted[~seen[wanted]]
            if len(todo) == 0:
                continue
            model, tokenizer = make()
            scored = score_records(model, tokenizer, self.bench,
                                   indices=None if len(todo) == self.matrix.n_items else todo,
                                   batch_size=self.calibration.batch_size, progress=self.calibration.progress,
                                   records=False)
            self.matrix = self.matrix.with_answers(name, todo, np.asarray(scored.correct, dtype=bool), scored.margins)
            self.ledger.add(items=len(todo), models=1)
            self.matrix.save(self.path)
            if self.store is not None:
                self.store.put_responses(self.bench_name, self.matrix)
        if self.store is not None:
            self.store.put_responses(self.bench_name, self.matrix)  # also responses that came from the folder's cache
        return self.matrix


def merged(local: ResponseMatrix | None, stored: ResponseMatrix | None) -> ResponseMatrix | None:
    """The folder's cached responses with what only the study's storage holds added (models, or
    answers to more items)."""
    if local is None or stored is None:
        return local if stored is None else stored
    if local.item_ids != stored.item_ids:
        return stored
    for name in stored.model_names:
        seen = stored.observed_row(name)
        if name not in local.model_names or seen.sum() > local.observed_row(name).sum():
            local = local.with_model(name, stored.row(name), seen, stored.margin_row(name))
    return local


def checked_stages(estimator: SubsetEstimator, space: SearchSpace, where) -> SubsetEstimator:
    """A cached estimator must have the stages the space asks for (they are fixed at calibration)."""
    want = stage_sizes(space.stages, estimator.n_total, "evaluation.stages")
    have = [stage.size for stage in estimator.stages]
    if have != want:
        raise EvomergeError(f"{where} was calibrated for stages {have}, the space asks for {want}; "
                            "delete it to recalibrate (or start a new run)")
    return estimator
