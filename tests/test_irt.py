"""IRT fit: parameter recovery on data drawn from a known 2PL model, bounded edge cases, speed."""

import time

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.estimate.irt import IRTPriors, estimate_theta, fit_irt, item_probabilities


def _draw(n_models, n_items, dims, seed):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((n_models, dims))
    a = np.abs(rng.standard_normal((n_items, dims))) * 0.7 + 0.4
    b = rng.standard_normal(n_items)
    p = item_probabilities(theta, a, b)
    return theta, a, b, p, rng.random(p.shape) < p


def test_recovers_difficulty_ability_and_accuracy():
    theta, a, b, p, y = _draw(120, 300, 1, seed=0)
    fit = fit_irt(y, dims=1)
    assert np.corrcoef(fit.b, b)[0, 1] > 0.9
    # 1-D ability is identified up to sign
    assert abs(np.corrcoef(fit.theta[:, 0], theta[:, 0])[0, 1]) > 0.9
    assert np.abs(fit.probabilities().mean(axis=1) - p.mean(axis=1)).mean() < 0.02


def test_multidimensional_fit_predicts_probabilities():
    _, _, b, p, y = _draw(80, 400, 2, seed=1)
    fit = fit_irt(y, dims=2)
    assert np.corrcoef(fit.b, b)[0, 1] > 0.85
    assert np.abs(fit.probabilities() - p).mean() < 0.12


def test_few_models_and_degenerate_rows_stay_bounded():
    y = np.zeros((3, 50), dtype=bool)
    y[0] = True            # all-correct model
    y[2, :25] = True       # all-wrong model is row 1; items 25.. answered by one model only
    fit = fit_irt(y, dims=2)
    for arr in (fit.a, fit.b, fit.theta):
        assert np.all(np.isfinite(arr)) and np.abs(arr).max() < 20
    assert fit.probabilities()[0].mean() > fit.probabilities()[1].mean()


def test_missing_responses_are_ignored():
    _, _, b, _, y = _draw(60, 200, 1, seed=2)
    yf = y.astype(float)
    yf[np.random.default_rng(0).random(yf.shape) < 0.2] = np.nan
    fit = fit_irt(yf, dims=1)
    assert np.corrcoef(fit.b, b)[0, 1] > 0.85


def test_bad_input_is_an_evomerge_error():
    with pytest.raises(EvomergeError):
        fit_irt(np.array([[0, 2, 1]]), dims=1)
    with pytest.raises(EvomergeError):
        fit_irt(np.zeros((2, 3)), dims=0)
    with pytest.raises(EvomergeError):
        fit_irt(np.zeros(5), dims=1)


def test_ability_estimate_is_fast_and_bounded():
    _, a, b, _, y = _draw(1, 200, 2, seed=3)
    fit_theta = estimate_theta(y[0], a, b)
    assert fit_theta.shape == (2,)
    for extreme in (np.ones(200), np.zeros(200)):
        t = estimate_theta(extreme, a, b, theta_sd=1.0)
        assert np.all(np.isfinite(t)) and np.abs(t).max() < 10
    start = time.perf_counter()
    for _ in range(20):
        estimate_theta(y[0][:50], a[:50], b[:50])
    assert (time.perf_counter() - start) / 20 < 0.02


def test_fit_is_seconds_for_fifty_models_by_ten_thousand_items():
    _, _, _, _, y = _draw(50, 10_000, 2, seed=4)
    fit_irt(y[:2, :10], dims=2)  # compile outside the timing
    start = time.perf_counter()
    fit = fit_irt(y, dims=2, priors=IRTPriors())
    assert time.perf_counter() - start < 30  # ~3 s on 2 shared CPU cores
    assert np.all(np.isfinite(fit.a))
