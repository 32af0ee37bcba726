"""A trial's record read back typed, and the one ranking every command uses to pick a run's winner."""

from __future__ import annotations

import optuna

from evomerge.search.records import Ranking, StudyKey, TrialKey, validated_accuracies

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_of(*trials):
    study = optuna.create_study(direction="maximize")
    for value, attrs in trials:
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs=attrs))
    return study


def test_the_best_estimate_wins_until_a_trial_is_measured():
    study = study_of((0.60, {TrialKey.ITEMS: 40}), (0.55, {TrialKey.ITEMS: 40}), (0.50, {TrialKey.ITEMS: 40}))
    ranking = Ranking({"arith": 1.0})
    assert [t.number for t in ranking.ranked(study)] == [0, 1, 2]
    assert ranking.winner(study).trial.number == 0 and ranking.winner(study).reason == "best estimate"
    # validation measured trials 0 and 1 on every item: the estimate of 0 was the winner's curse
    study.set_user_attr(f"{StudyKey.FULL_ACCURACY}0", {"arith": 0.48})
    study.set_user_attr(f"{StudyKey.FULL_ACCURACY}1", {"arith": 0.53})
    assert validated_accuracies(study) == {0: {"arith": 0.48}, 1: {"arith": 0.53}}
    winner = ranking.winner(study)
    assert winner.trial.number == 1 and winner.reason == "best measured of 2 measured on every item"


def test_a_trial_raced_onto_every_item_is_measured():
    """What used to differ between `evomerge export` and a data-flow source: a trial raced onto a last
    stage of every item is measured, so it wins over a higher estimate made from a few items."""
    study = study_of((0.62, {TrialKey.STAGE: 0, TrialKey.ITEMS: 10, TrialKey.ESTIMATES: {"arith": 0.62}}),
                     (0.58, {TrialKey.STAGE: 2, TrialKey.ITEMS: 600, TrialKey.ESTIMATES: {"arith": 0.58}}))
    raced = Ranking({"arith": 1.0}, n_stages=3, last_stage_all=True)
    assert raced.measured(study) == {1: {"arith": 0.58}}
    assert raced.winner(study).trial.number == 1
    assert Ranking({"arith": 1.0}, n_stages=3, last_stage_all=False).winner(study).trial.number == 0


def test_per_task_values_rank_by_the_weighted_mean_and_read_back_typed():
    study = optuna.create_study(directions=["maximize", "maximize"])
    attrs = {TrialKey.BASELINE: "expert arith", TrialKey.ESTIMATES: {"arith": 0.9, "lang": 0.1},
             TrialKey.FITNESS_INTERVAL: [0.2, 0.5], TrialKey.MERGE_S: 0.5, TrialKey.ANSWERS: {"arith": "101"}}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 0.1], user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(values=[0.2, 0.7]))
    ranking = Ranking({"arith": 1.0, "lang": 2.0})
    assert [t.number for t in ranking.ranked(study)] == [1, 0]
    record = ranking.record(study.trials[0])
    assert record.fitness == (0.9 + 2 * 0.1) / 3 and record.baseline == "expert arith"
    assert record.items == 3 and record.fitness_interval == (0.2, 0.5) and record.merge_s == 0.5
    assert record.complete and record.error is None and record.stage is None
