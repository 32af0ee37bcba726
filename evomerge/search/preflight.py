"""Checks of a search's inputs that need no weights, run before any model is loaded or scored.

The space file itself is checked when parsed (`space.py`). What needs the
inputs is checked here, from the model headers (config and safetensors
index), the tokenizer and the benchmark items: a mistake then fails in
seconds, naming the key or file at fault, instead of after a calibration
that takes hours on real models.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from evomerge.console import warn
from evomerge.errors import EvomergeError
from evomerge.estimate.extract import stage_sizes
from evomerge.merge import get_method
from evomerge.merge.adapters import open_experts
from evomerge.merge.loading import open_model
from evomerge.search.space import SearchSpace


def check_inputs(space: SearchSpace) -> dict:
    """Check the models' headers, the tokenizer and the benchmarks; returns the loaded benchmarks by name."""
    if space.merge is not None:
        _check_models(space)
    if needs_data(space):
        check_data_sources(space, f"merge method {' / '.join(repr(m) for m in space.merge.methods)}")
    tokenizer = _load_tokenizer(space.base)
    for path in space.extra_models:
        if not (Path(path) / "config.json").is_file():
            raise EvomergeError(f"estimator.extra_models: {path} is not a model folder (no config.json)")
    key, asked = ("evaluation.stages", space.stages) if space.evaluation else ("estimator.subset_size", space.subset_size)
    benchmarks = {}
    for spec in space.benchmarks:
        bench = spec.load(tokenizer=tokenizer)
        try:
            stage_sizes(space.stages, len(bench.items), key)  # the estimator's own rule, at calibration
        except EvomergeError as error:
            raise EvomergeError(f"{key} {asked} does not fit benchmark {spec.name!r} "
                                f"({len(bench.items)} items in {bench.source}): {error}") from None
        benchmarks[spec.name] = bench
    return benchmarks


def _check_models(space: SearchSpace) -> None:
    """Base and experts (full fine-tunes or LoRA adapters on the base) can be merged tensor by tensor; the
    granularity fits the layers."""
    base = open_model(space.base)
    open_experts(base, space.expert_paths)
    merge = space.merge
    if merge.granularity == "layer_group" and merge.layer_groups > base.num_layers:
        warn(f"merge.layer_groups {merge.layer_groups} is more than the {base.num_layers} layers of "
             f"{space.base}: searching {base.num_layers} groups of one layer")


def _load_tokenizer(base: str):
    try:
        return AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError, TypeError) as error:
        raise EvomergeError(f"base model {base} has no usable tokenizer ({error}); benchmarks need one") from None


def needs_data(space: SearchSpace) -> list[str]:
    """The data statistics the space's merge method reads (empty: a black-box method)."""
    if space.merge is None:
        return []
    return list(dict.fromkeys(kind for m in space.merge.methods for kind in get_method(m).statistics))


def check_data_sources(space: SearchSpace, what: str) -> None:
    """``what`` (a method's statistics, coefficient learning) needs unlabelled prompts: refuse a space without."""
    if not any(b.data is not None for b in space.benchmarks):
        raise EvomergeError(
            f"{space.name}: {what} reads unlabelled prompts: give a benchmark a `data:` source (a file of "
            "prompts, or {split: NAME} of its data; `data: self` uses its scored items' prompts, the "
            "transductive setting)")
