"""The margin estimator: a merge's accuracy from its log-likelihood margins on a subset.

Right/wrong answers carry one bit per item; a multiple-choice item's *margin* (the
right choice's log-likelihood minus the best wrong one's, positive iff correct)
carries how far the model is from flipping it. A merge's margins lie close to a
line through its endpoints' margins on the same items (for a task-arithmetic merge
the line is nearly exact; for per-layer genomes and DARE masks it is the best
linear description), so a few dozen margins fix the line, and the endpoints'
margins on every other item predict the merge's there:

    margin_j(merge) ~ beta_0 + sum_e beta_e * margin_j(endpoint e) + noise (sd sigma)
    P(correct_j) = Phi(prediction_j / sigma)

The accuracy is (right answers on the scored items + sum of P(correct) on the
rest) / all items. ``beta`` has a prior fitted by empirical Bayes on the
calibration merges (their mean line and its spread; the ridge is residual variance
over prior variance, so no scale is tuned). ``sigma`` is the geometric mean of two
readings of how far the merge's margins fall from its line beyond the subset: the
calibration merges' (median over them, of the spread on the items beyond the
stage around the line fitted on its items), and the candidate's own spread on the
subset scaled by how much larger the calibration merges' spread is beyond it than
on it; a candidate that leaves the line on its subset (a broken merge) is taken as
uncertain beyond it too, and one broken calibration merge does not widen every
candidate's sigma. Endpoints answer every item at calibration anyway, so the
model costs no item evaluation; it needs margins, which generative kinds do not
give (the estimator falls back to gmp-IRT there).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.stats import norm

_TINY_RIDGE = 1e-3
"""Keeps a calibration merge's own (nearly unregularised) line solvable when endpoints coincide."""
_MIN_PRIOR_VARIANCE = 0.01
"""Floor on the prior variance of a line coefficient (4 calibration merges can agree by chance)."""
_MIN_SIGMA = 1e-6
MIN_MERGES = 2
"""Calibration merges with margins the model needs (the prior's spread takes two)."""


def _features(endpoint_margins: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(indices)), endpoint_margins[:, indices].T])


def _line(margins: np.ndarray, features: np.ndarray, ridge: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.linalg.solve(features.T @ features + np.diag(ridge), features.T @ margins + ridge * prior)


def _on_line(beta: np.ndarray, endpoint_margins: np.ndarray, indices=slice(None)) -> np.ndarray:
    """The margins ``beta``'s line gives the items at ``indices`` (every item by default)."""
    return beta[0] + beta[1:] @ endpoint_margins[:, indices]


@dataclasses.dataclass
class MarginModel:
    """The endpoints' margins on every item, the line's prior, and each stage's sigma."""

    endpoint_margins: np.ndarray   # endpoints x items
    prior_mean: np.ndarray         # intercept, one coefficient per endpoint
    ridge: np.ndarray              # residual variance / prior variance, per coefficient
    sigmas: list[float]            # per stage: the calibration merges' median spread beyond the stage
    inflations: list[float]        # per stage: their median spread beyond the stage over their spread on it

    def line(self, indices: np.ndarray, margins: np.ndarray) -> np.ndarray:
        """The merge's line, fitted (MAP) to its margins on ``indices``."""
        return _line(np.asarray(margins, dtype=np.float64), _features(self.endpoint_margins, indices),
                     self.ridge, self.prior_mean)

    def item_probabilities(self, indices: np.ndarray, correct: np.ndarray, margins: np.ndarray,
                           stage: int) -> np.ndarray:
        """P(correct) of every item: the answers on ``indices``, Phi(line / sigma) elsewhere."""
        margins = np.asarray(margins, dtype=np.float64)
        beta = self.line(indices, margins)
        own = _spread(margins - _on_line(beta, self.endpoint_margins, indices))
        sigma = np.sqrt(self.sigmas[stage] * max(self.inflations[stage] * own, _MIN_SIGMA))
        p = norm.cdf(_on_line(beta, self.endpoint_margins) / sigma)
        p[indices] = np.asarray(correct, dtype=np.float64)
        return p

    def accuracy(self, indices: np.ndarray, correct: np.ndarray, margins: np.ndarray, stage: int) -> float:
        return float(self.item_probabilities(indices, correct, margins, stage).mean())

    def to_dict(self) -> dict:
        return {"endpoint_margins": np.round(self.endpoint_margins, 4).tolist(),
                "prior_mean": self.prior_mean.tolist(), "ridge": self.ridge.tolist(), "sigmas": list(self.sigmas),
                "inflations": list(self.inflations)}

    @classmethod
    def from_dict(cls, data: dict) -> "MarginModel":
        return cls(np.asarray(data["endpoint_margins"], dtype=np.float64),
                   np.asarray(data["prior_mean"], dtype=np.float64), np.asarray(data["ridge"], dtype=np.float64),
                   [float(s) for s in data["sigmas"]], [float(s) for s in data["inflations"]])


def fit_margin_model(endpoint_margins: np.ndarray | None, merge_margins: np.ndarray | None,
                     stage_indices: Sequence[np.ndarray]) -> MarginModel | None:
    """The model from the endpoints' margins (every item) and the calibration merges' (NaN where not
    scored); None where it cannot be fitted: no margins, an endpoint missing some, fewer than
    `MIN_MERGES` merges with margins beyond every stage's items."""
    if endpoint_margins is None or merge_margins is None or not np.isfinite(endpoint_margins).all():
        return None
    n_items = endpoint_margins.shape[1]
    n_coef = endpoint_margins.shape[0] + 1
    rows = [row for row in np.atleast_2d(merge_margins) if np.isfinite(row).sum() > n_coef]
    staged = [np.asarray(ix, dtype=np.int64) for ix in stage_indices]
    usable = []
    for row in rows:
        seen = np.isfinite(row)
        if all(seen[ix].all() and (seen.sum() > len(ix)) for ix in staged if len(ix) < n_items):
            usable.append(row)
    if len(usable) < MIN_MERGES:
        return None
    uniform = np.r_[0.0, np.full(n_coef - 1, 1.0 / (n_coef - 1))]
    lines, residual_sq = [], []
    for row in usable:
        seen = np.flatnonzero(np.isfinite(row))
        beta = _line(row[seen], _features(endpoint_margins, seen), np.full(n_coef, _TINY_RIDGE), uniform)
        lines.append(beta)
        residual_sq.append(np.mean((row[seen] - _on_line(beta, endpoint_margins, seen)) ** 2))
    lines = np.array(lines)
    prior_variance = np.maximum(lines.var(axis=0, ddof=1), _MIN_PRIOR_VARIANCE)
    model = MarginModel(endpoint_margins.astype(np.float64), lines.mean(axis=0),
                        float(np.mean(residual_sq)) / prior_variance, [], [])
    for ix in staged:
        if len(ix) >= n_items:   # an exact stage predicts nothing
            model.sigmas.append(1.0)
            model.inflations.append(1.0)
            continue
        beyond_spread, inflation = [], []
        for row in usable:
            beyond = np.setdiff1d(np.flatnonzero(np.isfinite(row)), ix)
            beta = model.line(ix, row[ix])
            beyond_spread.append(_spread(row[beyond] - _on_line(beta, endpoint_margins, beyond), centred=True))
            inflation.append(beyond_spread[-1] / max(_spread(row[ix] - _on_line(beta, endpoint_margins, ix)),
                                                     _MIN_SIGMA))
        model.sigmas.append(float(max(np.median(beyond_spread), _MIN_SIGMA)))
        model.inflations.append(float(np.median(inflation)))
    return model


def _spread(residuals: np.ndarray, centred: bool = False) -> float:
    """Root mean square of residuals (their sd when ``centred``)."""
    return float(np.std(residuals) if centred else np.sqrt(np.mean(np.square(residuals))))
