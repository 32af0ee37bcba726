"""mergekit-evolve configs read as evomerge search spaces, key by key; what cannot be honoured is refused."""

from __future__ import annotations

import pytest

from evomerge.errors import EvomergeError
from evomerge.search.evolve_config import is_mergekit_evolve, to_search_space

CONFIG = {
    "genome": {"models": ["zoo/experts/arith", {"model": "zoo/experts/lang"}], "base_model": "zoo/base",
               "merge_method": "ties", "layer_granularity": 0, "normalize": False,
               "allow_negative_weights": True, "filters": ["self_attn", "mlp"]},
    "tasks": ["arith_task", {"name": "tasks/lang.yaml", "weight": 2.0, "metric": "exact_match,strict-match"}],
    "limit": 100, "num_fewshot": 3, "apply_chat_template": False,
}


def test_every_key_maps_onto_the_space():
    assert is_mergekit_evolve(CONFIG) and not is_mergekit_evolve({"models": {}, "merge": {}})
    space = to_search_space(CONFIG, "evolve", "evolve.yml")
    assert space["models"] == {"base": "zoo/base", "experts": {"arith": "zoo/experts/arith", "lang": "zoo/experts/lang"}}
    assert space["merge"] == {"method": "ties", "granularity": "global", "split_modules": True,
                              "params": {"weight": [-1.0, 1.0], "density": [0.01, 1.0]}, "fixed": {"normalize": False}}
    first, second = space["benchmarks"]
    assert first == {"name": "arith_task", "lm_eval": "arith_task", "weight": 1.0, "metric": "acc", "limit": 100,
                     "num_fewshot": 3, "apply_chat_template": False, "fewshot_as_multiturn": True}
    assert second["name"] == "lang" and second["weight"] == 2.0
    assert second["metric"] == "exact_match" and second["filter"] == "strict-match"
    assert space["optimizer"] == {"name": "cmaes", "trials": 100}  # mergekit-evolve's --max-fevals default
    assert "estimator" not in space  # limit 100: the estimator's own subsets


def test_a_small_limit_scores_every_document():
    """mergekit-evolve scores each candidate on all `limit` documents; below the default subset, so does evomerge."""
    assert to_search_space({**CONFIG, "limit": 12}, "evolve", "evolve.yml")["estimator"] == {"subset_size": 12}


def test_slerp_interpolates_the_two_models():
    genome = {"models": ["zoo/experts/arith", "zoo/experts/lang"], "merge_method": "slerp"}
    space = to_search_space({"genome": genome, "tasks": ["t"]}, "evolve", "evolve.yml")
    assert space["models"] == {"base": "zoo/experts/arith", "experts": {"lang": "zoo/experts/lang"}}
    assert space["merge"]["params"] == {"t": [0.0, 1.0]}
    inside = {**genome, "base_model": "zoo/experts/lang"}  # one of the two: no third input
    assert to_search_space({"genome": inside, "tasks": ["t"]}, "e", "e.yml")["models"] == space["models"]


@pytest.mark.parametrize("change, message", [
    ({"smooth": True}, "genome.smooth is not supported"),
    ({"filters": ["q_proj"]}, r"genome.filters \['q_proj'\] are not supported"),
    ({"tokenizer_source": "union"}, "genome.tokenizer_source is not supported"),
    ({"merge_method": "della"}, "mergekit-evolve searches linear"),
    ({"base_model": None}, "genome.base_model is required for ties"),
    ({"frobnicate": 1}, "unknown key genome.frobnicate"),
    ({"merge_method": "slerp", "base_model": "zoo/base"}, r"genome.base_model: slerp merges the two models only"),
    ({"merge_method": "slerp", "base_model": None, "models": ["a", "b", "c"]},
     "slerp is supported with exactly two models"),
])
def test_what_cannot_be_honoured_is_refused_by_name(change, message):
    config = {**CONFIG, "genome": {**CONFIG["genome"], **change}}
    with pytest.raises(EvomergeError, match=message):
        to_search_space(config, "evolve", "evolve.yml")


def test_shuffled_limits_are_refused():
    with pytest.raises(EvomergeError, match="shuffle with limit is not supported"):
        to_search_space({**CONFIG, "shuffle": True}, "evolve", "evolve.yml")


def test_random_init_is_refused():
    with pytest.raises(EvomergeError, match="random_init is not supported"):
        to_search_space({**CONFIG, "random_init": True}, "evolve", "evolve.yml")
