"""The search loop: ask a genome, evaluate it, tell its result, until the study holds the budget.

The budget counts COMPLETE trials, so a resumed or restarted search continues
exactly to it, and workers sharing a study fill it together. A trial's storage
writes (ask, tell) finish before a Ctrl-C takes effect, and a trial interrupted
anywhere else is failed before the interrupt goes on: none is left RUNNING.

What fails a trial and what stops the run: a problem with the candidate's input
(`EvomergeError`: a bad item, a non-finite fitness; running out of memory) fails
the trial, its message stored, and the search goes on, unless the first trials
of this run all fail (then the input is broken and the run stops). A machine
fault (`MachineError`: the disk full, a folder read-only) stops the run with one
line: the next trial would hit the same wall. Any other exception is a bug: the
trial is marked failed and the run stops with its traceback, never hidden as one
more failed trial. Whatever stops the run, the completed trials stay, and a
trial the storage could not mark failed is failed as stale when the run resumes.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge.console import progress_bar, say
from evomerge.errors import EvomergeError, MachineError
from evomerge.search.optimizers import SearchOptimizer
from evomerge.search.records import TrialKey, best_trials, complete_trials, genome_key, jsonable
from evomerge.search.storage import gave_up
from evomerge.search.workers import (InFlight, claim_worker_slot, fail_stale_trials,
                                     finished_elsewhere, holds_budget, worker_identity, worker_salt)

STALE_CHECK_S = 1.0

ObjectiveFn = Callable[[dict[str, float]], tuple[Sequence[float], Mapping[str, Any]]]


def trial_failure(error: BaseException) -> bool:
    """Whether ``error`` fails the trial it happened in and the search goes on: a problem with the
    candidate's input, or memory. A machine fault or a bug stops the run."""
    if isinstance(error, MachineError):
        return False
    return isinstance(error, (EvomergeError, MemoryError, torch.OutOfMemoryError))


@dataclass
class SearchSummary:
    n_complete: int
    n_new_complete: int
    n_new_failed: int
    best: list[FrozenTrial]


class SearchDriver:
    """Runs ask -> objective -> tell until the study holds ``n_trials`` COMPLETE trials.

    A trial whose objective raises a trial failure (`trial_failure`) is failed (the
    message lands in its ``error`` attr) and the search goes on, unless the first
    ``max_initial_failures`` trials of this run all fail: then the objective is broken
    and we raise. ``label_attrs``: attrs naming a trial (set when enqueued), never
    copied onto a duplicate.
    """

    def __init__(self, study: Study, optimizer: SearchOptimizer, *, progress: bool = True,
                 max_initial_failures: int = 3, label_attrs: Sequence[str] = ()):
        self.study = study
        self.optimizer = optimizer
        self.progress = progress
        self.max_initial_failures = max_initial_failures
        self.label_attrs = tuple(label_attrs)
        self._stale_checked = -math.inf
        # Trials still RUNNING here belong to live workers (the study's opening failed the
        # dead ones); workers starting together see none yet, so their slots tell them apart.
        running = bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        self.slot = claim_worker_slot(study)
        optimizer.bind(study, salt=worker_salt(running or self.slot > 0))

    def _budget_left(self, n_trials: int) -> int:
        """Trials still to start: COMPLETE ones and the ones in flight count (`workers.holds_budget`).

        A RUNNING trial that names no worker was either created an instant ago by another
        worker or orphaned by a kill in that instant; the orphan is failed as stale after a
        few seconds, so a resumed search waits that long rather than counting it for ever.
        """
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        return n_trials - sum(1 for t in self.study.get_trials(deepcopy=False, states=states) if holds_budget(t))

    def run(self, objective_fn: ObjectiveFn, n_trials: int,
            callbacks: Sequence[Callable[[Study, FrozenTrial], None]] = ()) -> SearchSummary:
        """Evaluate genomes until ``n_trials`` COMPLETE trials exist in the study."""
        if n_trials < 1:
            raise EvomergeError(f"the trial budget must be at least 1, got {n_trials}")
        n_done_before = len(complete_trials(self.study))
        new_complete = new_failed = 0
        said_waiting = False
        with progress_bar("search", n_trials, n_done_before, enabled=self.progress) as bar:
            bar.update(n_done_before, self._best_text())
            while True:
                self._fail_stale()
                if self._budget_left(n_trials) <= 0:
                    running = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                    if len(complete_trials(self.study)) >= n_trials or not running:
                        break
                    if not said_waiting:  # a worker dying now leaves a trial to run again
                        say(f"the budget is taken: waiting for {running} trial(s) in flight (another worker's, "
                            "or a killed worker's, failed once found stale)")
                        said_waiting = True
                    time.sleep(STALE_CHECK_S)
                    continue
                frozen = self._run_one(objective_fn, n_trials)
                if frozen is None:
                    continue  # surplus: other workers had filled the budget
                if frozen.state == TrialState.COMPLETE:
                    new_complete += 1
                else:
                    new_failed += 1
                    if new_complete == 0 and new_failed >= self.max_initial_failures:
                        raise EvomergeError(
                            f"the first {new_failed} trials all failed; last error: "
                            f"{frozen.user_attrs.get(TrialKey.ERROR)}"
                        )
                for callback in callbacks:
                    callback(self.study, frozen)
                bar.update(len(complete_trials(self.study)), self._best_text())
        return SearchSummary(len(complete_trials(self.study)), new_complete, new_failed, best_trials(self.study))

    def _best_text(self) -> str:
        best = best_trials(self.study)
        if not best:
            return "best: -"
        if len(self.study.directions) == 1:
            return f"best: {best[0].value:.4g} (trial {best[0].number})"
        return f"pareto front: {len(best)} trials"

    def _fail_stale(self) -> None:
        """Fail the trials of dead workers (same host: pid; others: heartbeat), at most once a second."""
        now = time.monotonic()
        if now - self._stale_checked >= STALE_CHECK_S:
            self._stale_checked = now
            fail_stale_trials(self.study)

    def _surplus(self, trial: Trial, n_trials: int) -> bool:
        """Whether the budget was full when ``trial`` was created: COMPLETE trials and the
        in-flight trials created before it (named, or just created) already make ``n_trials``.
        Two workers that both saw one trial left both ask; the later one steps back."""
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        taken = sum(1 for t in self.study.get_trials(deepcopy=False, states=states)
                    if holds_budget(t) and (t.state == TrialState.COMPLETE or t.number < trial.number))
        return taken >= n_trials

    def _tell(self, trial: Trial, values, attrs: Mapping[str, Any]) -> FrozenTrial:
        """Store ``attrs`` and finish the trial (COMPLETE with ``values``, FAIL with None), Ctrl-C deferred."""
        with sigint_deferred():
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            return self.optimizer.tell(trial, values)

    def _run_one(self, objective_fn: ObjectiveFn, n_trials: int | None = None) -> FrozenTrial | None:
        """One trial (None: it was surplus and is failed unrun); none is left RUNNING."""
        trial, told = None, False
        try:
            with sigint_deferred():
                trial = self.optimizer.ask({TrialKey.WORKER: worker_identity()})
            with InFlight(self.study, trial):  # from its creation: a worker dying anywhere leaves a stale beat
                if n_trials is not None and self._surplus(trial, n_trials):
                    told = True
                    self._tell(trial, None, {TrialKey.ERROR: "surplus: other workers had filled the budget (not run)"})
                    return None
                started = time.perf_counter()
                try:
                    values, user_attrs = self._evaluate(objective_fn, trial)
                except Exception as error:
                    if not trial_failure(error) or gave_up():
                        # a bug, a machine fault, or the database is gone: the trial is failed, the run stops
                        told = True
                        self._fail_if_possible(trial, error)
                        raise
                    values, user_attrs = None, {TrialKey.ERROR: describe(error)}
                told = True
                return self._tell(trial, values, {**user_attrs, TrialKey.WALL_TIME: time.perf_counter() - started})
        except optuna.exceptions.UpdateFinishedTrialError:
            return finished_elsewhere(self.study, trial)  # another worker popped the same enqueued trial first
        except MachineError as error:  # the storage refused a write: fail the trial if it still takes one
            if trial is not None and not told:
                self._fail_if_possible(trial, error)
            raise
        except BaseException:  # Ctrl-C or a kill signal turned exception: leave no RUNNING trial behind
            if trial is not None and not told and not gave_up():
                try:
                    self._tell(trial, None, {TrialKey.ERROR: "interrupted"})
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass
            raise

    def _fail_if_possible(self, trial: Trial, error: BaseException) -> None:
        """Mark the trial failed with ``error``'s message, unless the storage cannot take it now (its
        disk full, the database gone): then its worker's death fails it when the run resumes."""
        if gave_up():
            return
        try:
            self._tell(trial, None, {TrialKey.ERROR: describe(error)})
        except (MachineError, optuna.exceptions.UpdateFinishedTrialError):
            pass

    def _evaluate(self, objective_fn: ObjectiveFn, trial: Trial) -> tuple[list[float], dict]:
        """The trial's values and attrs: the stored result of the same genome, or the objective's."""
        stored = self._stored_result(trial)
        values, user_attrs = stored if stored is not None else objective_fn(dict(trial.params))
        return self._checked_values(values), {str(k): jsonable(v) for k, v in (user_attrs or {}).items()}

    def _stored_result(self, trial: Trial) -> tuple[list[float], dict] | None:
        """The values and attrs of a COMPLETE trial with this very genome, or None.

        Optuna's CMA-ES can propose a genome twice (its per-trial seed collides); the
        objective is deterministic in the genome, so the stored result is what scoring
        again would give, and the optimizer is told the true value of its own sample.
        The new trial records which one it reuses (``duplicate_of``).
        """
        key = genome_key(trial.params)
        for done in complete_trials(self.study):
            if done.number != trial.number and genome_key(done.params) == key:
                attrs = {k: v for k, v in done.user_attrs.items() if k not in TrialKey.OWN + self.label_attrs}
                return list(done.values), {**attrs, TrialKey.DUPLICATE_OF: done.number}
        return None

    def _checked_values(self, values: Sequence[float] | float) -> list[float]:
        if isinstance(values, (int, float)):
            values = [values]
        values = [float(v) for v in values]
        n = len(self.study.directions)
        if len(values) != n:
            raise EvomergeError(f"objective returned {len(values)} values for {n} objectives")
        if not all(math.isfinite(v) for v in values):
            raise EvomergeError(f"objective returned a non-finite value: {values}")
        return values


def describe(error: BaseException) -> str:
    """How a trial records the error that ended it."""
    return f"{type(error).__name__}: {error}"[:2000]


@contextmanager
def sigint_deferred():
    """Within: a Ctrl-C waits for the block to finish, then interrupts (main thread only).

    Storage writes of ask and tell take milliseconds; deferring the interrupt over them
    means a trial is never left half-created or RUNNING by a Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])  # Python's default handler raises KeyboardInterrupt
