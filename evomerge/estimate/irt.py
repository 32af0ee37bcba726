"""Multidimensional 2PL item response theory: fit item parameters, estimate abilities.

``P(model i answers item j) = sigmoid(a_j . theta_i - b_j)``.

The fit is a MAP estimate with Gaussian priors on theta, a and b, so a handful
of models (the merge endpoints) still give bounded, finite parameters; all-correct
items or models just sit at the prior-limited edge instead of running to infinity.
It alternates exact Newton steps on each item's (a_j, b_j) and each model's
theta -- every sub-problem is a small penalised logistic regression -- compiled
with numba, which fits 50 models x 10k items in about a second.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit

from evomerge.errors import EvomergeError

# Logits are clipped here so sigmoid never returns exactly 0 or 1 (no log(0)).
_LOGIT_CLIP = 30.0


@dataclasses.dataclass(frozen=True)
class IRTPriors:
    """Prior standard deviations; small values = stronger shrinkage with few models.

    b's prior is centred on the mean difficulty (empirical Bayes), so a benchmark
    that is hard for every model is not pulled towards 50 % accuracy.
    """

    theta_sd: float = 1.0
    a_sd: float = 1.0
    b_sd: float = 3.0


@dataclasses.dataclass
class IRTFit:
    """Fitted parameters: ``a`` (items x dims), ``b`` (items,), ``theta`` (models x dims)."""

    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    priors: IRTPriors
    log_posterior: float
    n_sweeps: int

    @property
    def dims(self) -> int:
        return int(self.a.shape[1])

    def probabilities(self, theta: np.ndarray | None = None) -> np.ndarray:
        """P(correct) for every (model, item); ``theta`` defaults to the fitted models."""
        theta = self.theta if theta is None else np.atleast_2d(theta)
        return item_probabilities(theta, self.a, self.b)


def item_probabilities(theta: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sigmoid(theta @ a.T - b), shaped like ``theta @ a.T``."""
    z = np.clip(np.asarray(theta) @ a.T - b, -_LOGIT_CLIP, _LOGIT_CLIP)
    return 1.0 / (1.0 + np.exp(-z))


# --------------------------------------------------------------------------- numba kernels


@njit(cache=True)
def _solve_spd(h, g):
    """Solve h x = g for a small symmetric positive definite h (Cholesky, in place copy)."""
    n = h.shape[0]
    L = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            s = h[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            if i == j:
                L[i, i] = np.sqrt(max(s, 1e-12))
            else:
                L[i, j] = s / L[j, j]
    y = np.zeros(n)
    for i in range(n):
        s = g[i]
        for k in range(i):
            s -= L[i, k] * y[k]
        y[i] = s / L[i, i]
    x = np.zeros(n)
    for i in range(n - 1, -1, -1):
        s = y[i]
        for k in range(i + 1, n):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]
    return x


@njit(cache=True)
def _clipped_logit(a, theta, b, i, j):
    """a_j . theta_i - b_j, clipped so exp() never overflows."""
    z = -b[j]
    for k in range(theta.shape[1]):
        z += a[j, k] * theta[i, k]
    return min(max(z, -30.0), 30.0)


@njit(cache=True)
def _residual_and_weight(y, a, theta, b, i, j):
    """(y_ij - p, p (1 - p)) for p = P(model i answers item j): gradient and Hessian terms."""
    p = 1.0 / (1.0 + np.exp(-_clipped_logit(a, theta, b, i, j)))
    return y[i, j] - p, p * (1.0 - p)


@njit(cache=True)
def _damped_newton_step(h, g, max_step):
    """Newton step solving h x = g, shortened to at most ``max_step`` in norm."""
    step = _solve_spd(h, g)
    norm = np.sqrt(np.sum(step * step))
    return step if norm <= max_step else step * (max_step / norm)


@njit(cache=True)
def _newton_items(y, mask, theta, a, b, prec_a, prec_b, mean_b, max_step):
    """One damped Newton step on every item's (a_j, b_j) with the thetas held fixed."""
    n_models, n_items = y.shape
    d = theta.shape[1]
    p = d + 1
    for j in range(n_items):
        g = np.zeros(p)
        h = np.zeros((p, p))
        for i in range(n_models):
            if mask[i, j] == 0:
                continue
            r, w = _residual_and_weight(y, a, theta, b, i, j)
            # features x = (theta_i, -1)
            for k in range(d):
                g[k] += r * theta[i, k]
                for l in range(k + 1):
                    h[k, l] += w * theta[i, k] * theta[i, l]
                h[d, k] -= w * theta[i, k]
            g[d] -= r
            h[d, d] += w
        for k in range(d):
            g[k] -= prec_a * a[j, k]
            h[k, k] += prec_a
        g[d] -= prec_b * (b[j] - mean_b)
        h[d, d] += prec_b
        for k in range(p):
            for l in range(k):
                h[l, k] = h[k, l]
        step = _damped_newton_step(h, g, max_step)
        for k in range(d):
            a[j, k] += step[k]
        b[j] += step[d]


@njit(cache=True)
def _newton_thetas(y, mask, theta, a, b, prec_theta, max_step):
    """One damped Newton step on every model's theta with the item parameters held fixed."""
    n_models, n_items = y.shape
    d = theta.shape[1]
    for i in range(n_models):
        g = np.zeros(d)
        h = np.zeros((d, d))
        for j in range(n_items):
            if mask[i, j] == 0:
                continue
            r, w = _residual_and_weight(y, a, theta, b, i, j)
            for k in range(d):
                g[k] += r * a[j, k]
                for l in range(k + 1):
                    h[k, l] += w * a[j, k] * a[j, l]
        for k in range(d):
            g[k] -= prec_theta * theta[i, k]
            h[k, k] += prec_theta
            for l in range(k):
                h[l, k] = h[k, l]
        step = _damped_newton_step(h, g, max_step)
        for k in range(d):
            theta[i, k] += step[k]


@njit(cache=True)
def _log_posterior(y, mask, theta, a, b, prec_theta, prec_a, prec_b, mean_b):
    n_models, n_items = y.shape
    d = theta.shape[1]
    total = 0.0
    for i in range(n_models):
        for j in range(n_items):
            if mask[i, j] == 0:
                continue
            z = _clipped_logit(a, theta, b, i, j)
            # log sigmoid(z) if y else log sigmoid(-z), computed stably
            if y[i, j] > 0.5:
                total -= np.log1p(np.exp(-z))
            else:
                total -= np.log1p(np.exp(z))
    total -= 0.5 * prec_theta * np.sum(theta * theta)
    total -= 0.5 * prec_a * np.sum(a * a)
    total -= 0.5 * prec_b * np.sum((b - mean_b) * (b - mean_b))
    return total


def _centre_abilities(theta, a, b):
    """Shift the fitted abilities to mean 0, moving the shift into b (logits unchanged).

    Without this, with few models and many items the fit prefers to explain overall
    difficulty by a common ability offset (cheap: few thetas) rather than by b, and
    a new model's ability -- estimated under the N(0, 1) prior -- lands far from
    the fitted ones, biasing every prediction.
    """
    shift = theta.mean(axis=0)
    theta -= shift
    b -= a @ shift


# --------------------------------------------------------------------------- public API


def _as_response_arrays(correct, mask):
    y = np.asarray(correct)
    if y.ndim != 2 or y.shape[0] < 1 or y.shape[1] < 1:
        raise EvomergeError(f"IRT needs a models x items response matrix, got shape {y.shape}")
    if mask is None:
        if y.dtype.kind == "f":
            mask = ~np.isnan(y)
        else:
            mask = np.ones(y.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != y.shape:
        raise EvomergeError(f"IRT mask shape {mask.shape} differs from responses {y.shape}")
    yf = np.where(mask, np.nan_to_num(y.astype(np.float64)), 0.0)
    if np.any((yf != 0.0) & (yf != 1.0)):
        raise EvomergeError("IRT responses must be 0/1 (correct or wrong)")
    return np.ascontiguousarray(yf), np.ascontiguousarray(mask.astype(np.uint8))


def _initial_params(y, mask, dims, rng):
    """Start from the SVD of the centred response matrix: close to the MAP, so few sweeps."""
    n_models, n_items = y.shape
    counts = mask.sum(axis=0)
    p_item = (np.sum(y * mask, axis=0) + 0.5) / (counts + 1.0)
    b = -np.log(p_item / (1.0 - p_item))
    centred = np.where(mask > 0, y - p_item, 0.0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    theta = np.zeros((n_models, dims))
    k = min(dims, u.shape[1])
    theta[:, :k] = u[:, :k] * np.sqrt(n_models)
    theta += 0.1 * rng.standard_normal(theta.shape)
    sd = theta.std(axis=0)
    theta /= np.where(sd > 1e-8, sd, 1.0)
    a = 0.1 * rng.standard_normal((n_items, dims))
    return np.ascontiguousarray(theta), np.ascontiguousarray(a), np.ascontiguousarray(b)


def fit_irt(
    correct: np.ndarray,
    dims: int = 2,
    *,
    priors: IRTPriors = IRTPriors(),
    mask: np.ndarray | None = None,
    seed: int = 0,
    max_sweeps: int = 300,
    tol: float = 1e-6,
    init: IRTFit | None = None,
) -> IRTFit:
    """MAP-fit a ``dims``-dimensional 2PL model to a models x items 0/1 matrix.

    ``mask`` (or NaN entries of a float matrix) marks unobserved responses.
    ``init`` warm-starts item parameters from an earlier fit (used by cross-validation).
    """
    if dims < 1:
        raise EvomergeError(f"IRT dims must be >= 1, got {dims}")
    y, m = _as_response_arrays(correct, mask)
    rng = np.random.default_rng(seed)
    theta, a, b = _initial_params(y, m, dims, rng)
    if init is not None:
        if init.a.shape != a.shape:
            raise EvomergeError("IRT warm start has a different number of items or dims")
        a, b = init.a.copy(), init.b.copy()
        theta = np.zeros_like(theta)
        for _ in range(5):
            _newton_thetas(y, m, theta, a, b, 1.0 / priors.theta_sd**2, 2.0)
    prec_t, prec_a, prec_b = 1.0 / priors.theta_sd**2, 1.0 / priors.a_sd**2, 1.0 / priors.b_sd**2
    mean_b = float(b.mean())
    previous = _log_posterior(y, m, theta, a, b, prec_t, prec_a, prec_b, mean_b)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        _newton_items(y, m, theta, a, b, prec_a, prec_b, mean_b, 2.0)
        _newton_thetas(y, m, theta, a, b, prec_t, 2.0)
        _centre_abilities(theta, a, b)
        mean_b = float(b.mean())
        current = _log_posterior(y, m, theta, a, b, prec_t, prec_a, prec_b, mean_b)
        if abs(current - previous) <= tol * max(1.0, abs(previous)):
            previous = current
            break
        previous = current
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(np.isfinite(theta))):
        raise EvomergeError("IRT fit diverged (non-finite parameters); try fewer dims")
    return IRTFit(a=a, b=b, theta=theta, priors=priors, log_posterior=float(previous), n_sweeps=sweeps)


def estimate_theta(
    correct: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta_sd: float = 1.0,
    max_iter: int = 50,
) -> np.ndarray:
    """MAP ability of one model from its answers on the items described by ``a``, ``b``.

    A small Newton loop in numpy (milliseconds for hundreds of items); the prior
    keeps an all-correct or all-wrong model finite.
    """
    y = np.asarray(correct, dtype=np.float64).ravel()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[0] != y.shape[0] or b.shape[0] != y.shape[0]:
        raise EvomergeError(f"ability estimate got {y.shape[0]} answers for {a.shape[0]} items")
    return fit_logistic_weights(a, -b, y, prior_mean=np.zeros(a.shape[1]), prior_sd=theta_sd,
                                max_iter=max_iter)


def fit_logistic_weights(
    features: np.ndarray,
    offset: np.ndarray,
    y: np.ndarray,
    prior_mean: np.ndarray,
    prior_sd: float,
    max_iter: int = 50,
    tol: float = 1e-8,
) -> np.ndarray:
    """MAP weights w of ``y ~ Bernoulli(sigmoid(features @ w + offset))`` with a Gaussian prior.

    Shared by ability estimation (features = a) and merged-ability estimation
    (features = a @ endpoint_thetas.T, weights = lambda).
    """
    x = np.asarray(features, dtype=np.float64)
    w = np.array(prior_mean, dtype=np.float64, copy=True)
    prec = 1.0 / prior_sd**2
    for _ in range(max_iter):
        z = np.clip(x @ w + offset, -_LOGIT_CLIP, _LOGIT_CLIP)
        s = 1.0 / (1.0 + np.exp(-z))
        g = x.T @ (y - s) - prec * (w - prior_mean)
        h = (x * (s * (1.0 - s))[:, None]).T @ x + prec * np.eye(x.shape[1])
        step = np.linalg.solve(h, g)
        norm = float(np.linalg.norm(step))
        if norm > 2.0:
            step *= 2.0 / norm
        w += step
        if norm < tol:
            break
    return w
