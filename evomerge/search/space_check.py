"""The estimate-check on a search space's own merges (`evomerge estimate-check --space SPACE`).

The zoo check's merges are global task-arithmetic ones, a weight per expert in
[0, 1]; a search scores per-group genomes of its own method and bounds (weights
up to 1.5, DARE masks, a data-flow path), whose answers an estimator may predict
better or worse. Here the endpoints are the space's base and experts, loaded as
calibration loads them, and the extra and held-out merges are random genomes of
its genes, drawn as calibration draws its merges, scored on the space's benchmarks
(a benchmark's ``sample:`` is what is scored and what the error is against;
``tools/bench_calibration.py --sample N`` measures a sampled study against every
item, from a check of the whole benchmark).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from evomerge.estimate.check import HELDOUT_SEED_OFFSET, CheckModels
from evomerge.search.calibration import random_genome
from evomerge.search.candidates import make_builder
from evomerge.search.space import load_search_space


def space_models(space_path: str | Path, n_extra: int, n_heldout: int, seed: int,
                 device: str | None = None) -> CheckModels:
    """The check's models for one space: the endpoints calibration uses (base, experts, a data-flow
    search's finished runs), then ``n_extra`` and ``n_heldout`` random genomes (seeded apart, so more
    extra merges never change the held-out ones). ``device``: instead of the space's own."""
    space = load_search_space(space_path)
    if device is not None:
        space = dataclasses.replace(space, device=device)
    builder = make_builder(space)
    checkpoints = {"base": space.base, **{f"expert:{name}": path for name, path in space.experts.items()}}
    specs = [(name, "endpoint", {"checkpoint": str(path)}) for name, path in checkpoints.items()]
    in_memory = builder.extra_endpoints()
    specs += [(name, "endpoint", {"in_memory": name}) for name in in_memory]
    for role, count, offset in (("extra", n_extra, 0), ("heldout", n_heldout, HELDOUT_SEED_OFFSET)):
        rng = np.random.default_rng(seed + offset)
        specs += [(f"{role}{i:02d}", role, {"genome": random_genome(builder.genome, rng)}) for i in range(count)]

    def model_for(spec: dict):
        if "checkpoint" in spec:
            return builder.checkpoint_model(spec["checkpoint"])
        if "in_memory" in spec:
            return in_memory[spec["in_memory"]]
        return builder.candidate(spec["genome"]).model

    benches = {b.name: b.load() for b in space.benchmarks}
    return CheckModels(benches, specs, model_for, builder.tokenizer, {"space": str(space_path)})
