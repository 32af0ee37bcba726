"""Subset extraction: determinism, storage round trip, weights, and bad sizes."""

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.estimate.extract import STRATEGIES, Subset, extract_stages, extract_subset, kmeans


def _inputs(n_items=300, n_models=6, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(n_items)
    a = np.abs(rng.standard_normal((n_items, 2)))
    correct = rng.random((n_models, n_items)) < 1 / (1 + np.exp(b))
    return dict(difficulty=b, item_embedding=np.hstack([a, b[:, None]]), correctness=correct)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extraction_is_deterministic_and_valid(strategy):
    inputs = _inputs()
    first = extract_subset(25, 300, strategy, seed=3, **inputs)
    again = extract_subset(25, 300, strategy, seed=3, **inputs)
    other = extract_subset(25, 300, strategy, seed=4, **inputs)
    assert np.array_equal(first.indices, again.indices)
    assert np.allclose(first.weights, again.weights)
    assert not np.array_equal(first.indices, other.indices)
    assert len(first.indices) == 25 == len(np.unique(first.indices))
    assert np.all(np.diff(first.indices) > 0)
    assert first.weights.sum() == pytest.approx(1.0)
    assert first.indices.min() >= 0 and first.indices.max() < 300


def test_stratified_covers_the_difficulty_range():
    inputs = _inputs()
    subset = extract_subset(10, 300, "stratified", seed=0, **inputs)
    ranks = np.argsort(np.argsort(inputs["difficulty"]))[subset.indices]
    assert sorted(ranks // 30) == list(range(10))


def test_subset_round_trips_through_json(tmp_path):
    subset = extract_subset(20, 300, "anchor-irt", seed=1, **_inputs())
    path = tmp_path / "run" / "subset.json"
    subset.save(path)
    loaded = Subset.load(path)
    assert np.array_equal(loaded.indices, subset.indices)
    assert np.allclose(loaded.weights, subset.weights)
    assert (loaded.strategy, loaded.seed, loaded.n_total) == ("anchor-irt", 1, 300)


def test_kmeans_uses_every_cluster_even_with_duplicate_points():
    points = np.repeat(np.eye(3), 20, axis=0)  # only three distinct points
    labels = kmeans(points, 7, seed=0)
    assert set(labels.tolist()) == set(range(7))


def test_bad_sizes_and_inputs_raise():
    inputs = _inputs()
    with pytest.raises(EvomergeError, match="only 300 items"):
        extract_subset(301, 300, "random", **inputs)
    with pytest.raises(EvomergeError):
        extract_subset(0, 300, "random")
    with pytest.raises(EvomergeError, match="unknown subset strategy"):
        extract_subset(5, 300, "clever")
    with pytest.raises(EvomergeError):
        extract_subset(5, 300, "anchor-irt")
    with pytest.raises(EvomergeError):
        Subset.from_dict({"indices": [1, 1], "weights": [0.5, 0.5], "strategy": "random", "seed": 0, "n_total": 5})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stages_are_nested_and_the_first_is_the_plain_subset(strategy):
    inputs = _inputs()
    stages = extract_stages([10, 40, 120, "all"], 300, strategy, seed=2, **inputs)
    assert [len(s.indices) for s in stages] == [10, 40, 120, 300]
    assert np.array_equal(stages[0].indices, extract_subset(10, 300, strategy, seed=2, **inputs).indices)
    for small, large in zip(stages, stages[1:]):
        assert set(small.indices) <= set(large.indices)
    for stage in stages:
        assert stage.weights.sum() == pytest.approx(1.0) and np.all(np.diff(stage.indices) > 0)
    assert np.allclose(stages[-1].weights, 1 / 300)
    again = extract_stages([10, 40, 120, "all"], 300, strategy, seed=2, **inputs)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(stages, again))


def test_bad_stages_raise():
    with pytest.raises(EvomergeError, match="grow"):
        extract_stages([20, 10], 300, "random")
    with pytest.raises(EvomergeError, match="only 300 items"):
        extract_stages([20, 400], 300, "random")
    with pytest.raises(EvomergeError, match="last only"):
        extract_stages(["all", 10], 300, "random")
