"""Scoring within the memory left to it: a CUDA out-of-memory halves the batch, retries and is remembered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evomerge.benchmarks import load_benchmark, score_items
from evomerge.errors import EvomergeError


@pytest.fixture(scope="module")
def zoo_model(zoo_dir, zoo_answer_benches):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    benches = {t: load_benchmark(zoo_dir / rel) for t, rel in manifest["bench"].items()}
    benches["arith"] = load_benchmark(zoo_answer_benches["arith"])  # exact match
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    return model, AutoTokenizer.from_pretrained(zoo_dir / "base"), benches


def failing_above(model, rows: int) -> list:
    """Make `model` raise CUDA out-of-memory for batches of more than `rows` rows; returns the batch sizes seen."""
    seen, forward = [], model.forward

    def limited(*args, **kwargs):
        batch = kwargs["input_ids"].shape[0]
        seen.append(batch)
        if batch > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    model.forward = limited
    return seen


@pytest.mark.parametrize("task", ["arith", "lang"])  # exact match and multiple choice
def test_out_of_memory_halves_the_batch_and_remembers(zoo_model, task):
    model, tokenizer, benches = zoo_model
    bench = benches[task]
    expected = score_items(model, tokenizer, bench, indices=range(40), batch_size=32)
    seen = failing_above(model, 5 if task == "arith" else 11)
    try:
        assert np.array_equal(score_items(model, tokenizer, bench, indices=range(40), batch_size=32), expected)
        assert max(seen) > 11 and seen[-1] <= 11  # it failed, then shrank
        seen.clear()
        assert np.array_equal(score_items(model, tokenizer, bench, indices=range(40), batch_size=32), expected)
        assert max(seen) <= 11  # the size that fitted is remembered: no failure this time
    finally:
        del model.forward
        model.__dict__.pop("_evomerge_batch_limit", None)


def test_out_of_memory_at_one_item_is_a_clear_error(zoo_model):
    model, tokenizer, benches = zoo_model
    failing_above(model, 0)
    try:
        with pytest.raises(EvomergeError, match="out of GPU memory with a batch of one item"):
            score_items(model, tokenizer, benches["arith"], indices=range(4), batch_size=4)
    finally:
        del model.forward
        model.__dict__.pop("_evomerge_batch_limit", None)
