"""Reduced-subset accuracy estimation: responses matrix, IRT, subset extraction, estimators.

The search calls, per benchmark::

    est = fit_subset_estimator(responses, model_names, endpoint_names, n_items=50,
                               strategy="anchor-irt", seed=0, dims=2)
    est.save(run_dir / "estimators" / f"{bench}.json")        # SubsetEstimator.load on resume
    acc = est.predict(score_items(model, tok, bench, indices=est.indices), method="gmpirt")
"""

from evomerge.estimate.estimators import (DEFAULT_METHOD, METHODS, SubsetEstimator, fit_abilities, fit_subset_estimator,
                                         subsets_from_item_params, subsets_from_responses)
from evomerge.estimate.extract import STRATEGIES, Subset, extract_subset, sample_items
from evomerge.estimate.irt import IRTFit, IRTPriors, estimate_theta, fit_irt
from evomerge.estimate.item_params import ItemParams, benchmark_key
from evomerge.estimate.responses import ResponseMatrix, collect_responses, responses_path, score_model

__all__ = [
    "DEFAULT_METHOD", "METHODS", "STRATEGIES", "IRTFit", "IRTPriors", "ItemParams", "ResponseMatrix", "Subset", "SubsetEstimator",
    "benchmark_key", "collect_responses", "estimate_theta", "extract_subset", "fit_irt", "fit_subset_estimator",
    "fit_abilities", "responses_path", "sample_items", "score_model", "subsets_from_item_params",
    "subsets_from_responses",
]
