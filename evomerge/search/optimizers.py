"""One ask/tell interface over Optuna samplers and nevergrad optimizers.

Whatever proposes a genome, the Optuna study is where it is recorded: every
optimizer here asks through ``study.ask`` and tells through ``study.tell``, so
one storage holds the whole history and any optimizer can resume from it.

* Optuna samplers (``cmaes``, ``tpe``, ``nsga2``, ``random``) are set as the
  study's sampler; they rebuild their state from storage by themselves.
* Nevergrad optimizers (``ng_cma``, ``ng_ngopt``, ``ng_de`` or any
  ``ng_<Name>`` of ``nevergrad.optimizers.registry``) run beside the study: a
  small sampler hands nevergrad's candidate to ``study.ask``, and on ``bind``
  the optimizer is rebuilt by replaying the stored trials in order (same seed,
  same ask/tell sequence), so it continues where the killed run stopped.

A genome space is an ordered mapping ``name -> (low, high)`` of float bounds.
Values are fitness values in the study's directions (``"maximize"`` or
``"minimize"``, one per objective).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge.errors import EvomergeError
from evomerge.search.records import StudyKey
from evomerge.search.storage import suggest_genome
from evomerge.search.study import study_directions, validate_directions

GenomeSpace = Mapping[str, tuple[float, float]]

#: Optuna samplers by evomerge name, with whether they handle several objectives.
OPTUNA_OPTIMIZERS: dict[str, bool] = {"cmaes": False, "tpe": True, "nsga2": True, "random": True}
#: Short aliases for common nevergrad optimizers; any ``ng_<RegistryName>`` works too.
NEVERGRAD_ALIASES: dict[str, str] = {"ng_cma": "CMA", "ng_ngopt": "NGOpt", "ng_de": "DE"}


def available_optimizers() -> list[str]:
    """The names ``make_optimizer`` accepts (besides any other ``ng_<Name>``)."""
    return [*OPTUNA_OPTIMIZERS, *NEVERGRAD_ALIASES]


class Choices(tuple):
    """The bounds of a categorical gene (the merge method): its choices, not (low, high)."""


def validate_genome_space(genome_space: GenomeSpace) -> dict:
    """Return the space as a plain ordered dict of float bounds (or `Choices`), or explain what is wrong."""
    if not isinstance(genome_space, Mapping) or not genome_space:
        raise EvomergeError("genome space must be a non-empty mapping name -> (low, high)")
    space: dict = {}
    for name, bounds in genome_space.items():
        if not isinstance(name, str) or not name:
            raise EvomergeError(f"genome parameter names must be non-empty strings, got {name!r}")
        if isinstance(bounds, Choices):
            if len(bounds) < 2 or len(set(bounds)) != len(bounds):
                raise EvomergeError(f"genome parameter {name!r}: choices must be at least two different values")
            space[name] = bounds
            continue
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise EvomergeError(
                f"genome parameter {name!r}: bounds must be two numbers (low, high), got {bounds!r}"
            ) from None
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise EvomergeError(
                f"genome parameter {name!r}: bounds must be finite with low < high, got ({low}, {high})"
            )
        space[name] = (low, high)
    return space


def genome_distributions(genome_space: GenomeSpace) -> dict:
    """Optuna distributions for the genome: stored with every trial so it can be reloaded."""
    return {name: CategoricalDistribution(list(bounds)) if isinstance(bounds, Choices) else FloatDistribution(*bounds)
            for name, bounds in genome_space.items()}


class SearchOptimizer(ABC):
    """Proposes genomes as Optuna trials and learns from their fitness values.

    Call ``bind(study, salt)`` once (it attaches to the study and catches up with the
    trials already stored), then loop ``trial = ask()`` ... ``tell(trial, values)``;
    ``values=None`` records a failed trial. ``salt`` is 0 for the study's only worker
    (a resume stays reproducible), else unique to the worker (`workers.worker_salt`),
    so workers running together propose different genomes.
    """

    def __init__(self, name: str, genome_space: GenomeSpace, directions: Sequence[str], seed: int):
        self.name = name
        self.genome_space = validate_genome_space(genome_space)
        self.directions = validate_directions(directions)
        self.seed = int(seed)
        self.distributions = genome_distributions(self.genome_space)
        self.salt = 0
        self._study: Study | None = None

    @property
    def study(self) -> Study:
        if self._study is None:
            raise RuntimeError(f"optimizer {self.name!r} is not bound to a study: call bind(study) first")
        return self._study

    def bind(self, study: Study, salt: int = 0) -> None:
        """Attach to ``study`` and absorb the trials it already holds."""
        if study_directions(study) != self.directions:
            raise EvomergeError(
                f"optimizer directions {self.directions} differ from the study's {study_directions(study)}"
            )
        self._study = study
        self.salt = int(salt)
        self._attach(study)

    def ask(self, user_attrs: Mapping[str, Any] | None = None) -> Trial:
        """Start a new trial whose params are the next genome to evaluate.

        ``user_attrs`` are stored before any param is sampled, so a worker killed
        while its sampler works still leaves a trial that names its worker.
        """
        with warnings.catch_warnings():
            # We keep the heartbeat ourselves (evomerge.search.study), not through Study.optimize.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask()
        for key, value in (user_attrs or {}).items():
            trial.set_user_attr(key, value)
        suggest_genome(trial, self.distributions)  # one commit for the whole genome
        return trial

    def tell(self, trial: Trial, values: Sequence[float] | None) -> FrozenTrial:
        """Finish ``trial`` as COMPLETE with ``values``, or as FAIL when ``values`` is None."""
        if values is None:
            return self.study.tell(trial, state=TrialState.FAIL)
        return self.study.tell(trial, list(values))

    @abstractmethod
    def _attach(self, study: Study) -> None: ...


class OptunaOptimizer(SearchOptimizer):
    """An Optuna sampler; Optuna rebuilds its state from the study's trials."""

    def __init__(self, name, genome_space, directions, seed, options: Mapping[str, Any] | None = None):
        super().__init__(name, genome_space, directions, seed)
        self.options = dict(options or {})

    def _attach(self, study: Study) -> None:
        # A resumed run must not replay the first run's random proposals, so the
        # seed moves with the number of trials already there (0 on a fresh study).
        n_existing = len(study.get_trials(deepcopy=False))
        seed = (self.seed + 1_000_003 * n_existing + self.salt) % (2**32)
        study.sampler = self._make_sampler(seed)

    def _make_sampler(self, seed: int) -> BaseSampler:
        if self.name == "cmaes" and any(isinstance(b, Choices) for b in self.genome_space.values()):
            raise EvomergeError(CATEGORICAL_REFUSED)
        try:
            if self.name == "cmaes":
                _require_cmaes()
                with warnings.catch_warnings():  # x0 is deprecated from Optuna 4.9, kept until 6 (pyproject: <5.2)
                    warnings.filterwarnings("ignore", message=".*`x0`.*", category=FutureWarning)
                    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **self.options)
            if self.name == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **self.options)
            if self.name == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed, **self.options)
            return optuna.samplers.RandomSampler(seed=seed, **self.options)
        except TypeError as error:
            raise EvomergeError(f"optimizer {self.name!r}: bad options {self.options}: {error}") from None


def _require_cmaes() -> None:
    try:
        import cmaes  # noqa: F401  (Optuna's CmaEsSampler imports it lazily, too late for a clear message)
    except ImportError:
        raise EvomergeError("optimizer 'cmaes' needs the 'cmaes' package: pip install cmaes") from None


class _ProposalSampler(BaseSampler):
    """Hands the nevergrad optimizer's candidate to ``study.ask``, one param at a time.

    The candidate is asked lazily, so a trial whose params were all fixed by
    ``study.enqueue_trial`` does not consume a nevergrad proposal.
    """

    def __init__(self, owner: NevergradOptimizer):
        self._owner = owner

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._owner._proposal_value(trial.number, param_name)


@contextmanager
def _quiet():
    """Silence nevergrad/cma chatter (e.g. CMA's 'orphanated injected solution' on bounded arrays)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class NevergradOptimizer(SearchOptimizer):
    """A nevergrad optimizer over the genome scaled to the unit cube.

    Nevergrad minimises, so maximised objectives are told negated. Trials the
    optimizer did not ask (other workers', enqueued ones) are told as
    not-asked points where the optimizer supports it.
    """

    #: How many times ``ask`` re-asks when nevergrad proposes a genome already evaluated.
    MAX_DUPLICATE_REASKS = 20

    def __init__(self, name, genome_space, directions, seed, registry_name: str,
                 budget: int | None = None, options: Mapping[str, Any] | None = None,
                 start: Mapping[str, float] | None = None):
        super().__init__(name, genome_space, directions, seed)
        self.registry_name = registry_name
        self.budget = budget
        self.options = dict(options or {})
        self.start = dict(start) if start is not None else None
        self._names = list(self.genome_space)
        # a categorical gene is a unit interval cut into equal parts, one per choice
        self._choices = {n: b for n, b in self.genome_space.items() if isinstance(b, Choices)}
        self._lows = np.array([0.0 if n in self._choices else b[0] for n, b in self.genome_space.items()])
        self._spans = np.array([1.0 if n in self._choices else b[1] - b[0] for n, b in self.genome_space.items()])
        self._optimizer = self._new_nevergrad()  # checks the options now; rebuilt on bind
        self._asked: dict[int, Any] = {}  # trial number -> nevergrad candidate
        self._told: set[int] = set()  # trial numbers nevergrad already knows
        self._known: dict[tuple, list[float]] = {}  # rounded genome -> losses, for duplicate checks
        self._in_flight: set[tuple] = set()  # genomes other workers are evaluating now

    def _new_nevergrad(self):
        import nevergrad as ng  # 1.5 s to import: only for ng_ optimizers

        parametrization = ng.p.Array(shape=(len(self._names),), lower=0.0, upper=1.0)
        if self.start is not None:  # CMA's mean starts there
            parametrization.value = self._to_unit(self.start)
        parametrization.random_state.seed((self.seed ^ self.salt) % (2**32))
        try:
            with _quiet():
                return ng.optimizers.registry[self.registry_name](
                    parametrization=parametrization, budget=self.budget, num_workers=1, **self.options
                )
        except TypeError as error:
            raise EvomergeError(f"optimizer {self.name!r}: bad options {self.options}: {error}") from None

    # -- genome <-> unit cube ------------------------------------------------
    def _to_params(self, unit: np.ndarray) -> dict:
        values = self._lows + np.clip(unit, 0.0, 1.0) * self._spans
        params = {}
        for name, value in zip(self._names, values):
            choices = self._choices.get(name)
            params[name] = choices[min(int(value * len(choices)), len(choices) - 1)] if choices else float(value)
        return params

    def _to_unit(self, params: Mapping) -> np.ndarray:
        values = np.array([(self._choices[n].index(params[n]) + 0.5) / len(self._choices[n]) if n in self._choices
                           else float(params[n]) for n in self._names])
        return np.clip((values - self._lows) / self._spans, 0.0, 1.0)

    @staticmethod
    def _key(unit: np.ndarray) -> tuple:
        return tuple(np.round(unit, 12).tolist())

    def _losses(self, values: Sequence[float]) -> float | list[float]:
        losses = [-float(v) if d == "maximize" else float(v) for v, d in zip(values, self.directions)]
        return losses[0] if len(losses) == 1 else losses

    # -- ask / tell ------------------------------------------------------------
    def _attach(self, study: Study) -> None:
        # Replay is exact only for the optimizer first built (NGOpt picks its
        # algorithm from the budget), so a resume with a larger budget reuses the first one.
        if StudyKey.NEVERGRAD_BUDGET in study.user_attrs:
            self.budget = study.user_attrs[StudyKey.NEVERGRAD_BUDGET]
        else:
            study.set_user_attr(StudyKey.NEVERGRAD_BUDGET, self.budget)
        self._optimizer = self._new_nevergrad()
        self._asked.clear(), self._told.clear(), self._known.clear()
        study.sampler = _ProposalSampler(self)
        self._replay(study.get_trials(deepcopy=False))

    def _replay(self, trials: Sequence[FrozenTrial]) -> None:
        """Rebuild nevergrad's state: same seed, one ask per stored trial, tell the complete ones.

        When the stored genome is what the fresh optimizer proposes, the replay
        is exact and the next ask continues the original sequence; otherwise the
        stored genome is told as a not-asked point.
        """
        for trial in sorted(trials, key=lambda t: t.number):
            if trial.number in self._told:
                continue
            if trial.state in (TrialState.RUNNING, TrialState.WAITING):
                continue  # in flight elsewhere, or enqueued: told when it completes
            with _quiet():
                candidate = self._optimizer.ask()
            if trial.state != TrialState.COMPLETE or not self._has_genome(trial):
                continue
            unit = self._to_unit(trial.params)
            if not np.allclose(candidate.value, unit, rtol=0, atol=1e-9):
                candidate = None
            self._tell_nevergrad(trial.number, unit, trial.values, candidate)

    def _has_genome(self, trial: FrozenTrial) -> bool:
        return all(name in trial.params for name in self._names)

    def _tell_nevergrad(self, number: int, unit: np.ndarray, values, candidate=None) -> None:
        from nevergrad.common.errors import TellNotAskedNotSupportedError

        losses = self._losses(values)
        self._told.add(number)
        self._known[self._key(unit)] = losses
        if candidate is None:
            candidate = self._optimizer.parametrization.spawn_child(new_value=unit)
        try:
            with _quiet():
                self._optimizer.tell(candidate, losses)
        except TellNotAskedNotSupportedError:
            pass  # this optimizer only learns from its own proposals

    def _catch_up(self) -> None:
        """Tell nevergrad the trials other workers completed; note the ones they are running."""
        self._in_flight = set()
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        for trial in self.study.get_trials(deepcopy=False, states=states):
            if trial.number in self._told or trial.number in self._asked or not self._has_genome(trial):
                continue
            if trial.state == TrialState.RUNNING:
                self._in_flight.add(self._key(self._to_unit(trial.params)))
            else:
                self._tell_nevergrad(trial.number, self._to_unit(trial.params), trial.values)

    def _proposal_value(self, trial_number: int, param_name: str) -> float:
        if trial_number not in self._asked:
            self._asked[trial_number] = self._fresh_candidate()
        return self._to_params(self._asked[trial_number].value)[param_name]

    def _fresh_candidate(self):
        """Ask nevergrad for a genome nobody evaluated nor is evaluating.

        A genome already evaluated is told its known value; one in flight on
        another worker is dropped.
        """
        for _ in range(self.MAX_DUPLICATE_REASKS):
            with _quiet():
                candidate = self._optimizer.ask()
            key = self._key(candidate.value)
            losses = self._known.get(key)
            if losses is None and key not in self._in_flight:
                return candidate
            if losses is not None:
                with _quiet():
                    self._optimizer.tell(candidate, losses)
        return candidate

    def ask(self, user_attrs: Mapping[str, Any] | None = None) -> Trial:
        self._catch_up()
        return super().ask(user_attrs)

    def tell(self, trial: Trial, values: Sequence[float] | None) -> FrozenTrial:
        frozen = super().tell(trial, values)
        candidate = self._asked.pop(trial.number, None)
        if frozen.state == TrialState.COMPLETE:
            unit = self._to_unit(frozen.params)
            if candidate is not None and not np.allclose(candidate.value, unit, rtol=0, atol=1e-9):
                candidate = None  # params partly fixed by an enqueued trial
            self._tell_nevergrad(frozen.number, unit, frozen.values, candidate)
        return frozen


def make_optimizer(
    name: str,
    genome_space: GenomeSpace,
    directions: Sequence[str] | str = ("maximize",),
    seed: int = 0,
    *,
    budget: int | None = None,
    options: Mapping[str, Any] | None = None,
    start: Mapping[str, float] | None = None,
) -> SearchOptimizer:
    """Build the optimizer called ``name``; ``options`` go to the sampler/optimizer constructor.

    ``budget`` (total trials) only matters to nevergrad optimizers that plan for it (NGOpt).
    ``start``: a genome the search starts around (CMA-ES's mean), e.g. learned coefficients.
    """
    space = validate_genome_space(genome_space)
    dirs = validate_directions(directions)
    registry_name = check_optimizer(name, len(dirs))
    key = str(name).lower()
    if start is not None:
        check_start(key)
        start = {n: start[n] if isinstance(b, Choices) else min(max(float(start[n]), b[0]), b[1])
                 for n, b in space.items()}
    if registry_name is None:
        options = dict(options or {})
        if start is not None:
            options.setdefault("x0", start)
        return OptunaOptimizer(key, space, dirs, seed, options)
    return NevergradOptimizer(key if key in NEVERGRAD_ALIASES else name, space, dirs, seed,
                              registry_name, budget=budget, options=options, start=start)


CATEGORICAL_REFUSED = ("optimizer 'cmaes' has no categorical dimension, so it cannot search the merge method; use "
                       "tpe, nsga2, random or a nevergrad optimizer (ng_ngopt, ng_cma, ...), or one method per space")


def check_categorical(name: str) -> None:
    """Optuna's CMA-ES cannot search a categorical gene (the merge method): refuse it clearly."""
    if str(name).lower() == "cmaes":
        raise EvomergeError(CATEGORICAL_REFUSED)


STARTABLE = ("cmaes", "ng_cma")
"""Optimizers that can start their search around a given genome (CMA-ES's mean)."""


def check_start(name: str) -> None:
    if str(name).lower() not in STARTABLE:
        raise EvomergeError(f"optimizer {name!r} cannot start at a given genome; optimizer.init needs one of "
                            f"{', '.join(STARTABLE)}")


def check_optimizer(name: str, n_objectives: int = 1) -> str | None:
    """Fail early (before any calibration) on an unknown optimizer or one that can't take n objectives.

    Returns the nevergrad registry name, or None for an Optuna sampler.
    """
    key = str(name).lower()
    if key in OPTUNA_OPTIMIZERS:
        if n_objectives > 1 and not OPTUNA_OPTIMIZERS[key]:
            multi = [n for n, ok in OPTUNA_OPTIMIZERS.items() if ok]
            raise EvomergeError(
                f"optimizer {name!r} handles one objective only, but {n_objectives} were given; "
                f"use one of {multi} or a nevergrad optimizer (ng_*)"
            )
        return None
    if key.startswith("ng_"):
        import nevergrad as ng

        registry_name = NEVERGRAD_ALIASES.get(key) or _registry_name(ng.optimizers.registry, name[3:])
        if registry_name is not None:
            return registry_name
    raise EvomergeError(
        f"unknown optimizer {name!r}; valid names: {', '.join(available_optimizers())}, "
        f"or ng_<Name> for any name in nevergrad.optimizers.registry"
    )


def _registry_name(registry: Mapping[str, Any], wanted: str) -> str | None:
    if wanted in registry:
        return wanted
    matches = [n for n in registry if n.lower() == wanted.lower()]
    return matches[0] if len(matches) == 1 else None
