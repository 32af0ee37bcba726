"""Calibration: score the calibration models on every item, fit each benchmark's subset estimator, once per study.

The calibration models are the base, the experts, any extra models and a few
random merges in the space; their full responses fit the IRT item parameters
from which each benchmark's subset and estimator are made. With a study, the
calibration lives in the study's database (`calibration_store`): loaded when
stored, else made by exactly one worker under the study's lock while the others
wait, then stored. The run folder's ``responses/`` and ``estimators/`` are a
cache either way, so a run killed while calibrating continues from the models
it had scored.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from optuna.study import Study

from evomerge.benchmarks import Benchmark, score_items
from evomerge.console import say
from evomerge.errors import EvomergeError
from evomerge.estimate import ResponseMatrix, SubsetEstimator, fit_subset_estimator, responses_path
from evomerge.estimate.extract import stage_sizes, strategy_name
from evomerge.files import read_json, write_json
from evomerge.search.calibration_store import CalibrationStore, canonical
from evomerge.search.candidates import CandidateBuilder, load_checkpoint
from evomerge.search.optimizers import Choices
from evomerge.search.space import SearchSpace
from evomerge.search.workers import study_lock

CALIBRATION_FILE = "calibration.json"
ESTIMATORS_DIR = "estimators"


def estimator_path(run_dir: str | Path, benchmark: str) -> Path:
    return Path(run_dir) / ESTIMATORS_DIR / f"{benchmark}.json"


class Calibration:
    """The calibration of one run: which models it scores, what it depends on, and the estimators it fits."""

    def __init__(self, space: SearchSpace, run_dir: str | Path, builder: CandidateBuilder,
                 benchmarks: dict[str, Benchmark], *, progress: bool = True, batch_size: int = 128):
        self.space, self.run_dir, self.builder = space, Path(run_dir), builder
        self.benchmarks = benchmarks
        self.progress, self.batch_size = progress, batch_size

    def genomes(self) -> dict[str, dict[str, float]]:
        """Random in-space merges whose full responses sharpen the IRT item parameters."""
        rng = np.random.default_rng(self.space.seed + 7919)
        def draw(bounds):
            return str(rng.choice(list(bounds))) if isinstance(bounds, Choices) else float(rng.uniform(*bounds))

        return {f"calib{i}": {n: draw(b) for n, b in self.builder.genome.items()}
                for i in range(self.space.calibration_merges)}

    def endpoint_names(self) -> list[str]:
        return ["base", *self.space.expert_names, *self.builder.extra_endpoints()]

    def _models(self, known: set[str]) -> Iterator[tuple[str, object, object]]:
        """(name, model, tokenizer) for the endpoints, extra models and calibration merges not in ``known``."""
        tokenizer = self.builder.tokenizer
        for name, path in [("base", self.space.base), *self.space.experts.items()]:
            if name not in known:  # scored in the builder's own model where it can: no second copy on the GPU
                yield name, self.builder.checkpoint_model(path), tokenizer
        for path in self.space.extra_models:
            name = f"extra:{Path(path).name}"
            if name not in known:  # another model family may come with its own tokenizer
                yield name, *load_checkpoint(path, self.builder.dtype, self.builder.device)
        for name, model in self.builder.extra_endpoints().items():
            if name not in known:
                yield name, model, tokenizer
        for name, genome in self.genomes().items():
            if name not in known:
                yield name, self.builder.candidate(genome).model, tokenizer

    def n_models(self) -> int:
        return (1 + len(self.space.experts) + len(self.space.extra_models)
                + len(self.builder.extra_endpoints()) + self.space.calibration_merges)

    def inputs(self) -> dict:
        """What the calibration depends on: the responses on the models, merge space and benchmarks;
        the estimators also on the estimator settings."""
        raw = self.space.raw
        estimator = dict(raw.get("estimator") or {})
        responses = {key: raw.get(key) for key in ("models", "merge", "dfs", "benchmarks", "device")}
        responses["calibration"] = [estimator.get("extra_models"), estimator.get("calibration_merges"), self.space.seed]
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
        store = CalibrationStore.of(study) if study is not None else None
        if store is None:
            return self._calibrate(None)
        inputs = self.inputs()
        stored, mine = store.estimators(inputs), False
        if stored is None:
            def done() -> bool:
                nonlocal stored
                stored = store.estimators(inputs)
                return stored is not None

            with study_lock(study, "calibration", wait=say if self.progress else None, done=done) as mine:
                if mine and not done():
                    if store.get_json("inputs") != inputs:
                        store.clear()  # made for another space of this study name (no trial was kept)
                        store.put_json("inputs", inputs)
                    for name, estimator in self._calibrate(store).items():
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

    def _calibrate(self, store: CalibrationStore | None) -> dict[str, SubsetEstimator]:
        """Fit (or load from the folder's cache) each benchmark's estimator; with ``store``,
        responses are stored after every model, so a worker taking over continues from them."""
        estimators = {}
        for bench_name, bench in self.benchmarks.items():
            path = estimator_path(self.run_dir, bench_name)
            if path.exists():
                estimators[bench_name] = checked_stages(SubsetEstimator.load(path), self.space, path)
                continue
            matrix = self._responses(bench_name, bench, store)
            estimator = fit_subset_estimator(
                matrix, None, self.endpoint_names(), n_items=self.space.stages,
                strategy=strategy_name(self.space.strategy), seed=self.space.seed, dims=self.space.irt_dims,
                benchmark=bench_name,
            )
            estimator.save(path)
            estimators[bench_name] = estimator
        return estimators

    def _responses(self, bench_name: str, bench: Benchmark, store: CalibrationStore | None) -> ResponseMatrix:
        """Every calibration model's answers to every item of ``bench`` (cached ones reused)."""
        path = responses_path(self.run_dir, bench_name)
        matrix = ResponseMatrix.load(path) if path.exists() else None
        if store is not None:
            matrix = merged(matrix, store.get_responses(bench_name))
        known = set(matrix.model_names) if matrix is not None else set()
        if self.progress:
            say(f"calibrating the {bench_name} estimator: scoring {self.n_models() - len(known)} of "
                f"{self.n_models()} models on all {len(bench.items)} items (cached in {self.run_dir}"
                + (" and the study's storage)" if store is not None else ")"))
        for name, model, tokenizer in self._models(known):
            correct = score_items(model, tokenizer, bench, batch_size=self.batch_size, progress=self.progress)
            if matrix is None:
                matrix = ResponseMatrix.empty([item.id for item in bench.items], bench_name)
            matrix = matrix.with_model(name, np.asarray(correct, dtype=bool))
            matrix.save(path)
            if store is not None:
                store.put_responses(bench_name, matrix)
        if store is not None:
            store.put_responses(bench_name, matrix)  # also responses that came from the folder's cache
        return matrix


def merged(local: ResponseMatrix | None, stored: ResponseMatrix | None) -> ResponseMatrix | None:
    """The folder's cached responses with the models only the study's storage holds added."""
    if local is None or stored is None:
        return local if stored is None else stored
    if local.item_ids != stored.item_ids:
        return stored
    for name in stored.model_names:
        if name not in local.model_names:
            local = local.with_model(name, stored.row(name))
    return local


def checked_stages(estimator: SubsetEstimator, space: SearchSpace, where) -> SubsetEstimator:
    """A cached estimator must have the stages the space asks for (they are fixed at calibration)."""
    want = stage_sizes(space.stages, estimator.n_total, "evaluation.stages")
    have = [stage.size for stage in estimator.stages]
    if have != want:
        raise EvomergeError(f"{where} was calibrated for stages {have}, the space asks for {want}; "
                            "delete it to recalibrate (or start a new run)")
    return estimator
