"""`evomerge export`: a run's winner (or a chosen trial) as a Hugging Face checkpoint whose card shows its search.

The trial is the run's winner (`evomerge.search.records.Ranking.winner`: the best
measured once any trial is measured on every item, else the best estimate),
after validating the top K first when asked; the model is re-made by the run's
candidate builder and written all or nothing; the card gets the search's figures
(`evomerge.report`, with the `report` extra). This sits above both the search and
the report, which never import each other's way.
"""

from __future__ import annotations

from pathlib import Path

from optuna.trial import FrozenTrial

from evomerge.console import say
from evomerge.errors import EvomergeError
from evomerge.export import add_card_figures, check_export_target
from evomerge.report import EXTRA_HINT, write_card_figures
from evomerge.search.candidates import CandidateBuilder, make_builder
from evomerge.search.records import Ranking, TrialKey, complete_trials, sampled_validations
from evomerge.search.runs import load_run_space, open_existing_study
from evomerge.search.space import SearchSpace
from evomerge.search.validate import validate_top_trials


def export_trial(
    run_dir: str | Path,
    trial_number: int | None = None,
    out_dir: str | Path | None = None,
    storage: str | None = None,
    max_shard_size: str = "1GB",
    validate_top: int = 0,
    validate_items: int | None | str = "race",
    progress: bool = True,
    builder: CandidateBuilder | None = None,
    memory: dict | None = None,
    force: bool = False,
) -> Path:
    """Export the run's winner (or trial ``trial_number``) as an HF checkpoint, all or nothing.

    ``validate_top=K`` validates the K best-estimated trials first (`evomerge.search.validate`:
    a race on more items, or every item with ``validate_items=None``), so the winner is the
    best validated of them.
    ``builder``: a candidate builder already holding the run's models (else they are loaded).
    ``memory``: merge-core budgets (``device_memory`` / ``host_memory`` bytes) replacing the space's.
    A non-empty ``out_dir`` is replaced only when it is an earlier export of this run, or with ``force``.
    """
    space = load_run_space(run_dir).with_memory(**(memory or {}))
    study = open_existing_study(run_dir, storage)
    ranking = Ranking.of(space)
    complete = {t.number: t for t in complete_trials(study)}
    if not complete:
        raise EvomergeError(f"run {run_dir} has no complete trial to export yet")
    if trial_number is not None and trial_number not in complete:
        raise EvomergeError(
            f"trial {trial_number} is not a complete trial of {run_dir}; complete: {sorted(complete)}"
        )
    owner = {"study": space.name, "run": str(Path(run_dir).resolve())}
    if out_dir is not None:
        check_export_target(out_dir, owner, force)  # before any model is loaded
    if builder is None:
        builder = make_builder(space, run_dir)
    if trial_number is None and validate_top:
        validate_top_trials(run_dir, validate_top, storage, progress=progress, builder=builder, items=validate_items)
    if trial_number is None:
        winner = ranking.winner(study)
        trial, why = winner.trial, winner.reason
    else:
        trial, why = complete[trial_number], "chosen with --trial"
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / f"export-trial{trial.number}"
    details = {
        "study": space.name,
        "trial": trial.number,
        "chosen as": why,
        "estimated accuracy": ", ".join(f"{k} {v:.3f}" for k, v in trial.user_attrs.get(TrialKey.ESTIMATES, {}).items()),
        "estimator": f"{space.estimator}, {space.strategy} subsets",
        "scored on": scored_on(trial, space),
    }
    measured = ranking.measured(study).get(trial.number)
    sampled = sampled_validations(study).get(trial.number)
    if measured:
        details["measured accuracy (all items)"] = ", ".join(f"{k} {v:.3f}" for k, v in measured.items())
    elif sampled:
        details["validated accuracy (a race on a sample of the items)"] = ", ".join(
            f"{k} {v:.3f} +- {sampled.get('sd', {}).get(k, 0.0):.3f} ({sampled.get('items', {}).get(k, '?')} items)"
            for k, v in sampled.get("accuracy", {}).items())

    def figures(folder: Path) -> None:  # written inside the export, so it is complete or absent with them
        shown = write_card_figures(run_dir, study, trial.number, folder)
        if shown:
            add_card_figures(folder, shown)
        elif progress:
            say(f"model card without figures: matplotlib is not installed ({EXTRA_HINT})")

    return builder.export(trial.user_attrs, out_dir, details=details, max_shard_size=max_shard_size,
                          owner=owner, force=force, finish=figures)


def scored_on(trial: FrozenTrial, space: SearchSpace) -> str:
    """'120 items (stage 2 of 3; stages 10, 30, all per benchmark), fitness 0.41 [0.38, 0.44] (90%)'."""
    record = Ranking.of(space).record(trial)
    text = f"{record.items} items"
    if record.stage is not None and len(space.stages) > 1:
        text += f" (stage {record.stage + 1} of {len(space.stages)}; stages {', '.join(map(str, space.stages))} per benchmark)"
    if record.fitness_interval:
        level = space.evaluation.level if space.evaluation else 0.9
        low, high = record.fitness_interval
        text += f", fitness interval [{low:.3f}, {high:.3f}] ({level:.0%})"
    return text
