"""Estimate a candidate merge's full-benchmark accuracy from its answers on a small subset.

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

The mix weights ``w`` are not constants: they come from cross-validating the
fit models (hold a fold out, refit IRT, predict it from its subset answers) and
setting ``w = mse_irt / (mse_irt + mse_anchor)`` -- the inverse-variance mix of
two roughly independent estimates, which is tinyBenchmarks' bias/variance rule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.jsonfile import read_json, write_json
from evomerge.estimate.extract import STRATEGIES, Subset, check_subset_size, extract_subset
from evomerge.estimate.irt import IRTFit, IRTPriors, estimate_theta, fit_irt, fit_logistic_weights, item_probabilities
from evomerge.estimate.responses import as_correctness

METHODS = ("mean", "anchor", "pirt", "gpirt", "mpirt", "gmpirt")
_FILE_VERSION = 1
# Used only when there are too few models to cross-validate (documented in docs/estimate.md).
_FALLBACK_ANCHOR_WEIGHT = 0.5
# Candidate widths of mp-IRT's prior on lambda; cross-validation picks one per benchmark.
LAMBDA_SD_GRID = (0.15, 0.3, 0.6, 1.2)
_DEFAULT_LAMBDA_SD = 0.3


@dataclasses.dataclass
class SubsetEstimator:
    """Everything the search needs for one benchmark: which items to score, and how to extrapolate."""

    subset: Subset
    a: np.ndarray                 # items x dims discrimination
    b: np.ndarray                 # items difficulty
    endpoint_names: list[str]
    endpoint_theta: np.ndarray    # endpoints x dims
    anchor_weight_gpirt: float
    anchor_weight_gmpirt: float
    theta_sd: float = 1.0
    lambda_sd: float = 1.0
    benchmark: str = ""
    item_ids: list[str] | None = None
    cv_rmse: dict[str, float] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ prediction
    @property
    def indices(self) -> np.ndarray:
        """Items (positions in the full benchmark) a candidate must be scored on, sorted."""
        return self.subset.indices

    @property
    def n_total(self) -> int:
        return int(self.b.shape[0])

    def predict(self, subset_correct: np.ndarray, method: str = "gmpirt") -> float:
        """Estimated full-benchmark accuracy from answers on ``self.indices`` (same order)."""
        if method not in METHODS:
            raise EvomergeError(f"unknown estimator {method!r}; choose one of {', '.join(METHODS)}")
        return self.predict_all(subset_correct, methods=(method,))[method]

    def predict_all(self, subset_correct: np.ndarray, methods: Sequence[str] = METHODS) -> dict[str, float]:
        """All requested estimates at once (shares the ability fits)."""
        y = self._check_answers(subset_correct)
        return _predict(y, self.subset, self.a, self.b, self.endpoint_theta, self.theta_sd, self.lambda_sd,
                        self.anchor_weight_gpirt, self.anchor_weight_gmpirt, methods)

    def merged_ability(self, subset_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lambda over endpoints, merged theta) as mp-IRT infers them; useful for diagnostics."""
        y = self._check_answers(subset_correct).astype(np.float64)
        idx = self.subset.indices
        lam = _fit_lambda(y, self.a[idx], self.b[idx], self.endpoint_theta, self.lambda_sd)
        return lam, lam @ self.endpoint_theta

    def _check_answers(self, subset_correct: np.ndarray) -> np.ndarray:
        y = as_correctness(subset_correct, "subset answers").ravel()
        if y.shape[0] != len(self.subset.indices):
            raise EvomergeError(
                f"predict got {y.shape[0]} answers but the {self.benchmark or 'benchmark'} subset has "
                f"{len(self.subset.indices)} items (score the model on estimator.indices)")
        return y

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        return {
            "version": _FILE_VERSION,
            "benchmark": self.benchmark,
            "subset": self.subset.to_dict(),
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "endpoint_names": list(self.endpoint_names),
            "endpoint_theta": self.endpoint_theta.tolist(),
            "anchor_weight_gpirt": self.anchor_weight_gpirt,
            "anchor_weight_gmpirt": self.anchor_weight_gmpirt,
            "theta_sd": self.theta_sd,
            "lambda_sd": self.lambda_sd,
            "item_ids": self.item_ids,
            "cv_rmse": self.cv_rmse,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SubsetEstimator":
        try:
            if data.get("version") != _FILE_VERSION:
                raise EvomergeError(f"estimator file version {data.get('version')} is not {_FILE_VERSION}")
            a = np.asarray(data["a"], dtype=np.float64)
            dims = a.shape[1] if a.ndim == 2 else 1
            return cls(
                subset=Subset.from_dict(data["subset"]),
                a=a.reshape(-1, dims),
                b=np.asarray(data["b"], dtype=np.float64),
                endpoint_names=list(data["endpoint_names"]),
                endpoint_theta=np.asarray(data["endpoint_theta"], dtype=np.float64).reshape(-1, dims),
                anchor_weight_gpirt=float(data["anchor_weight_gpirt"]),
                anchor_weight_gmpirt=float(data["anchor_weight_gmpirt"]),
                theta_sd=float(data["theta_sd"]),
                lambda_sd=float(data["lambda_sd"]),
                benchmark=str(data.get("benchmark", "")),
                item_ids=data.get("item_ids"),
                cv_rmse=dict(data.get("cv_rmse", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EvomergeError(f"estimator file is missing or has a bad field: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write json (subset, item parameters, endpoint abilities, mix weights) for resuming."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SubsetEstimator":
        data = read_json(path, "estimator file")
        return cls.from_dict(data)


# ---------------------------------------------------------------------- core maths


def _fit_lambda(y, a_sub, b_sub, endpoint_theta, lambda_sd):
    """MAP lambda: logits = (a_S @ Theta_E.T) @ lambda - b_S, prior N(uniform mix, lambda_sd^2)."""
    k = endpoint_theta.shape[0]
    features = a_sub @ endpoint_theta.T
    return fit_logistic_weights(features, -b_sub, y, prior_mean=np.full(k, 1.0 / k), prior_sd=lambda_sd)


def _blend_with_observed(y, subset, a, b, theta):
    """p-IRT: observed answers where we have them, IRT probabilities for every other item."""
    p_all = item_probabilities(theta[None, :], a, b)[0]
    idx = subset.indices
    unseen = p_all.sum() - p_all[idx].sum()
    return float((y.sum() + unseen) / subset.n_total)


def _predict(y, subset, a, b, endpoint_theta, theta_sd, lambda_sd, w_gp, w_gmp, methods):
    y = np.asarray(y, dtype=np.float64)
    idx = subset.indices
    wanted = set(methods)
    out: dict[str, float] = {}
    anchor = float(np.dot(subset.weights, y))
    if "mean" in wanted:
        out["mean"] = float(y.mean())
    if "anchor" in wanted:
        out["anchor"] = anchor
    if wanted & {"pirt", "gpirt"}:
        theta = estimate_theta(y, a[idx], b[idx], theta_sd=theta_sd)
        pirt = _blend_with_observed(y, subset, a, b, theta)
        out["pirt"] = pirt
        out["gpirt"] = w_gp * anchor + (1.0 - w_gp) * pirt
    if wanted & {"mpirt", "gmpirt"}:
        if endpoint_theta.shape[0] == 0:
            raise EvomergeError("mp-IRT needs at least one endpoint model")
        lam = _fit_lambda(y, a[idx], b[idx], endpoint_theta, lambda_sd)
        mpirt = _blend_with_observed(y, subset, a, b, lam @ endpoint_theta)
        out["mpirt"] = mpirt
        out["gmpirt"] = w_gmp * anchor + (1.0 - w_gmp) * mpirt
    return {m: float(np.clip(out[m], 0.0, 1.0)) for m in methods}


def _anchor_weight(mse_irt: float | None, mse_anchor: float | None) -> float:
    """Inverse-variance mix: lean on the anchor estimate when the IRT one errs more."""
    if mse_irt is None or mse_anchor is None:
        return _FALLBACK_ANCHOR_WEIGHT
    total = mse_irt + mse_anchor
    if total <= 1e-12:
        return _FALLBACK_ANCHOR_WEIGHT
    return float(mse_irt / total)


def _extract_for(fit: IRTFit, y: np.ndarray, n_items: int, strategy: str, seed: int) -> Subset:
    return extract_subset(n_items, y.shape[1], strategy, seed, difficulty=fit.b,
                          item_embedding=np.hstack([fit.a, fit.b[:, None]]), correctness=y)


def _cross_validated_errors(y, n_items, strategy, endpoint_rows, dims, priors, lambda_sds, seed, full_fit, n_folds):
    """Squared errors of anchor / p-IRT / mp-IRT on held-out fit models.

    The whole pipeline is redone per fold -- IRT refit *and* subset re-extracted
    without the held-out models -- so the anchor estimate is not flattered by
    anchors chosen on the very models it is scored on. mp-IRT is scored for
    every candidate prior width in ``lambda_sds`` (keys ``("mpirt", sd)``).
    """
    n_models = y.shape[0]
    rng = np.random.default_rng(seed + 7919)
    folds = np.array_split(rng.permutation(n_models), min(n_folds, n_models))
    errors: dict = {"anchor": [], "pirt": [], **{("mpirt", sd): [] for sd in lambda_sds}}
    for held in folds:
        train = np.setdiff1d(np.arange(n_models), held)
        if len(train) == 0:
            continue
        fold_fit = fit_irt(y[train], dims, priors=priors, seed=seed, init=full_fit, max_sweeps=100, tol=1e-5)
        subset = _extract_for(fold_fit, y[train], n_items, strategy, seed)
        train_pos = {int(m): p for p, m in enumerate(train)}
        ends = [train_pos[e] for e in endpoint_rows if e in train_pos]
        ends_theta = fold_fit.theta[ends] if ends else np.zeros((0, dims))
        for h in held:
            ys = y[h, subset.indices]
            truth = float(y[h].mean())
            pred = _predict(ys, subset, fold_fit.a, fold_fit.b, ends_theta, priors.theta_sd, 1.0,
                            0.0, 0.0, ("anchor", "pirt"))
            for m in ("anchor", "pirt"):
                errors[m].append((pred[m] - truth) ** 2)
            for sd in lambda_sds if ends else ():
                pred = _predict(ys, subset, fold_fit.a, fold_fit.b, ends_theta, priors.theta_sd, sd,
                                0.0, 0.0, ("mpirt",))
                errors[("mpirt", sd)].append((pred["mpirt"] - truth) ** 2)
    return {m: (float(np.mean(v)) if v else None) for m, v in errors.items()}


def fit_subset_estimator(
    responses_matrix: Any,
    model_names: Sequence[str] | None,
    endpoint_names: Sequence[str],
    n_items: int,
    strategy: str = "anchor-irt",
    seed: int = 0,
    dims: int = 2,
    *,
    priors: IRTPriors = IRTPriors(),
    lambda_sd: float | Sequence[float] = LAMBDA_SD_GRID,
    n_folds: int = 5,
    benchmark: str = "",
    item_ids: Sequence[str] | None = None,
) -> SubsetEstimator:
    """Fit IRT on all given models, pick the subset, and calibrate the mix weights.

    ``responses_matrix``: models x items bools (or a ``ResponseMatrix``, whose
    names / ids are then used). ``endpoint_names``: the merge endpoints (base
    and experts) whose abilities span the merged abilities for mp-IRT; all
    other rows are extra models that only sharpen the item parameters.
    ``lambda_sd``: width of mp-IRT's prior on lambda (around the uniform mix);
    a sequence is a grid from which cross-validation picks the best.
    """
    if hasattr(responses_matrix, "correct"):
        model_names = model_names or responses_matrix.model_names
        item_ids = item_ids or responses_matrix.item_ids
        benchmark = benchmark or responses_matrix.benchmark
        responses_matrix = responses_matrix.correct
    y = as_correctness(responses_matrix, "response matrix")
    if y.ndim != 2 or y.shape[0] == 0:
        raise EvomergeError(f"need a models x items response matrix with at least one model, got {y.shape}")
    model_names = list(model_names) if model_names is not None else [f"model{i}" for i in range(y.shape[0])]
    if len(model_names) != y.shape[0]:
        raise EvomergeError(f"{len(model_names)} model names for a response matrix of {y.shape[0]} models")
    missing = [e for e in endpoint_names if e not in model_names]
    if missing or not endpoint_names:
        raise EvomergeError(f"endpoint models {missing or '(none given)'} have no responses; known: {model_names}")
    if strategy not in STRATEGIES:
        raise EvomergeError(f"unknown subset strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n_total = y.shape[1]
    check_subset_size(n_items, n_total)

    yf = y.astype(np.float64)
    fit: IRTFit = fit_irt(yf, dims, priors=priors, seed=seed)
    subset = _extract_for(fit, yf, n_items, strategy, seed)
    endpoint_rows = [model_names.index(e) for e in endpoint_names]
    grid = [float(lambda_sd)] if np.isscalar(lambda_sd) else [float(v) for v in lambda_sd]
    if not grid or min(grid) <= 0:
        raise EvomergeError(f"lambda_sd must be positive, got {lambda_sd}")
    if y.shape[0] >= 2:
        cv = _cross_validated_errors(yf, n_items, strategy, endpoint_rows, dims, priors, grid, seed, fit, n_folds)
    else:
        cv = {"anchor": None, "pirt": None}
    mp_scores = {sd: cv[("mpirt", sd)] for sd in grid if cv.get(("mpirt", sd)) is not None}
    chosen_sd = min(mp_scores, key=mp_scores.get) if mp_scores else (
        _DEFAULT_LAMBDA_SD if len(grid) > 1 else grid[0])
    mse = {"anchor": cv["anchor"], "pirt": cv["pirt"], "mpirt": mp_scores.get(chosen_sd)}
    return SubsetEstimator(
        subset=subset,
        a=fit.a,
        b=fit.b,
        endpoint_names=list(endpoint_names),
        endpoint_theta=fit.theta[endpoint_rows].copy(),
        anchor_weight_gpirt=_anchor_weight(mse["pirt"], mse["anchor"]),
        anchor_weight_gmpirt=_anchor_weight(mse["mpirt"], mse["anchor"]),
        theta_sd=priors.theta_sd,
        lambda_sd=chosen_sd,
        benchmark=benchmark,
        item_ids=list(item_ids) if item_ids is not None else None,
        cv_rmse={m: float(np.sqrt(v)) for m, v in mse.items() if v is not None},
    )
