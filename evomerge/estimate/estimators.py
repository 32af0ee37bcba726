"""Estimate a candidate merge's full-benchmark accuracy, with an interval, from its answers on a subset.

Methods (all return a number in [0, 1]):

* ``mean``    plain subset accuracy.
* ``anchor``  weighted subset accuracy (each item stands for its cluster / stratum).
* ``pirt``    tinyBenchmarks p-IRT: fit theta on the subset, then
              (observed subset answers + IRT P(correct) of every unseen item) / all items.
* ``gpirt``   tinyBenchmarks gp-IRT: ``w * anchor + (1 - w) * pirt``.
* ``mpirt``   MERGE^3 mp-IRT: the merge's ability is ``theta = sum_k lambda_k theta_k``
              over the endpoint (expert / base) abilities, lambda by MAP on the
              subset answers; then blended with the observed answers as p-IRT does.
* ``gmpirt``  ``w * anchor + (1 - w) * mpirt``.
* ``margin``  the candidate's log-likelihood margins on the subset, regressed on its
              endpoints' margins, predict its answers on the unseen items
              (`evomerge.estimate.margins`); gmp-IRT's value where the benchmark
              or the candidate has no margins. Its interval is gmp-IRT's width.

An estimator holds one or more *stages*: nested subsets of growing size (racing
promotes a candidate from one to the next, re-estimating from every answer so
far). Everything data-driven is fitted per stage by cross-validating the fit
models (hold a fold out, refit IRT, predict it from its subset answers):

* the mix weight ``w`` minimises the held-out squared error of the mix itself
  (residual pairs, so correlated errors count), so an IRT estimate that fails on
  held-out models gets little or no weight at that subset size;
* mp-IRT's prior width on lambda;
* each method's *sd scale* ``c >= 1``: how far held-out errors exceed what the
  candidate's own uncertainty explains, ``c^2 = mean((error / sd_post)^2)``.

``estimate`` returns the value and an interval ``value +- q * c * sd_post``, where
``sd_post`` is the candidate's own uncertainty: the stratified sampling error of the
scored items (each a Bernoulli draw at the candidate's IRT ability, standing for its
cluster) for mean and anchor; the Laplace posterior of theta (p-IRT) or lambda
(mp-IRT) propagated to the accuracy, plus the Bernoulli noise of the unseen items,
for the IRT methods. ``q`` is a normal quantile, or Student t when ``c`` was
estimated from few held-out models. A mix's interval is the same mix of its
parts' intervals (errors taken as fully correlated: never narrower than honest).
A stage of every item is exact: its interval has zero width.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.files import read_json, write_json
from evomerge.estimate.extract import STRATEGIES, Subset, extract_stages, stage_sizes
from evomerge.estimate.irt import IRTFit, IRTPriors, estimate_theta, fit_irt, fit_logistic_weights, item_probabilities
from evomerge.estimate.margins import MarginModel, fit_margin_model
from evomerge.estimate.responses import as_correctness

METHODS = ("mean", "anchor", "pirt", "gpirt", "mpirt", "gmpirt", "margin")
DEFAULT_METHOD = "margin"
"""A search's estimator unless its space names one: gmp-IRT wherever margins are missing."""
_FILE_VERSION = 2
# Used only when there are too few models to cross-validate (documented in docs/estimate.md).
_FALLBACK_ANCHOR_WEIGHT = 0.5
# Candidate widths of mp-IRT's prior on lambda; cross-validation picks one per stage.
LAMBDA_SD_GRID = (0.15, 0.3, 0.6, 1.2)
_DEFAULT_LAMBDA_SD = 0.3
MIN_HELD_OUT_MERGES = 4
"""Below this many non-endpoint fit models, cross-validation also holds out endpoints."""
DEFAULT_LEVEL = 0.9
"""Coverage the intervals aim at (docs/estimate.md measures it)."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """An estimated full-benchmark accuracy, its interval and what it rests on."""

    value: float
    low: float
    high: float
    sd: float       # total: the candidate's own uncertainty and the cross-validated model error
    margin: float   # half-width of the interval before clipping to [0, 1] (quantile x sd)
    items: int      # answers it was estimated from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Stage:
    """One subset size: its items and what cross-validation fixed for it."""

    subset: Subset
    anchor_weight_gpirt: float
    anchor_weight_gmpirt: float
    lambda_sd: float = _DEFAULT_LAMBDA_SD
    cv_rmse: dict[str, float] = dataclasses.field(default_factory=dict)
    sd_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    cv_models: int = 0

    @property
    def size(self) -> int:
        return len(self.subset.indices)

    @property
    def exact(self) -> bool:
        """Every item is answered: the estimate is the measured accuracy."""
        return self.size == self.subset.n_total

    def to_dict(self) -> dict:
        return {"subset": self.subset.to_dict(), "anchor_weight_gpirt": self.anchor_weight_gpirt,
                "anchor_weight_gmpirt": self.anchor_weight_gmpirt, "lambda_sd": self.lambda_sd,
                "cv_rmse": self.cv_rmse, "sd_scale": self.sd_scale, "cv_models": self.cv_models}

    @classmethod
    def from_dict(cls, data: dict) -> "Stage":
        return cls(subset=Subset.from_dict(data["subset"]),
                   anchor_weight_gpirt=float(data["anchor_weight_gpirt"]),
                   anchor_weight_gmpirt=float(data["anchor_weight_gmpirt"]),
                   lambda_sd=float(data.get("lambda_sd", _DEFAULT_LAMBDA_SD)),
                   cv_rmse={k: float(v) for k, v in dict(data.get("cv_rmse", {})).items()},
                   sd_scale={k: float(v) for k, v in dict(data.get("sd_scale", {})).items()},
                   cv_models=int(data.get("cv_models", 0)))


@dataclasses.dataclass
class SubsetEstimator:
    """Everything the search needs for one benchmark: which items to score, and how to extrapolate.

    ``stages`` are nested subsets of growing size; a single-stage estimator is the
    plain fixed-subset case. ``indices`` / ``subset`` are those of the first stage.
    """

    a: np.ndarray                 # items x dims discrimination
    b: np.ndarray                 # items difficulty
    endpoint_names: list[str]
    endpoint_theta: np.ndarray    # endpoints x dims
    stages: list[Stage]
    theta_sd: float = 1.0
    benchmark: str = ""
    item_ids: list[str] | None = None
    margin_model: MarginModel | None = None

    # ------------------------------------------------------------------ stages
    @property
    def subset(self) -> Subset:
        return self.stages[0].subset

    @property
    def indices(self) -> np.ndarray:
        """Items (positions in the full benchmark) a candidate is first scored on, sorted."""
        return self.stages[0].subset.indices

    @property
    def anchor_weight_gpirt(self) -> float:
        return self.stages[0].anchor_weight_gpirt

    @property
    def anchor_weight_gmpirt(self) -> float:
        return self.stages[0].anchor_weight_gmpirt

    @property
    def lambda_sd(self) -> float:
        return self.stages[0].lambda_sd

    @property
    def cv_rmse(self) -> dict[str, float]:
        return self.stages[0].cv_rmse

    @property
    def n_total(self) -> int:
        return int(self.b.shape[0])

    def stage_indices(self, stage: int) -> np.ndarray:
        """Items of one stage (they include every earlier stage's items), sorted."""
        return self.stages[stage].subset.indices

    def stage_for(self, n_answers: int) -> int:
        """The stage whose subset has ``n_answers`` items (stage sizes are distinct)."""
        for number, stage in enumerate(self.stages):
            if stage.size == n_answers:
                return number
        sizes = ", ".join(str(s.size) for s in self.stages)
        raise EvomergeError(
            f"got {n_answers} answers but the {self.benchmark or 'benchmark'} stages have {sizes} items "
            "(score the model on estimator.stage_indices(stage))")

    # ------------------------------------------------------------------ prediction
    def predict(self, subset_correct: np.ndarray, method: str = "gmpirt", stage: int | None = None,
                subset_margins: np.ndarray | None = None) -> float:
        """Estimated full-benchmark accuracy from answers on a stage's items (same order as its indices)
        and, for ``margin``, the margins on them."""
        return self.predict_all(subset_correct, (_checked_method(method),), stage, subset_margins)[method]

    def predict_all(self, subset_correct: np.ndarray, methods: Sequence[str] = METHODS,
                    stage: int | None = None, subset_margins: np.ndarray | None = None) -> dict[str, float]:
        """All requested estimates at once (shares the ability fits)."""
        return {m: e.value for m, e in self.estimate_all(subset_correct, methods, stage,
                                                          subset_margins=subset_margins).items()}

    def estimate(self, subset_correct: np.ndarray, method: str = "gmpirt", stage: int | None = None,
                 level: float = DEFAULT_LEVEL, subset_margins: np.ndarray | None = None) -> Estimate:
        """The estimate with its ``level`` interval (see the module doc)."""
        return self.estimate_all(subset_correct, (_checked_method(method),), stage, level, subset_margins)[method]

    def reads_margins(self, subset_margins: np.ndarray | None) -> bool:
        """Whether ``margin`` uses its margin model for these margins (else it is gmp-IRT): a NaN among
        them (an item whose kind gives none) counts as none."""
        return (self.margin_model is not None and subset_margins is not None
                and bool(np.isfinite(np.asarray(subset_margins, dtype=np.float64)).all()))

    def estimate_all(self, subset_correct: np.ndarray, methods: Sequence[str] = METHODS,
                     stage: int | None = None, level: float = DEFAULT_LEVEL,
                     subset_margins: np.ndarray | None = None) -> dict[str, Estimate]:
        for method in methods:
            _checked_method(method)
        if not 0.0 < level < 1.0:
            raise EvomergeError(f"interval level must be between 0 and 1, got {level}")
        y = self._check_answers(subset_correct, stage)
        stage = self.stage_for(len(y)) if stage is None else stage
        st = self.stages[stage]
        if subset_margins is not None and np.shape(subset_margins) != y.shape:
            raise EvomergeError(f"{np.size(subset_margins)} margins for {y.shape[0]} answers")
        # a mix's interval is the same mix of its parts' (each calibrated on its own residuals):
        # calibrating the mix on the residuals its weight was fitted to would flatter it
        parts = {"gpirt": "pirt", "gmpirt": "mpirt"}
        wanted = set(methods)
        if "margin" in wanted:
            wanted.add("gmpirt")
        for method in set(wanted) & set(parts):
            wanted |= {"anchor", parts[method]}
        raw = _predict(y, st.subset, self.a, self.b, self.endpoint_theta, self.theta_sd, st.lambda_sd,
                       st.anchor_weight_gpirt, st.anchor_weight_gmpirt,
                       [m for m in METHODS if m in wanted and m != "margin"])
        out = {}
        for method, (value, sd_post) in raw.items():
            if st.exact:
                sd = margin = 0.0
            elif method in parts:
                w = st.anchor_weight_gpirt if method == "gpirt" else st.anchor_weight_gmpirt
                anchor, irt = out["anchor"], out[parts[method]]
                sd, margin = w * anchor.sd + (1 - w) * irt.sd, w * anchor.margin + (1 - w) * irt.margin
            else:
                scale = st.sd_scale.get(method, 1.0)
                sd = scale * sd_post
                margin = _interval_quantile(level, st.cv_models if scale > 1.0 else 0) * sd
            out[method] = Estimate(value, float(max(0.0, value - margin)), float(min(1.0, value + margin)),
                                   float(sd), float(margin), len(y))
        if "margin" in methods:
            irt = out["gmpirt"]
            value = irt.value
            if self.reads_margins(subset_margins) and not st.exact:
                value = self.margin_model.accuracy(st.subset.indices, y, subset_margins, stage)
            out["margin"] = Estimate(value, float(max(0.0, value - irt.margin)), float(min(1.0, value + irt.margin)),
                                     irt.sd, irt.margin, len(y))
        out = {m: out[m] for m in methods}
        return out

    def item_probabilities(self, subset_correct: np.ndarray, method: str = "gmpirt", stage: int | None = None,
                           subset_margins: np.ndarray | None = None) -> np.ndarray:
        """P(correct) of every item for the model whose answers on a stage's items are given: from its
        margins (``margin``, where it has them), at the merged ability mp-IRT infers (``mpirt`` /
        ``gmpirt`` / ``margin``, with endpoints), else at its own p-IRT ability. Validation predicts the
        items it has not scored yet with these."""
        y = self._check_answers(subset_correct, stage).astype(np.float64)
        stage = self.stage_for(len(y)) if stage is None else stage
        st = self.stages[stage]
        idx = st.subset.indices
        if _checked_method(method) == "margin" and self.reads_margins(subset_margins) and not st.exact:
            return self.margin_model.item_probabilities(idx, y, subset_margins, stage)
        if method in ("mpirt", "gmpirt", "margin") and self.endpoint_theta.shape[0]:
            theta = _fit_lambda(y, self.a[idx], self.b[idx], self.endpoint_theta, st.lambda_sd) @ self.endpoint_theta
        else:
            theta = estimate_theta(y, self.a[idx], self.b[idx], theta_sd=self.theta_sd)
        return item_probabilities(theta[None, :], self.a, self.b)[0]

    def merged_ability(self, subset_correct: np.ndarray, stage: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(lambda over endpoints, merged theta) as mp-IRT infers them; useful for diagnostics."""
        y = self._check_answers(subset_correct, stage).astype(np.float64)
        st = self.stages[self.stage_for(len(y)) if stage is None else stage]
        idx = st.subset.indices
        lam = _fit_lambda(y, self.a[idx], self.b[idx], self.endpoint_theta, st.lambda_sd)
        return lam, lam @ self.endpoint_theta

    def _check_answers(self, subset_correct: np.ndarray, stage: int | None) -> np.ndarray:
        y = as_correctness(subset_correct, "subset answers").ravel()
        if stage is None:
            if len(self.stages) == 1 and y.shape[0] != self.stages[0].size:
                raise EvomergeError(
                    f"predict got {y.shape[0]} answers but the {self.benchmark or 'benchmark'} subset has "
                    f"{self.stages[0].size} items (score the model on estimator.indices)")
            self.stage_for(y.shape[0])
        elif not 0 <= stage < len(self.stages):
            raise EvomergeError(f"stage {stage} does not exist; the estimator has {len(self.stages)}")
        elif y.shape[0] != self.stages[stage].size:
            raise EvomergeError(f"predict got {y.shape[0]} answers for stage {stage} of "
                                f"{self.stages[stage].size} items")
        return y

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        return {
            "version": _FILE_VERSION,
            "benchmark": self.benchmark,
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "endpoint_names": list(self.endpoint_names),
            "endpoint_theta": self.endpoint_theta.tolist(),
            "theta_sd": self.theta_sd,
            "item_ids": self.item_ids,
            "stages": [s.to_dict() for s in self.stages],
            "margin_model": None if self.margin_model is None else self.margin_model.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SubsetEstimator":
        try:
            version = data.get("version")
            if version not in (1, _FILE_VERSION):
                raise EvomergeError(f"estimator file version {version} is not {_FILE_VERSION}")
            # version 1 held one stage's fields at the top level (no model error: intervals from sd_post)
            stages = data["stages"] if version == _FILE_VERSION else [data]
            a = np.asarray(data["a"], dtype=np.float64)
            dims = a.shape[1] if a.ndim == 2 else 1
            return cls(
                a=a.reshape(-1, dims),
                b=np.asarray(data["b"], dtype=np.float64),
                endpoint_names=list(data["endpoint_names"]),
                endpoint_theta=np.asarray(data["endpoint_theta"], dtype=np.float64).reshape(-1, dims),
                stages=[Stage.from_dict(s) for s in stages],
                theta_sd=float(data["theta_sd"]),
                benchmark=str(data.get("benchmark", "")),
                item_ids=data.get("item_ids"),
                margin_model=None if data.get("margin_model") is None else MarginModel.from_dict(data["margin_model"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EvomergeError(f"estimator file is missing or has a bad field: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write json (stages, item parameters, endpoint abilities, mix weights) for resuming."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SubsetEstimator":
        data = read_json(path, "estimator file")
        return cls.from_dict(data)


def _checked_method(method: str) -> str:
    if method not in METHODS:
        raise EvomergeError(f"unknown estimator {method!r}; choose one of {', '.join(METHODS)}")
    return method


# ---------------------------------------------------------------------- core maths


def _fit_lambda(y, a_sub, b_sub, endpoint_theta, lambda_sd):
    """MAP lambda: logits = (a_S @ Theta_E.T) @ lambda - b_S, prior N(uniform mix, lambda_sd^2)."""
    k = endpoint_theta.shape[0]
    features = a_sub @ endpoint_theta.T
    return fit_logistic_weights(features, -b_sub, y, prior_mean=np.full(k, 1.0 / k), prior_sd=lambda_sd)


def _posterior_cov(features, offset, weights, prior_sd):
    """Laplace covariance of MAP logistic weights: inverse of X' diag(p(1-p)) X + I / prior_sd^2."""
    p = item_probabilities(weights[None, :], features, -offset)[0]
    h = (features * (p * (1.0 - p))[:, None]).T @ features + np.eye(features.shape[1]) / prior_sd**2
    return np.linalg.inv(h)


def _irt_accuracy(y, subset, a, b, theta, cov, jacobian):
    """p-IRT accuracy at ``theta`` and its sd: the parameters' posterior (delta method)
    plus the Bernoulli noise of the unseen items given theta. ``jacobian``: d theta / d parameters."""
    p_all = item_probabilities(theta[None, :], a, b)[0]
    unseen = np.ones(subset.n_total, dtype=bool)
    unseen[subset.indices] = False
    p_u = p_all[unseen]
    value = float((y.sum() + p_u.sum()) / subset.n_total)
    v_u = p_u * (1.0 - p_u)
    gradient = jacobian.T @ ((a[unseen] * v_u[:, None]).sum(axis=0) / subset.n_total)
    var = float(gradient @ cov @ gradient) + float(v_u.sum()) / subset.n_total**2
    return value, np.sqrt(max(var, 0.0))


def _predict(y, subset, a, b, endpoint_theta, theta_sd, lambda_sd, w_gp, w_gmp, methods):
    """{method: (estimate in [0, 1], the candidate's own sd)} for the requested methods."""
    y = np.asarray(y, dtype=np.float64)
    idx = subset.indices
    n, n_total = len(y), subset.n_total
    wanted = set(methods)
    out: dict[str, tuple[float, float]] = {}
    anchor = float(np.dot(subset.weights, y))
    theta = estimate_theta(y, a[idx], b[idx], theta_sd=theta_sd)
    # sampling sd of the subset estimates: each scored item is a Bernoulli draw (P from the
    # candidate's IRT ability) standing for its stratum / cluster of w_j * n_total items
    p_items = item_probabilities(theta[None, :], a[idx], b[idx])[0]
    v_items = p_items * (1.0 - p_items)
    anchor_var = np.sum(v_items * np.maximum(subset.weights**2 - subset.weights / n_total, 0.0))
    if "mean" in wanted:
        mean_var = np.sum(v_items) / n**2 * ((n_total - n) / (n_total - 1.0) if n_total > 1 else 0.0)
        out["mean"] = (float(y.mean()), float(np.sqrt(mean_var)))
    anchor_sd = float(np.sqrt(anchor_var))
    if "anchor" in wanted:
        out["anchor"] = (anchor, anchor_sd)
    if wanted & {"pirt", "gpirt"}:
        cov = _posterior_cov(a[idx], -b[idx], theta, theta_sd)
        pirt = _irt_accuracy(y, subset, a, b, theta, cov, np.eye(len(theta)))
        out["pirt"] = pirt
        out["gpirt"] = _mix(w_gp, (anchor, anchor_sd), pirt)
    if wanted & {"mpirt", "gmpirt"}:
        if endpoint_theta.shape[0] == 0:
            raise EvomergeError("mp-IRT needs at least one endpoint model")
        features = a[idx] @ endpoint_theta.T
        lam = _fit_lambda(y, a[idx], b[idx], endpoint_theta, lambda_sd)
        cov = _posterior_cov(features, -b[idx], lam, lambda_sd)
        mpirt = _irt_accuracy(y, subset, a, b, lam @ endpoint_theta, cov, endpoint_theta.T)
        out["mpirt"] = mpirt
        out["gmpirt"] = _mix(w_gmp, (anchor, anchor_sd), mpirt)
    return {m: (float(np.clip(out[m][0], 0.0, 1.0)), float(out[m][1])) for m in methods}


def _interval_quantile(level: float, n_cv: int) -> float:
    """Two-sided ``level`` quantile: normal, or Student t with ``n_cv - 1`` degrees of freedom when
    the sd's scale was estimated from ``n_cv`` held-out models (wider when they are few)."""
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    if n_cv < 2:
        return z
    df = n_cv - 1
    # Cornish-Fisher expansion of the t quantile; within 1 % of the exact one from 3 degrees of freedom
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _mix(w, anchor, irt):
    """``w * anchor + (1 - w) * irt``; sds add linearly (both rest on the same answers)."""
    return w * anchor[0] + (1.0 - w) * irt[0], w * anchor[1] + (1.0 - w) * irt[1]


# ---------------------------------------------------------------------- cross-validation


@dataclasses.dataclass
class _HeldOut:
    """One stage's held-out predictions: per key (method, or ("mpirt", lambda_sd)) the residuals, the
    predictions' sds and the variance of the truth they were measured against (0 for a model scored on
    every item; see `_held_out_truth`), and which models were held out."""

    residuals: dict = dataclasses.field(default_factory=dict)
    sds: dict = dataclasses.field(default_factory=dict)
    noise: dict = dataclasses.field(default_factory=dict)
    models: set = dataclasses.field(default_factory=set)

    def add(self, key, value_sd, truth, noise=0.0, model=None):
        self.residuals.setdefault(key, []).append(value_sd[0] - truth)
        self.sds.setdefault(key, []).append(value_sd[1])
        self.noise.setdefault(key, []).append(noise)
        self.models.add(model)

    def arrays(self, key):
        return (np.asarray(self.residuals.get(key, [])), np.asarray(self.sds.get(key, [])),
                np.asarray(self.noise.get(key, [])))


def _extract_for(fit: IRTFit, y: np.ndarray, sizes: Sequence[int], strategy: str, seed: int,
                 mask: np.ndarray | None = None, first: Subset | None = None) -> list[Subset]:
    """The stages' subsets from a fit; unobserved answers count as the fit's probabilities
    (anchor-correctness clusters the items' answer vectors). ``first``: the first stage, given."""
    correctness = y if mask is None or mask.all() else np.where(mask, y, fit.probabilities())
    return extract_stages(sizes, y.shape[1], strategy, seed, difficulty=fit.b,
                          item_embedding=np.hstack([fit.a, fit.b[:, None]]), correctness=correctness, first=first)


def _held_out_truth(y_row, seen, subset: Subset, fit: IRTFit, theta_sd: float) -> tuple[float, float] | None:
    """A held-out model's full-benchmark accuracy and the variance of that figure, or None.

    Scored on every item: its accuracy, exactly. Scored on the subset and a random sample
    ``R`` of the other items only (a calibration merge on less): the subset's answers,
    the IRT prediction of every other item at the ability its subset answers give,
    and the mean residual ``y - p`` on ``R`` scaled to all other items (a difference
    estimator: unbiased whatever the prediction's error, and precise where the
    prediction is good). None when the model lacks an answer on the subset, or has
    fewer than two answers beyond it.
    """
    idx = subset.indices
    if seen.all():
        return float(y_row.mean()), 0.0
    if not seen[idx].all():
        return None
    rest = np.ones(subset.n_total, dtype=bool)
    rest[idx] = False
    sample = seen & rest
    n_sample, n_rest = int(sample.sum()), int(rest.sum())
    if n_sample < 2:
        return None
    theta = estimate_theta(y_row[idx], fit.a[idx], fit.b[idx], theta_sd=theta_sd)
    p = item_probabilities(theta[None, :], fit.a, fit.b)[0]
    residual = y_row[sample] - p[sample]
    truth = (y_row[idx].sum() + p[rest].sum() + n_rest * residual.mean()) / subset.n_total
    variance = (n_rest / subset.n_total) ** 2 * residual.var(ddof=1) / n_sample * (1.0 - n_sample / n_rest)
    return float(truth), float(max(variance, 0.0))


def _cross_validate(y, mask, sizes, strategy, endpoint_rows, dims, priors, lambda_sds, seed, full_fit, n_folds,
                    final, fixed_items=False, reextract=True):
    """Held-out residuals of mean / anchor / p-IRT / mp-IRT (every prior width) per stage.

    Per fold, IRT is refit without the held-out models (``fixed_items``: the item
    parameters stay, only abilities are fitted), which are then predicted from
    their answers on two subsets per stage: one re-extracted from the fold's fit
    (the anchor estimate is not flattered by anchors chosen on the very models it
    is scored on; only with ``reextract``, for models scored on every item) and the
    ``final`` one the search will use (a few items can fail an IRT estimate in their
    own way -- mp-IRT 25 points off at 10 items on one zoo build -- and only these
    items show it). With enough other models (extra models, calibration merges) only
    those are held out: they stand for the candidates, while predicting an endpoint
    without it in the fit asks mp-IRT for a direction no merge of the remaining
    endpoints has. A model scored on a sample of the items is measured against the
    estimate `_held_out_truth` makes, whose variance is kept with its residual.
    """
    n_models = y.shape[0]
    rng = np.random.default_rng(seed + 7919)
    others = np.setdiff1d(np.arange(n_models), endpoint_rows)
    pool = others if len(others) >= MIN_HELD_OUT_MERGES else np.arange(n_models)
    folds = np.array_split(rng.permutation(pool), min(n_folds, len(pool)))
    held_out = [_HeldOut() for _ in sizes]
    for held in folds:
        train = np.setdiff1d(np.arange(n_models), held)
        if len(train) == 0:
            continue
        if fixed_items:  # abilities are per model: the held-out rows never moved the others'
            fold_fit = IRTFit(full_fit.a, full_fit.b, full_fit.theta[train], priors, float("nan"), 0)
        else:
            fold_fit = fit_irt(y[train], dims, priors=priors, mask=mask[train], seed=seed, init=full_fit,
                               max_sweeps=100, tol=1e-5)
        variants = [(_extract_for(fold_fit, y[train], sizes, strategy, seed, mask[train]), True)] if reextract else []
        variants.append((final, False))
        train_pos = {int(m): p for p, m in enumerate(train)}
        ends = [train_pos[e] for e in endpoint_rows if e in train_pos]
        ends_theta = fold_fit.theta[ends] if ends else np.zeros((0, fold_fit.dims))
        for subsets, needs_every_item in variants:
            for record, subset in zip(held_out, subsets):
                if len(subset.indices) == subset.n_total:
                    continue  # an exact stage has no error to learn
                for h in held:
                    if needs_every_item and not mask[h].all():
                        continue
                    measured = _held_out_truth(y[h], mask[h], subset, fold_fit, priors.theta_sd)
                    if measured is None:
                        continue
                    truth, noise = measured
                    ys = y[h, subset.indices]
                    pred = _predict(ys, subset, fold_fit.a, fold_fit.b, ends_theta, priors.theta_sd, 1.0,
                                    0.0, 0.0, ("mean", "anchor", "pirt"))
                    for m, value_sd in pred.items():
                        record.add(m, value_sd, truth, noise, int(h))
                    for sd in lambda_sds if ends else ():
                        pred = _predict(ys, subset, fold_fit.a, fold_fit.b, ends_theta, priors.theta_sd, sd,
                                        0.0, 0.0, ("mpirt",))
                        record.add(("mpirt", sd), pred["mpirt"], truth, noise, int(h))
    return held_out


def _mix_weight(r_irt: np.ndarray, r_anchor: np.ndarray) -> float:
    """Anchor weight w minimising the held-out squared error of ``w * anchor + (1 - w) * irt``.

    Residual pairs of the same models, so errors the two share are not mistaken
    for independent ones; an IRT estimate that errs more than the anchor on the
    held-out models gets little or no weight.
    """
    if len(r_irt) == 0 or len(r_anchor) == 0:
        return _FALLBACK_ANCHOR_WEIGHT
    diff = r_anchor - r_irt
    denom = float(np.dot(diff, diff))
    if denom <= 1e-12:
        return _FALLBACK_ANCHOR_WEIGHT
    return float(np.clip(-np.dot(r_irt, diff) / denom, 0.0, 1.0))


def _sd_scale(residuals: np.ndarray, sds: np.ndarray, noise: np.ndarray | None = None) -> float:
    """Factor (>= 1) on the posterior sd that makes held-out errors standard: sqrt(mean((r / sd)^2)).

    A candidate's own sd already grows where its accuracy is uncertain (mid-range, few
    items) and shrinks near 0 or 1; the held-out models say by how much it falls short.
    ``noise``: the variance of each residual's truth (a model scored on a sample of the
    items), taken out of its square.
    """
    if len(residuals) == 0:
        return 1.0
    noise = np.zeros_like(residuals) if noise is None else noise
    return float(np.sqrt(max(1.0, float(np.mean((residuals**2 - noise) / np.maximum(sds, 1e-4) ** 2)))))


def _rmse(residuals: np.ndarray, noise: np.ndarray) -> float:
    """Root mean squared error, less the part the truths' own variance explains."""
    return float(np.sqrt(max(0.0, float(np.mean(residuals**2 - noise)))))


def _calibrate_stage(subset: Subset, record: _HeldOut | None, grid: Sequence[float],
                     fallback: float = _FALLBACK_ANCHOR_WEIGHT) -> Stage:
    """Mix weights, lambda prior width and model errors of one stage from its held-out residuals."""
    if record is None or not record.residuals:
        exact = len(subset.indices) == subset.n_total
        return Stage(subset, 0.0 if exact else fallback,
                     0.0 if exact else fallback,
                     grid[0] if len(grid) == 1 else _DEFAULT_LAMBDA_SD)
    mse = {key: float(np.mean(r**2)) for key in record.residuals for r in [record.arrays(key)[0]]}
    mp_scores = {sd: mse[("mpirt", sd)] for sd in grid if ("mpirt", sd) in mse}
    lambda_sd = min(mp_scores, key=mp_scores.get) if mp_scores else (
        grid[0] if len(grid) == 1 else _DEFAULT_LAMBDA_SD)
    arrays = {m: record.arrays(m) for m in ("mean", "anchor", "pirt")}
    if mp_scores:
        arrays["mpirt"] = record.arrays(("mpirt", lambda_sd))
    weights = {"gpirt": _mix_weight(arrays["pirt"][0], arrays["anchor"][0])}
    if "mpirt" in arrays:
        weights["gmpirt"] = _mix_weight(arrays["mpirt"][0], arrays["anchor"][0])
    for mixed, irt in (("gpirt", "pirt"), ("gmpirt", "mpirt")):
        if irt in arrays:
            w = weights[mixed]
            (r_a, s_a, v_a), (r_i, s_i, _) = arrays["anchor"], arrays[irt]
            arrays[mixed] = (w * r_a + (1 - w) * r_i, w * s_a + (1 - w) * s_i, v_a)
    return Stage(
        subset=subset,
        anchor_weight_gpirt=weights["gpirt"],
        anchor_weight_gmpirt=weights.get("gmpirt", _FALLBACK_ANCHOR_WEIGHT),
        lambda_sd=lambda_sd,
        cv_rmse={m: _rmse(r, v) for m, (r, _, v) in arrays.items()},
        sd_scale={m: _sd_scale(r, s, v) for m, (r, s, v) in arrays.items() if m not in ("gpirt", "gmpirt")},
        cv_models=len(record.models),
    )


def fit_abilities(correct: np.ndarray, observed: np.ndarray, a: np.ndarray, b: np.ndarray,
                  theta_sd: float = 1.0) -> np.ndarray:
    """Each model's MAP ability from the answers it has, the item parameters held fixed."""
    theta = np.zeros((correct.shape[0], a.shape[1]))
    for i, (row, seen) in enumerate(zip(correct, observed)):
        if seen.any():
            theta[i] = estimate_theta(row[seen], a[seen], b[seen], theta_sd=theta_sd)
    return theta


def _checked_item_params(item_params, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(v, dtype=np.float64) for v in item_params)
    a = a.reshape(len(a), -1) if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[0] != n_total or b.shape != (n_total,):
        raise EvomergeError(f"item parameters cover {a.shape[0]} items (a {a.shape}, b {b.shape}); "
                            f"the responses have {n_total}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise EvomergeError("item parameters must be finite numbers")
    return a, b


def subsets_from_responses(responses_matrix: Any, n_items: int | Sequence[int | str], strategy: str = "anchor-irt",
                           seed: int = 0, dims: int = 2, *, priors: IRTPriors = IRTPriors(),
                           item_params: tuple[np.ndarray, np.ndarray] | None = None,
                           first: Subset | None = None) -> list[Subset]:
    """The stages' subsets an estimator fitted on these responses would choose, without cross-validation.

    Calibration on less picks the items from the models scored on every item (base,
    experts), then scores its random merges on those items and a sample of the others.
    ``item_params``: (a, b) known already (only ``anchor-correctness`` then reads the answers).
    ``first``: the first stage's items, chosen already (anchors that came with the item parameters).
    """
    y, mask = _response_arrays(responses_matrix, None)
    sizes = stage_sizes([n_items] if np.isscalar(n_items) else list(n_items), y.shape[1], "stages")
    if item_params is None:
        fit = fit_irt(y, dims, priors=priors, seed=seed, mask=mask)
    else:
        a, b = _checked_item_params(item_params, y.shape[1])
        fit = IRTFit(a, b, fit_abilities(y, mask, a, b, priors.theta_sd), priors, float("nan"), 0)
    return _extract_for(fit, y, sizes, strategy, seed, mask, first)


def subsets_from_item_params(a: np.ndarray, b: np.ndarray, n_items: int | Sequence[int | str],
                             strategy: str = "anchor-irt", seed: int = 0, first: Subset | None = None) -> list[Subset]:
    """The stages' subsets chosen from known item parameters alone (no answers needed, so the
    models can then be scored on just these items). ``anchor-correctness`` clusters answers: it needs a fit."""
    if strategy == "anchor-correctness":
        raise EvomergeError("the anchor-correctness strategy clusters the items' answers, which known item "
                            "parameters do not have; use the anchor (anchor-irt) or stratified strategy")
    a, b = _checked_item_params((a, b), len(np.asarray(b)))
    sizes = stage_sizes([n_items] if np.isscalar(n_items) else list(n_items), len(b), "stages")
    return extract_stages(sizes, len(b), strategy, seed, difficulty=b, item_embedding=np.hstack([a, b[:, None]]),
                          first=first)


def _response_arrays(responses_matrix: Any, observed) -> tuple[np.ndarray, np.ndarray]:
    """(answers as floats, observed mask) of a ``ResponseMatrix`` or a bool matrix (+ optional mask)."""
    if hasattr(responses_matrix, "correct"):
        observed = responses_matrix.observed if observed is None else observed
        responses_matrix = responses_matrix.correct
    y = as_correctness(responses_matrix, "response matrix")
    if y.ndim != 2 or y.shape[0] == 0:
        raise EvomergeError(f"need a models x items response matrix with at least one model, got {y.shape}")
    mask = np.ones(y.shape, dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    if mask.shape != y.shape:
        raise EvomergeError(f"observed mask {mask.shape} differs from the responses {y.shape}")
    return np.where(mask, y, False).astype(np.float64), mask


def fit_subset_estimator(
    responses_matrix: Any,
    model_names: Sequence[str] | None,
    endpoint_names: Sequence[str],
    n_items: int | Sequence[int | str],
    strategy: str = "anchor-irt",
    seed: int = 0,
    dims: int = 2,
    *,
    priors: IRTPriors = IRTPriors(),
    lambda_sd: float | Sequence[float] = LAMBDA_SD_GRID,
    n_folds: int = 5,
    benchmark: str = "",
    item_ids: Sequence[str] | None = None,
    observed: np.ndarray | None = None,
    subsets: Sequence[Subset] | None = None,
    item_params: tuple[np.ndarray, np.ndarray] | None = None,
    fallback_anchor_weight: float = _FALLBACK_ANCHOR_WEIGHT,
    margins: np.ndarray | None = None,
) -> SubsetEstimator:
    """Fit IRT on all given models, pick the subset(s), and calibrate each stage by cross-validation.

    ``responses_matrix``: models x items bools (or a ``ResponseMatrix``, whose
    names / ids / observed mask are then used). ``endpoint_names``: the merge endpoints (base
    and experts) whose abilities span the merged abilities for mp-IRT; all
    other rows are extra models that only sharpen the item parameters.
    ``n_items``: the subset size, or increasing stage sizes of nested subsets
    (the last may be ``"all"``). ``lambda_sd``: width of mp-IRT's prior on lambda
    (around the uniform mix); a sequence is a grid from which cross-validation picks.
    ``observed``: which answers exist (models scored on a sample of the items; the
    fit skips the rest). ``subsets``: the stages' items, chosen beforehand (the items
    the sampled models were scored on; `subsets_from_responses`) instead of from this
    fit. ``item_params``: (a (items x dims), b) known already (another study's fit, a
    file): only the models' abilities are fitted. ``fallback_anchor_weight``: the mixes'
    weight on the anchor estimate where no held-out model can fit one (a file's gp-IRT lambda).
    ``margins``: the models' log-likelihood margins (NaN where unknown; a ``ResponseMatrix``'s own by
    default): with them the estimator also holds the ``margin`` method's model.
    """
    if hasattr(responses_matrix, "correct"):
        model_names = model_names or responses_matrix.model_names
        item_ids = item_ids or responses_matrix.item_ids
        benchmark = benchmark or responses_matrix.benchmark
        if margins is None:
            margins = getattr(responses_matrix, "margins", None)
    yf, mask = _response_arrays(responses_matrix, observed)
    model_names = list(model_names) if model_names is not None else [f"model{i}" for i in range(yf.shape[0])]
    if len(model_names) != yf.shape[0]:
        raise EvomergeError(f"{len(model_names)} model names for a response matrix of {yf.shape[0]} models")
    missing = [e for e in endpoint_names if e not in model_names]
    if missing or not endpoint_names:
        raise EvomergeError(f"endpoint models {missing or '(none given)'} have no responses; known: {model_names}")
    if strategy not in STRATEGIES:
        raise EvomergeError(f"unknown subset strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n_total = yf.shape[1]
    sizes = stage_sizes([n_items] if np.isscalar(n_items) else list(n_items), n_total,
                        f"{benchmark or 'benchmark'} stages")

    if item_params is None:
        fit: IRTFit = fit_irt(yf, dims, priors=priors, seed=seed, mask=mask)
    else:
        a, b = _checked_item_params(item_params, n_total)
        fit = IRTFit(a, b, fit_abilities(yf, mask, a, b, priors.theta_sd), priors, float("nan"), 0)
    chosen_here = subsets is None and item_params is None  # on the held-out models too: re-extract per fold
    if subsets is None:
        subsets = _extract_for(fit, yf, sizes, strategy, seed, mask)
    elif [len(s.indices) for s in subsets] != sizes or any(s.n_total != n_total for s in subsets):
        raise EvomergeError(f"the given subsets have {[len(s.indices) for s in subsets]} items, the stages ask "
                            f"for {sizes} of {n_total}")
    subsets = list(subsets)
    endpoint_rows = [model_names.index(e) for e in endpoint_names]
    grid = [float(lambda_sd)] if np.isscalar(lambda_sd) else [float(v) for v in lambda_sd]
    if not grid or min(grid) <= 0:
        raise EvomergeError(f"lambda_sd must be positive, got {lambda_sd}")
    records = (_cross_validate(yf, mask, sizes, strategy, endpoint_rows, fit.dims, priors, grid, seed, fit, n_folds,
                               subsets, fixed_items=item_params is not None, reextract=chosen_here)
               if yf.shape[0] >= 2 else [None] * len(sizes))
    margin_model = None
    if margins is not None:
        margins = np.where(mask, np.asarray(margins, dtype=np.float64), np.nan)
        merge_rows = [i for i in range(len(model_names)) if i not in endpoint_rows]
        margin_model = fit_margin_model(margins[endpoint_rows], margins[merge_rows] if merge_rows else None,
                                        [s.indices for s in subsets])
    return SubsetEstimator(
        a=fit.a,
        b=fit.b,
        endpoint_names=list(endpoint_names),
        endpoint_theta=fit.theta[endpoint_rows].copy(),
        stages=[_calibrate_stage(subset, record, grid, fallback_anchor_weight) for subset, record in zip(subsets, records)],
        theta_sd=priors.theta_sd,
        benchmark=benchmark,
        item_ids=list(item_ids) if item_ids is not None else None,
        margin_model=margin_model,
    )
