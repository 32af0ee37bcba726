"""Calibration on less: responses with missing answers, merges scored on a sample, fixed item parameters."""

import numpy as np
import pytest

from evomerge.estimate import (ResponseMatrix, fit_subset_estimator, sample_items, subsets_from_item_params,
                               subsets_from_responses)
from evomerge.estimate.estimators import _held_out_truth
from evomerge.estimate.irt import IRTFit, IRTPriors, item_probabilities

from test_estimators import _mae, _synthetic_world


@pytest.fixture(scope="module")
def world():
    return _synthetic_world(n_items=600, n_extra=8, n_heldout=30, seed=3)


def _sampled(fit_rows, names, endpoints, size, per_merge, seed=0):
    """The fit rows as a calibration on less sees them: endpoints on every item, the other rows on the
    subset (chosen from the endpoints) and ``per_merge`` random other items each."""
    matrix = ResponseMatrix(fit_rows, names, [f"q{j}" for j in range(fit_rows.shape[1])], "toy")
    subsets = subsets_from_responses(matrix.subset(endpoints), size, "anchor-irt", seed, 2)
    merges = [n for n in names if n not in endpoints]
    samples = sample_items(matrix.n_items, subsets[0].indices, len(merges), per_merge, seed)
    observed = np.ones(fit_rows.shape, dtype=bool)
    for k, name in enumerate(merges):
        row = np.zeros(matrix.n_items, dtype=bool)
        row[subsets[0].indices] = True
        row[samples[k]] = True
        observed[names.index(name)] = row
    return ResponseMatrix(fit_rows, names, matrix.item_ids, "toy", observed), subsets


def test_a_calibration_on_sampled_items_fits_with_missing_responses(world):
    fit_rows, names, endpoints, heldout = world
    matrix, subsets = _sampled(fit_rows, names, endpoints, 30, 60)
    assert matrix.observed is not None and matrix.observed.sum() == 4 * 600 + 8 * 90
    sampled = fit_subset_estimator(matrix, None, endpoints, 30, "anchor-irt", seed=0, dims=2, subsets=subsets)
    assert list(sampled.indices) == list(subsets[0].indices)
    assert sampled.stages[0].cv_models == 8  # every merge held out once, against its estimated truth
    full = fit_subset_estimator(fit_rows, names, endpoints, 30, "anchor-irt", seed=0, dims=2)
    endpoints_only = fit_subset_estimator(fit_rows[:4], names[:4], endpoints, 30, "anchor-irt", seed=0, dims=2)
    # the sampled merges are worth their items: near the fully scored ones, well ahead of none
    assert _mae(sampled, heldout, "gmpirt") < _mae(full, heldout, "gmpirt") + 0.015
    assert _mae(sampled, heldout, "gmpirt") < _mae(endpoints_only, heldout, "gmpirt") - 0.005
    assert np.isfinite(sampled.a).all() and 1.0 <= sampled.stages[0].sd_scale["anchor"] < 10


def test_the_held_out_truth_of_a_sampled_model_is_unbiased(world):
    fit_rows, names, endpoints, _ = world
    matrix, subsets = _sampled(fit_rows, names, endpoints, 30, 60)
    fit_ = fit_subset_estimator(matrix, None, endpoints, 30, "anchor-irt", 0, 2, subsets=subsets)
    irt = IRTFit(fit_.a, fit_.b, np.zeros((1, 2)), IRTPriors(), 0.0, 0)
    row = fit_rows[-1].astype(float)
    rng = np.random.default_rng(0)
    rest = np.setdiff1d(np.arange(600), subsets[0].indices)
    truths, variances = [], []
    for _ in range(400):
        seen = np.zeros(600, dtype=bool)
        seen[subsets[0].indices] = True
        seen[rng.choice(rest, 60, replace=False)] = True
        truth, variance = _held_out_truth(row, seen, subsets[0], irt, 1.0)
        truths.append(truth)
        variances.append(variance)
    assert abs(np.mean(truths) - row.mean()) < 0.005
    assert np.var(truths) == pytest.approx(np.mean(variances), rel=0.35)  # its variance is what it says
    assert _held_out_truth(row, np.ones(600, dtype=bool), subsets[0], irt, 1.0) == (pytest.approx(row.mean()), 0.0)
    seen = np.zeros(600, dtype=bool)
    seen[rest[:100]] = True
    assert _held_out_truth(row, seen, subsets[0], irt, 1.0) is None  # no answers on the subset: no use


def test_known_item_parameters_are_kept_and_the_endpoints_need_only_the_subset(world):
    fit_rows, names, endpoints, heldout = world
    full = fit_subset_estimator(fit_rows, names, endpoints, 30, "anchor-irt", seed=0, dims=2)
    subsets = subsets_from_item_params(full.a, full.b, 30, "anchor-irt", 0)
    observed = np.zeros(fit_rows.shape, dtype=bool)
    observed[:, subsets[0].indices] = True  # every model on the subset only
    reused = fit_subset_estimator(fit_rows, names, endpoints, 30, "anchor-irt", 0, 2, observed=observed,
                                  subsets=subsets, item_params=(full.a, full.b), fallback_anchor_weight=0.3)
    assert np.array_equal(reused.a, full.a) and np.array_equal(reused.b, full.b)
    assert reused.anchor_weight_gmpirt == 0.3  # no model answered beyond the subset: nothing to fit the mix on
    assert _mae(reused, heldout, "gmpirt") < 0.06


def test_sampled_items_spread_over_the_items_outside_the_subset():
    taken = np.arange(0, 100, 10)
    samples = sample_items(100, taken, 3, 20, seed=1)
    assert [len(s) for s in samples] == [20, 20, 20]
    union = np.concatenate(samples)
    assert len(np.unique(union)) == 60 and not np.isin(union, taken).any()
    wrapped = sample_items(100, taken, 6, 20, seed=1)  # 120 draws of 90 items: each item at most twice
    assert np.bincount(np.concatenate(wrapped)).max() <= 2 and len(np.unique(np.concatenate(wrapped))) == 90


def test_responses_keep_which_items_each_model_answered(tmp_path):
    matrix = ResponseMatrix.empty(["q1", "q2", "q3", "q4"], "toy").with_answers("merge", [1, 3], [True, False])
    assert matrix.observed_row("merge").tolist() == [False, True, False, True]
    assert not matrix.complete("merge") and matrix.accuracy()["merge"] == 0.5
    matrix = matrix.with_answers("merge", [0], [True]).with_model("base", [1, 1, 0, 0])
    assert matrix.complete("base") and matrix.row("merge").tolist() == [True, True, False, False]
    matrix.save(tmp_path / "r.npz")
    loaded = ResponseMatrix.load(tmp_path / "r.npz")
    assert loaded.observed_row("merge").tolist() == [True, True, False, True] and loaded.complete("base")
    full = ResponseMatrix(np.ones((1, 4), bool), ["m"], ["a", "b", "c", "d"])
    full.save(tmp_path / "f.npz")
    assert ResponseMatrix.load(tmp_path / "f.npz").observed is None  # files from before: every answer known
    probabilities = item_probabilities(np.zeros((1, 2)), np.zeros((4, 2)), np.zeros(4))
    assert probabilities.shape == (1, 4)


def test_the_validation_race_estimates_from_a_sample_and_is_exact_on_every_item(world):
    from types import SimpleNamespace

    from evomerge.search.records import Ranking
    from evomerge.search.validate import _Race

    fit_rows, names, endpoints, heldout = world
    est = fit_subset_estimator(fit_rows, names, endpoints, 30, "anchor-irt", seed=0, dims=2)
    race = _Race({"toy": est}, {"toy": None}, Ranking({"toy": 1.0}), "gmpirt", seed=0)
    for number, row in enumerate(heldout[:2]):
        race.enter(SimpleNamespace(number=number, user_attrs={
            "answers": {"toy": "".join("1" if row[i] else "0" for i in est.indices)}, "stage": 0}))
        for i in race.order["toy"]:
            race.lanes[number]["toy"].answers[int(i)] = bool(row[i])
    rest = len(race.order["toy"])
    assert race.accuracy(0, "toy", rest) == (pytest.approx(heldout[0].mean()), 0.0)  # every item: measured
    value, sd = race.accuracy(0, "toy", 100)
    assert abs(value - heldout[0].mean()) < 3 * sd + 0.01 and 0 < sd < 0.06
    # two trials that agree on a small sample are not thereby certain to agree everywhere
    race.lanes[1]["toy"] = race.lanes[0]["toy"]
    assert race.difference_sd(1, 0, {"toy": 20}) > 0.02
