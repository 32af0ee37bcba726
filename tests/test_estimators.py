"""Estimators on synthetic merges (theta = sum lambda_k theta_k), storage, and bad input."""

import numpy as np
import pytest

from evomerge.benchmarks import Benchmark, Item
from evomerge.errors import EvomergeError
from evomerge.estimate.estimators import METHODS, SubsetEstimator, fit_subset_estimator
from evomerge.estimate.irt import item_probabilities
from evomerge.estimate.responses import ResponseMatrix, check_labels, responses_path


def _synthetic_world(n_items=800, dims=3, n_experts=4, n_extra=8, n_heldout=40, seed=0):
    """Endpoint abilities, extra fit models and held-out merges from one true 2PL model."""
    rng = np.random.default_rng(seed)
    a = np.abs(rng.standard_normal((n_items, dims))) * 0.7 + 0.3
    b = rng.standard_normal(n_items) * 1.2
    theta_end = rng.standard_normal((n_experts, dims))

    def draw(theta):
        p = item_probabilities(theta, a, b)
        return rng.random(p.shape) < p

    lam_extra = rng.dirichlet(np.ones(n_experts), n_extra)
    lam_held = rng.dirichlet(np.ones(n_experts), n_heldout) * rng.uniform(0.8, 1.2, (n_heldout, 1))
    fit_rows = np.vstack([draw(theta_end), draw(lam_extra @ theta_end)])
    names = [f"expert{k}" for k in range(n_experts)] + [f"extra{i}" for i in range(n_extra)]
    return fit_rows, names, names[:n_experts], draw(lam_held @ theta_end)


@pytest.fixture(scope="module")
def world():
    return _synthetic_world()


def _mae(est, heldout, method):
    truth = heldout.mean(axis=1)
    preds = np.array([est.predict(row[est.indices], method) for row in heldout])
    return np.abs(preds - truth).mean()


def test_irt_estimators_beat_or_match_the_subset_mean(world):
    fit_rows, names, endpoints, heldout = world
    est = fit_subset_estimator(fit_rows, names, endpoints, n_items=40, strategy="random", seed=0, dims=2)
    errors = {m: _mae(est, heldout, m) for m in METHODS}
    assert errors["gmpirt"] < 0.06
    assert errors["mpirt"] < 0.07
    assert errors["gmpirt"] <= errors["mean"] + 0.01
    assert errors["gpirt"] <= errors["mean"] + 0.01
    assert 0.0 < est.anchor_weight_gmpirt < 1.0 and 0.0 < est.anchor_weight_gpirt < 1.0
    anchors = fit_subset_estimator(fit_rows, names, endpoints, n_items=10, strategy="anchor-irt", seed=0, dims=2)
    # with 10 items the IRT estimators clearly beat the plain subset mean
    assert _mae(anchors, heldout, "gmpirt") < _mae(anchors, heldout, "mean") - 0.03


def test_more_items_means_smaller_error(world):
    fit_rows, names, endpoints, heldout = world
    small = fit_subset_estimator(fit_rows, names, endpoints, 10, "random", seed=0, dims=2)
    large = fit_subset_estimator(fit_rows, names, endpoints, 200, "random", seed=0, dims=2)
    assert _mae(large, heldout, "gmpirt") < _mae(small, heldout, "gmpirt")
    assert _mae(large, heldout, "gmpirt") < 0.04


def test_merged_ability_recovers_the_endpoint_it_is():
    fit_rows, names, endpoints, _ = _synthetic_world(n_items=600, n_extra=4, seed=1)
    est = fit_subset_estimator(fit_rows, names, endpoints, 100, "stratified", seed=0, dims=3)
    lam, theta = est.merged_ability(fit_rows[2, est.indices])
    assert int(np.argmax(lam)) == 2
    assert theta.shape == (3,)


def test_predictions_bounded_for_all_correct_and_all_wrong(world):
    fit_rows, names, endpoints, _ = world
    est = fit_subset_estimator(fit_rows, names, endpoints, 30, "anchor-correctness", seed=0, dims=2)
    for answers in (np.ones(30, bool), np.zeros(30, bool)):
        preds = est.predict_all(answers)
        assert set(preds) == set(METHODS)
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in preds.values())
    assert est.predict(np.ones(30, bool), "mpirt") > est.predict(np.zeros(30, bool), "mpirt")


def test_degenerate_fit_models_still_give_bounded_estimates():
    y = np.zeros((2, 60), dtype=bool)
    y[0] = True  # one endpoint gets everything right, the other everything wrong
    est = fit_subset_estimator(y, ["good", "bad"], ["good", "bad"], 10, "random", seed=0, dims=1)
    for answers in (np.ones(10, bool), np.zeros(10, bool), np.arange(10) % 2 == 0):
        for value in est.predict_all(answers).values():
            assert np.isfinite(value) and 0.0 <= value <= 1.0
    single = fit_subset_estimator(y[:1], ["good"], ["good"], 5, "random", seed=0, dims=1)
    assert 0.0 <= single.predict(np.ones(5, bool)) <= 1.0


def test_save_load_round_trip(world, tmp_path):
    fit_rows, names, endpoints, heldout = world
    est = fit_subset_estimator(fit_rows, names, endpoints, 25, "anchor-irt", seed=5, dims=2, benchmark="toy")
    path = est.save(tmp_path / "run" / "estimators" / "toy.json")
    loaded = SubsetEstimator.load(path)
    assert np.array_equal(loaded.indices, est.indices)
    answers = heldout[0, est.indices]
    assert loaded.predict_all(answers) == pytest.approx(est.predict_all(answers))
    again = fit_subset_estimator(fit_rows, names, endpoints, 25, "anchor-irt", seed=5, dims=2)
    assert np.array_equal(again.indices, est.indices)


def test_bad_input_raises_clear_errors(world):
    fit_rows, names, endpoints, _ = world
    with pytest.raises(EvomergeError, match="only 800 items"):
        fit_subset_estimator(fit_rows, names, endpoints, 801, "random", 0, 2)
    with pytest.raises(EvomergeError, match="nobody"):
        fit_subset_estimator(fit_rows, names, ["nobody"], 10, "random", 0, 2)
    with pytest.raises(EvomergeError, match="strategy"):
        fit_subset_estimator(fit_rows, names, endpoints, 10, "best", 0, 2)
    est = fit_subset_estimator(fit_rows, names, endpoints, 10, "random", 0, 2)
    with pytest.raises(EvomergeError, match="10 items"):
        est.predict(np.ones(9, bool))
    with pytest.raises(EvomergeError, match="NaN"):
        est.predict(np.full(10, np.nan))
    with pytest.raises(EvomergeError, match="unknown estimator"):
        est.predict(np.ones(10, bool), "oracle")
    with pytest.raises(EvomergeError):
        SubsetEstimator.load("/nonexistent/estimator.json")


def test_response_matrix_storage(tmp_path):
    matrix = ResponseMatrix(np.array([[1, 0, 1], [0, 0, 1]]), ["base", "expert"], ["q1", "q2", "q3"], "toy")
    matrix = matrix.with_model("merge", np.array([True, True, False]))
    path = matrix.save(responses_path(tmp_path, "toy"))
    loaded = ResponseMatrix.load(path)
    assert loaded.model_names == ["base", "expert", "merge"]
    assert loaded.item_ids == ["q1", "q2", "q3"] and loaded.benchmark == "toy"
    assert loaded.correct.dtype == bool and loaded.accuracy()["merge"] == pytest.approx(2 / 3)
    est = fit_subset_estimator(loaded, None, ["base", "expert"], 2, "random", 0, 1)
    assert est.item_ids == ["q1", "q2", "q3"]
    with pytest.raises(EvomergeError, match="4 items"):
        matrix.with_model("bad", np.ones(4, bool))
    with pytest.raises(EvomergeError, match="duplicate"):
        ResponseMatrix(np.ones((2, 3), bool), ["m", "m"], ["q1", "q2", "q3"])
    with pytest.raises(EvomergeError, match="no stored responses"):
        loaded.row("ghost")


def test_items_without_labels_are_rejected():
    bench = Benchmark("toy", [Item("q1", "1+1="), Item("q2", "2+2=")])
    with pytest.raises(EvomergeError, match="no label"):
        check_labels(bench)
    check_labels(Benchmark("ok", [Item("q1", "1+1=", answer="2")]))
