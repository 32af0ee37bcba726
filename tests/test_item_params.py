"""Item parameters from a file: evomerge's layout, tinyBenchmarks' layout, matching by item id, bad files."""

import json
import pickle

import numpy as np
import pytest

from evomerge.benchmarks import Benchmark, Item
from evomerge.errors import EvomergeError
from evomerge.estimate import ItemParams, benchmark_key, subsets_from_item_params
from evomerge.estimate.irt import item_probabilities


def _params(n=50, dims=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dims)), rng.normal(size=n)


def test_json_and_npz_in_evomerge_layout_round_trip(tmp_path):
    a, b = _params()
    ids = [f"q{j}" for j in range(50)]
    written = ItemParams(a, b, ids, anchor_points=[3, 1, 7], anchor_weights=[0.5, 0.3, 0.2], anchor_weight=0.4,
                         source="test", models=12).save(tmp_path / "p.json")
    loaded = ItemParams.load(written)
    assert np.allclose(loaded.a, a) and np.allclose(loaded.b, b) and loaded.item_ids == ids
    assert loaded.anchor_weight == 0.4 and loaded.models == 12
    np.savez(tmp_path / "p.npz", A=a, B=b, item_ids=np.array(ids))
    from_npz = ItemParams.load(tmp_path / "p.npz")
    assert np.allclose(from_npz.a, a) and from_npz.item_ids == ids and from_npz.source == str(tmp_path / "p.npz")
    first = loaded.first_stage(3)
    assert first.indices.tolist() == [1, 3, 7] and first.weights.tolist() == pytest.approx([0.3, 0.5, 0.2])
    assert loaded.first_stage(4) is None  # a space asking for another subset size extracts its own


def test_tinybenchmarks_layout_sums_the_difficulty_over_dimensions(tmp_path):
    """tinyBenchmarks' item_curve: sigmoid(sum_d (A_d theta_d - B)), A (1, D, N), B (1, 1, N)."""
    rng = np.random.default_rng(1)
    dims, n = 3, 40
    A, B = rng.normal(size=(1, dims, n)), rng.normal(size=(1, 1, n))
    np.savez(tmp_path / "tiny.npz", A=A, B=B, seen_examples=np.array([2, 5]), examples_weights=np.array([0.6, 0.4]),
             optimal_lambda=np.array(0.7))
    params = ItemParams.load(tmp_path / "tiny.npz")
    theta = rng.normal(size=(1, dims))
    theirs = 1 / (1 + np.exp(-np.clip(A * theta.reshape(1, dims, 1) - B, -30, 30).sum(axis=1)))
    assert np.allclose(item_probabilities(theta, params.a, params.b), theirs, atol=1e-9)
    assert params.dims == 3 and params.anchor_points.tolist() == [2, 5] and params.anchor_weight == 0.7


def test_parameters_match_a_benchmark_by_item_id_or_by_position():
    a, b = _params(4)
    params = ItemParams(a, b, ["d", "c", "b", "a"])
    matched = params.for_items(["a", "b", "c", "d"], "toy")
    assert np.allclose(matched.a, a[::-1]) and np.allclose(matched.b, b[::-1])
    with pytest.raises(EvomergeError, match="no parameters for 1 items of benchmark 'toy'.*'e'"):
        params.for_items(["a", "b", "e"], "toy")
    by_position = ItemParams(a, b).for_items(["w", "x", "y", "z"], "toy")
    assert by_position.item_ids == ["w", "x", "y", "z"]
    with pytest.raises(EvomergeError, match="cover 4 items, benchmark 'toy' has 3"):
        ItemParams(a, b).for_items(["x", "y", "z"], "toy")


def test_bad_files_are_one_clear_error(tmp_path):
    with open(tmp_path / "tiny.pkl", "wb") as handle:
        pickle.dump({"A": [[1.0]], "B": [0.0]}, handle)
    with pytest.raises(EvomergeError, match="tiny.pkl must be .json or .npz"):
        ItemParams.load(tmp_path / "tiny.pkl")
    (tmp_path / "no.json").write_text(json.dumps({"a": [1]}))
    with pytest.raises(EvomergeError, match="no.json is no item-parameter file: it needs arrays A and B"):
        ItemParams.load(tmp_path / "no.json")
    (tmp_path / "shape.json").write_text(json.dumps({"A": [[1.0, 2.0]], "B": [0.0, 1.0]}))
    with pytest.raises(EvomergeError, match="shape.json: A must be items x dims"):
        ItemParams.load(tmp_path / "shape.json")
    (tmp_path / "nan.json").write_text('{"A": [[NaN]], "B": [0.0]}')
    with pytest.raises(EvomergeError, match="finite"):
        ItemParams.load(tmp_path / "nan.json")
    with pytest.raises(EvomergeError, match="cannot read item-parameter file"):
        ItemParams.load(tmp_path / "missing.json")


def test_subsets_come_from_the_parameters_alone():
    a, b = _params(200)
    stages = subsets_from_item_params(a, b, [10, 30], "anchor-irt", seed=0)
    assert [len(s.indices) for s in stages] == [10, 30] and set(stages[0].indices) <= set(stages[1].indices)
    with pytest.raises(EvomergeError, match="anchor-correctness"):
        subsets_from_item_params(a, b, 10, "anchor-correctness", 0)


def test_the_benchmark_key_follows_the_items_and_their_scoring():
    items = [Item("q1", "1+1=", "2"), Item("q2", "2+2=", "4")]
    key = benchmark_key(Benchmark("sums", items, kind="exact_match"))
    assert key == benchmark_key(Benchmark("renamed", list(items), source="elsewhere", kind="exact_match"))
    assert key != benchmark_key(Benchmark("sums", [items[0], Item("q2", "2+2=", "5")], kind="exact_match"))
    assert key != benchmark_key(Benchmark("sums", items, kind="generate"))
