"""The margin estimator (issue 26): margins scored, stored, fitted, used by racing, and a fallback without them."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.benchmarks.kinds import Scored
from evomerge.estimate import ResponseMatrix, fit_subset_estimator
from evomerge.estimate.estimators import SubsetEstimator
from evomerge.estimate.margins import fit_margin_model
from evomerge.search import racing
from evomerge.search.racing import StagedScorer

N_ITEMS = 300


def _world(seed=0, n_merges=12, n_items=N_ITEMS):
    """Endpoint margins, and merges whose margins are random lines through them plus noise."""
    rng = np.random.default_rng(seed)
    endpoints = rng.normal(0.5, 2.0, (4, n_items))
    merges = []
    for _ in range(n_merges):
        weights = rng.dirichlet(np.ones(4)) * rng.uniform(0.8, 1.2)
        merges.append(rng.normal(-0.2, 0.1) + weights @ endpoints + rng.normal(0, 0.8, n_items))
    margins = np.vstack([endpoints, merges])
    names = ["base", "e1", "e2", "e3"] + [f"m{i}" for i in range(n_merges)]
    return ResponseMatrix(margins > 0, names, [str(i) for i in range(n_items)], "t", margins=margins)


def test_multiple_choice_margins_are_positive_exactly_where_the_answer_is_right(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.benchmarks import load_benchmark, score_records

    bench = load_benchmark(zoo_dir / "bench" / "arith.jsonl")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(zoo_dir / "base"), AutoTokenizer.from_pretrained(zoo_dir / "base")
    scored = score_records(model, tokenizer, bench, indices=range(20), records=True)
    assert scored.margins.shape == (20,) and ((scored.margins > 0) == scored.correct).all()
    for margin, record in zip(scored.margins, scored.records):
        loglik = np.array(record["loglik"])
        assert margin == pytest.approx(loglik[record["target"]] - np.delete(loglik, record["target"]).max(), abs=1e-3)


def test_exact_match_margins_are_positive_exactly_where_the_answer_is_right(zoo_dir, zoo_answer_benches):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.benchmarks import load_benchmark, score_records

    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    right = 0
    for task, bench in (("arith", load_benchmark(zoo_dir / "bench" / "lang_arith.jsonl")),
                        ("lang", load_benchmark(zoo_answer_benches["lang"]))):
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / "experts" / task)
        scored = score_records(model, tokenizer, bench, indices=range(60), records=False)
        assert bench.kind == "exact_match" and ((scored.margins > 0) == scored.correct).all()
        right += int(scored.correct.sum())
    assert right > 0


def test_responses_keep_margins_through_answers_subsets_and_bytes():
    matrix = ResponseMatrix.empty([str(i) for i in range(5)], "t")
    matrix = matrix.with_answers("a", [1, 3], [True, False], [0.5, -1.0])
    matrix = matrix.with_answers("b", [0, 1, 2, 3, 4], [True] * 5)   # a kind without margins
    back = ResponseMatrix.from_bytes(matrix.to_bytes(), "test")
    assert np.isnan(back.margin_row("a")[[0, 2, 4]]).all() and back.margin_row("a")[[1, 3]].tolist() == [0.5, -1.0]
    assert np.isnan(back.margin_row("b")).all()
    assert back.subset(["a"]).margin_row("a")[1] == 0.5
    again = back.with_answers("a", [0], [True], [2.0])
    assert again.margin_row("a")[[0, 1, 3]].tolist() == [2.0, 0.5, -1.0]
    assert ResponseMatrix.from_bytes(ResponseMatrix.empty(["0"], "t").with_answers("c", [0], [True]).to_bytes(),
                                     "test").margins is None


def test_margins_predict_a_merge_better_than_its_right_and_wrong_answers():
    matrix = _world()
    fit_names = matrix.model_names[:8]
    estimator = fit_subset_estimator(matrix.subset(fit_names), None, fit_names[:4], 30, "anchor-irt", seed=0)
    assert estimator.margin_model is not None
    errors = {"margin": [], "gmpirt": []}
    for name in matrix.model_names[8:]:
        indices = estimator.indices
        found = estimator.predict_all(matrix.row(name)[indices], ("margin", "gmpirt"),
                                      subset_margins=matrix.margin_row(name)[indices])
        for method in errors:
            errors[method].append(abs(found[method] - matrix.row(name).mean()))
    assert np.mean(errors["margin"]) < 0.025 and np.mean(errors["margin"]) < 0.6 * np.mean(errors["gmpirt"])


def test_without_margins_the_margin_method_is_gmpirt_and_survives_a_file(tmp_path):
    matrix = _world()
    fit_names = matrix.model_names[:8]
    estimator = fit_subset_estimator(matrix.subset(fit_names), None, fit_names[:4], 30, "anchor-irt", seed=0)
    row, indices = matrix.row("m9"), estimator.indices
    plain = estimator.estimate(row[indices], "gmpirt")
    assert estimator.estimate(row[indices], "margin").value == plain.value          # no margins handed over
    with_nan = matrix.margin_row("m9")[indices].copy()
    with_nan[0] = np.nan
    assert estimator.predict(row[indices], "margin", subset_margins=with_nan) == plain.value
    margins = matrix.margin_row("m9")[indices]
    loaded = SubsetEstimator.load(estimator.save(tmp_path / "e.json"))
    assert loaded.predict(row[indices], "margin", subset_margins=margins) == pytest.approx(
        estimator.predict(row[indices], "margin", subset_margins=margins), abs=1e-6)
    # its interval is gmp-IRT's width around its own value
    found = estimator.estimate(row[indices], "margin", subset_margins=margins)
    assert found.margin == plain.margin and found.low <= found.value <= found.high


def test_no_margin_model_without_calibration_merges_or_endpoint_margins():
    matrix = _world()
    endpoints_only = fit_subset_estimator(matrix.subset(matrix.model_names[:4]), None, matrix.model_names[:4], 30,
                                          "anchor-irt", seed=0)
    assert endpoints_only.margin_model is None
    margins = matrix.margins.copy()
    margins[0, 5] = np.nan                                  # an endpoint without a margin on one item
    assert fit_margin_model(margins[:4], margins[4:8], [np.arange(30)]) is None
    assert fit_margin_model(matrix.margins[:4], matrix.margins[4:8], [np.arange(30)]) is not None


def test_racing_hands_the_trial_margins_to_the_estimator(monkeypatch):
    matrix = _world()
    fit_names = matrix.model_names[:8]
    estimator = fit_subset_estimator(matrix.subset(fit_names), None, fit_names[:4], 30, "anchor-irt", seed=0)
    truth, margins = matrix.row("m10"), matrix.margin_row("m10")
    monkeypatch.setattr(racing, "score_records", lambda model, tokenizer, bench, indices, batch_size, records:
                        Scored(truth[indices], margins=margins[indices]))
    scorer = StagedScorer({"t": "t"}, {"t": estimator}, method="margin", weights=[1.0], per_task=False)
    values, attrs = scorer.score(None, None)
    indices = estimator.indices
    want = estimator.predict(truth[indices], "margin", subset_margins=margins[indices])
    assert values == [pytest.approx(want)] and want != estimator.predict(truth[indices], "gmpirt")


def test_the_item_bank_keeps_the_items_not_a_study_s_endpoint_margins(zoo_dir, tmp_path):
    from evomerge.benchmarks import load_benchmark
    from evomerge.search.item_bank import ItemBank

    bench = load_benchmark(zoo_dir / "bench" / "arith.jsonl")
    matrix = _world(n_items=len(bench.items))
    estimator = fit_subset_estimator(matrix.subset(matrix.model_names[:8]), None, matrix.model_names[:4], 30,
                                     "anchor-irt", seed=0)
    assert estimator.margin_model is not None
    bank = ItemBank(tmp_path / "bank")
    bank.store("arith", bench, estimator, "anchor-irt", "study", 8)
    entry = bank.load("arith", bench, estimator.a.shape[1])
    assert entry.estimator.margin_model is None and np.allclose(entry.estimator.b, estimator.b)


def test_a_space_without_an_estimator_method_reads_margins(zoo_dir, tmp_path):
    import yaml

    from evomerge.search.space import load_search_space
    from small_space import small_space

    path = small_space(zoo_dir, tmp_path / "space.yaml")
    raw = yaml.safe_load(path.read_text())
    del raw["estimator"]["method"]
    path.write_text(yaml.safe_dump(raw))
    assert load_search_space(path).estimator == "margin"
