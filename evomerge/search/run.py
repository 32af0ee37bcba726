"""A merge search: the merge core, the subset estimators and a study, wired together.

The run folder (`runs/NAME/`) holds a copy of the search space, the Optuna
SQLite storage (unless an RDB URL is given) and a cache of the calibration: the
full-benchmark responses of the calibration models and the fitted subset
estimators. The calibration itself is stored in the study's database
(`evomerge.search.calibration`), so a resumed search, and every worker on any
machine, scores the same items with the same estimators and starts in seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from evomerge.benchmarks import score_items
from evomerge.console import say
from evomerge.errors import EvomergeError
from evomerge.estimate import ResponseMatrix, SubsetEstimator, fit_subset_estimator, responses_path
from evomerge.estimate.extract import stage_sizes
from evomerge.jsonfile import read_json, write_json
from evomerge.search.candidates import CandidateBuilder, candidate_seed, make_builder  # noqa: F401 (candidate_seed re-exported)
from evomerge.search.optimizers import make_optimizer
from evomerge.search.preflight import check_inputs
from evomerge.search.racing import (  # noqa: F401 (answers_string re-exported)
    FITNESS_INTERVAL_ATTR, STAGE_ATTR, StagedScorer, answers_string, preferred_trial, trial_items,
)
from evomerge.search.runs import load_run_space, open_existing_study, open_run_study
from evomerge.search.space import SearchSpace
from evomerge.search.study import SearchDriver, complete_trials, enqueue_first, genome_key, ranked_trials

BASELINE_ATTR = "baseline"
"""User attr naming an enqueued baseline trial ("expert arith", "base", "uniform weight 1, density 0.7")."""
STRATEGY_ALIASES = {"anchor": "anchor-irt"}
CALIBRATION_FILE = "calibration.json"


def _synchronize(device) -> None:
    """Wait for queued GPU work, so a timing covers the work and not just its launch."""
    import torch

    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.synchronize()




class MergeSearch:
    """Everything one search process needs, prepared once; `objective` scores one genome.

    The candidate builder (`evomerge.search.candidates`) holds the loaded weights and
    makes the model of a genome: a parameter-space merge or a data-flow path.
    """

    def __init__(
        self,
        space: SearchSpace,
        run_dir: str | Path,
        *,
        storage: str | None = None,
        progress: bool = True,
        batch_size: int = 128,
    ):
        self.space = space
        self.run_dir = Path(run_dir)
        self.storage = storage
        self.progress = progress
        self.batch_size = batch_size
        self.benchmarks = check_inputs(space)  # seconds, before any weight is loaded
        self.builder: CandidateBuilder = make_builder(space)
        self.tokenizer = self.builder.tokenizer
        self.genome = self.builder.genome
        self.weights = np.array([b.weight for b in space.benchmarks], dtype=float)
        self.estimators: dict[str, SubsetEstimator] = {}
        self._scorer: StagedScorer | None = None
        self._baseline_keys: set[tuple] | None = None

    # ------------------------------------------------------------ calibration
    def calibration_genomes(self) -> dict[str, dict[str, float]]:
        """Random in-space merges whose full responses sharpen the IRT item parameters."""
        rng = np.random.default_rng(self.space.seed + 7919)
        genomes = {}
        for i in range(self.space.calibration_merges):
            genomes[f"calib{i}"] = {n: float(rng.uniform(lo, hi)) for n, (lo, hi) in self.genome.items()}
        return genomes

    def _calibration_models(self, known: set[str]):
        """Yield (name, model, tokenizer) for endpoints, extra models and calibration merges."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for name, path in [("base", self.space.base), *self.space.experts.items()]:
            if name not in known:  # scored in the builder's own model where it can: no second copy on the GPU
                yield name, self.builder.checkpoint_model(path), self.tokenizer
        for path in self.space.extra_models:
            name = f"extra:{Path(path).name}"
            if name not in known:
                yield name, *self._load_hf(path, AutoModelForCausalLM, AutoTokenizer)
        for name, model in self.builder.extra_endpoints().items():
            if name not in known:
                yield name, model, self.tokenizer
        for name, genome in self.calibration_genomes().items():
            if name not in known:
                yield name, self.builder.candidate(genome).model, self.tokenizer

    def _load_hf(self, path, model_cls, tokenizer_cls):
        if not Path(path).is_dir():
            raise EvomergeError(f"model folder not found: {path}")
        model = model_cls.from_pretrained(str(path), dtype=self.builder.dtype).to(self.builder.device).eval()
        return model, tokenizer_cls.from_pretrained(str(path))

    def calibration_inputs(self) -> dict:
        """What the cached calibration depends on: the responses on the models, merge space and
        benchmarks; the estimators also on the estimator settings."""
        raw = self.space.raw
        estimator = dict(raw.get("estimator") or {})
        responses = {key: raw.get(key) for key in ("models", "merge", "dfs", "benchmarks", "device")}
        responses["calibration"] = [estimator.get("extra_models"), estimator.get("calibration_merges"), self.space.seed]
        return json.loads(json.dumps({"responses": responses, "estimators": estimator}))

    def _drop_stale_calibration(self) -> None:
        """Forget cached responses / estimators made for another space (replaced before any trial)."""
        record = self.run_dir / CALIBRATION_FILE
        inputs = self.calibration_inputs()
        stored = read_json(record, "calibration record") if record.exists() else inputs  # older folders: trusted
        if stored.get("responses") != inputs["responses"]:
            shutil.rmtree(self.run_dir / "responses", ignore_errors=True)
        if stored != inputs:
            shutil.rmtree(self.run_dir / "estimators", ignore_errors=True)
        write_json(record, inputs)

    def prepare(self, study=None) -> None:
        """Score calibration models fully and fit or load each benchmark's estimator.

        With ``study`` the calibration lives in the study's database
        (`evomerge.search.calibration`): loaded when stored, else made by exactly one
        worker under the study's lock while the others wait, then stored. The run
        folder's ``responses/`` and ``estimators/`` are a cache either way (a folder
        from before the study stored its calibration hands its estimators over).
        """
        self._drop_stale_calibration()
        if study is None:
            self._calibrate(None)
            return
        from evomerge.search.calibration import CalibrationStore
        from evomerge.search.study import worker_identity

        store = CalibrationStore.of(study)
        if store is None:
            self._calibrate(None)
            return
        inputs = self.calibration_inputs()
        stored, mine = store.estimators(inputs), False
        if stored is None:
            def done() -> bool:
                nonlocal stored
                stored = store.estimators(inputs)
                return stored is not None

            with store.locked(worker_identity(), wait=say if self.progress else None, done=done) as mine:
                if mine and not done():
                    if store.get_json("inputs") != json.loads(json.dumps(inputs, sort_keys=True)):
                        store.clear()  # made for another space of this study name (no trial was kept)
                        store.put_json("inputs", inputs)
                    self._calibrate(store)
                    for name, estimator in self.estimators.items():
                        store.put_json(f"estimators/{name}", estimator.to_dict())
                    store.put_json("complete", list(self.estimators))
                    stored = store.estimators(inputs)  # what every worker loads, this one included
        where = f"the stored calibration of study {self.space.name!r}"
        missing = set(self.benchmarks) - set(stored)
        if missing:
            raise EvomergeError(f"{where} has no estimator for {sorted(missing)}")
        for name in self.benchmarks:
            self.estimators[name] = _checked_stages(stored[name], self.space, where)
            stored[name].save(self.run_dir / "estimators" / f"{name}.json")  # the folder's cache
            responses = store.get_responses(name)
            if responses is not None and not responses_path(self.run_dir, name).exists():
                responses.save(responses_path(self.run_dir, name))
        if self.progress and not mine:
            say(f"loaded the calibration of study {self.space.name!r} from its storage")

    def _calibrate(self, store) -> None:
        """Fit (or load from the folder's cache) each benchmark's estimator; with ``store``,
        responses are stored after every model, so a worker taking over continues from them."""
        endpoint_names = ["base", *self.space.expert_names, *self.builder.extra_endpoints()]
        strategy = STRATEGY_ALIASES.get(self.space.strategy, self.space.strategy)
        for bench_name, bench in self.benchmarks.items():
            estimator_path = self.run_dir / "estimators" / f"{bench_name}.json"
            if estimator_path.exists():
                self.estimators[bench_name] = _checked_stages(SubsetEstimator.load(estimator_path), self.space,
                                                              estimator_path)
                continue
            path = responses_path(self.run_dir, bench_name)
            matrix = ResponseMatrix.load(path) if path.exists() else None
            if store is not None:
                matrix = _merged(matrix, store.get_responses(bench_name))
            known = set(matrix.model_names) if matrix is not None else set()
            if self.progress:
                n_models = (1 + len(self.space.experts) + len(self.space.extra_models)
                            + len(self.builder.extra_endpoints()) + self.space.calibration_merges)
                say(f"calibrating the {bench_name} estimator: scoring {n_models - len(known)} of "
                    f"{n_models} models on all {len(bench.items)} items (cached in {self.run_dir}"
                    + (" and the study's storage)" if store is not None else ")"))
            for name, model, tokenizer in self._calibration_models(known):
                correct = score_items(model, tokenizer, bench, batch_size=self.batch_size, progress=self.progress)
                if matrix is None:
                    matrix = ResponseMatrix.empty([item.id for item in bench.items], bench_name)
                matrix = matrix.with_model(name, np.asarray(correct, dtype=bool))
                matrix.save(path)
                if store is not None:
                    store.put_responses(bench_name, matrix)
            if store is not None and matrix is not None:
                store.put_responses(bench_name, matrix)  # also responses that came from the folder's cache
            estimator = fit_subset_estimator(
                matrix,
                None,
                endpoint_names,
                n_items=self.space.stages,
                strategy=strategy,
                seed=self.space.seed,
                dims=self.space.irt_dims,
                benchmark=bench_name,
            )
            estimator.save(estimator_path)
            self.estimators[bench_name] = estimator

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
        timings = {"merge_s": merged - started, "score_s": time.perf_counter() - merged}
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

    def open(self):
        """Create or continue the run's study (see `evomerge.search.runs`), baselines enqueued first."""
        config = {**self.space.study_config(), **self.builder.study_config(),
                  "genome": {k: list(v) for k, v in self.genome.items()}}
        study = open_run_study(self.run_dir, self.space, self.storage, self.directions, config)
        if self.space.baselines:
            baselines = [(genome, {BASELINE_ATTR: label}) for label, genome in self.baseline_genomes().items()]
            from evomerge.search.calibration import CalibrationStore
            from evomerge.search.study import worker_identity

            store = CalibrationStore.of(study)
            if store is None:
                enqueue_first(study, baselines)
            else:  # workers starting together: one enqueues them
                with store.locked(worker_identity(), name="baselines"):
                    enqueue_first(study, baselines)
        return study

    def run(self, n_trials: int | None = None):
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
        driver = SearchDriver(study, optimizer, progress=self.progress, label_attrs=(BASELINE_ATTR,))
        self.scorer.bind(study)
        summary = driver.run(self.objective, budget)
        return study, summary


def _merged(local: ResponseMatrix | None, stored: ResponseMatrix | None) -> ResponseMatrix | None:
    """The folder's cached responses with the models only the study's storage holds added."""
    if local is None or stored is None:
        return local if stored is None else stored
    if local.item_ids != stored.item_ids:
        return stored
    for name in stored.model_names:
        if name not in local.model_names:
            local = local.with_model(name, stored.row(name))
    return local


def _checked_stages(estimator: SubsetEstimator, space: SearchSpace, path) -> SubsetEstimator:
    """A cached estimator must have the stages the space asks for (they are fixed at calibration)."""
    want = stage_sizes(space.stages, estimator.n_total, "evaluation.stages")
    have = [stage.size for stage in estimator.stages]
    if have != want:
        raise EvomergeError(f"{path} was calibrated for stages {have}, the space asks for {want}; "
                            "delete it to recalibrate (or start a new run)")
    return estimator


def export_trial(
    run_dir: str | Path,
    trial_number: int | None = None,
    out_dir: str | Path | None = None,
    storage: str | None = None,
    max_shard_size: str = "1GB",
    validate_top: int = 0,
    progress: bool = True,
    builder: CandidateBuilder | None = None,
    memory: dict | None = None,
    force: bool = False,
) -> Path:
    """Export the best (or a chosen) trial of a run as an HF checkpoint, all or nothing.

    ``validate_top=K`` scores the K best-estimated trials on the full benchmarks
    first and exports the best measured one (see `evomerge.search.validate`).
    ``builder``: a candidate builder already holding the run's models (else they are loaded).
    ``memory``: merge-core budgets (``device_memory`` / ``host_memory`` bytes) replacing the space's.
    A non-empty ``out_dir`` is replaced only when it is an earlier export of this run, or with ``force``.
    """
    from evomerge.export import check_export_target
    from evomerge.search.validate import stored_full_accuracies, validate_top_trials

    space = load_run_space(run_dir).with_memory(**(memory or {}))
    study = open_existing_study(run_dir, storage)
    trials = ranked_trials(study, [b.weight for b in space.benchmarks])
    if not trials:
        raise EvomergeError(f"run {run_dir} has no complete trial to export yet")
    by_number = {t.number: t for t in trials}
    if trial_number is not None and trial_number not in by_number:
        raise EvomergeError(
            f"trial {trial_number} is not a complete trial of {run_dir}; complete: {sorted(by_number)}"
        )
    owner = {"study": space.name, "run": str(Path(run_dir).resolve())}
    if out_dir is not None:
        check_export_target(out_dir, owner, force)  # before any model is loaded
    if builder is None:
        builder = make_builder(space)
    if trial_number is None and validate_top:
        trial_number = validate_top_trials(run_dir, validate_top, storage, progress=progress, builder=builder)[0].number
    weights = [b.weight for b in space.benchmarks]
    trial = preferred_trial(trials, weights) if trial_number is None else by_number[trial_number]
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / f"export-trial{trial.number}"
    details = {
        "study": space.name,
        "trial": trial.number,
        "estimated accuracy": ", ".join(f"{k} {v:.3f}" for k, v in trial.user_attrs.get("estimates", {}).items()),
        "estimator": f"{space.estimator}, {space.strategy} subsets",
        "scored on": scored_on(trial, space),
    }
    measured = stored_full_accuracies(study).get(trial.number)
    if measured:
        details["measured accuracy (all items)"] = ", ".join(f"{k} {v:.3f}" for k, v in measured.items())

    def figures(folder: Path) -> None:  # written inside the export, so it is complete or absent with them
        _embed_search_figures(folder, run_dir, study, trial.number, progress)

    return builder.export(trial.user_attrs, out_dir, details=details, max_shard_size=max_shard_size,
                          owner=owner, force=force, finish=figures)


def scored_on(trial, space: SearchSpace) -> str:
    """'120 items (stage 2 of 3; stages 10, 30, all per benchmark), fitness 0.41 [0.38, 0.44] (90%)'."""
    text = f"{trial_items(trial)} items"
    stage = trial.user_attrs.get(STAGE_ATTR)
    if stage is not None and len(space.stages) > 1:
        text += f" (stage {stage + 1} of {len(space.stages)}; stages {', '.join(map(str, space.stages))} per benchmark)"
    interval = trial.user_attrs.get(FITNESS_INTERVAL_ATTR)
    if interval:
        level = space.evaluation.level if space.evaluation else 0.9
        text += f", fitness interval [{interval[0]:.3f}, {interval[1]:.3f}] ({level:.0%})"
    return text


def _embed_search_figures(out_dir: Path, run_dir, study, trial_number: int, progress: bool) -> None:
    """The card shows the trial's genome and the search's fitness curve (with the `report` extra)."""
    from evomerge.export import add_card_figures
    from evomerge.report import EXTRA_HINT, write_card_figures

    figures = write_card_figures(run_dir, study, trial_number, out_dir)
    if figures:
        add_card_figures(out_dir, figures)
    elif progress:
        say(f"model card without figures: matplotlib is not installed ({EXTRA_HINT})")
