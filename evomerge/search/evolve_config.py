"""mergekit-evolve configs as evomerge search spaces: `evomerge search mergekit-evolve.yml` runs them.

mergekit-evolve (deprecated by its maintainers in 2026-06) reads a YAML with a ``genome``
(models, base_model, merge_method, layer_granularity, normalize, allow_negative_weights,
filters, smooth, tokenizer_source) and lm-eval ``tasks`` (name, weight, metric) with
``limit``, ``num_fewshot``, ``shuffle``, ``random_init``, ``apply_chat_template`` and
``fewshot_as_multiturn``. `to_search_space` maps it key by key onto a search-space mapping
(its lm-eval tasks become `lm_eval:` benchmarks, scored in memory and estimated from item
subsets); a key evomerge cannot honour is refused naming it and why, never silently
dropped. The table of every key is in docs/search.md ("Coming from mergekit-evolve").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.estimate.extract import DEFAULT_SUBSET_SIZE
from evomerge.merge.loading import open_model

GENOME_KEYS = ("models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth")
CONFIG_KEYS = ("genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
               "fewshot_as_multiturn")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")   # mergekit-evolve's METHOD_PARAM_MAPS
MODULE_FILTERS = {"self_attn", "mlp"}
NORMALIZED = ("ties", "dare_ties", "linear")   # mergekit-evolve's normalize when the genome does not say
MAX_FEVALS = 100  # mergekit-evolve's --max-fevals default: the trial budget


def is_mergekit_evolve(raw: Any) -> bool:
    """A mergekit-evolve config: a ``genome`` with ``models``, and ``tasks``."""
    return isinstance(raw, dict) and isinstance(raw.get("genome"), dict) and "tasks" in raw and "models" not in raw


def _model_path(reference: Any, where: str) -> str:
    """A model reference as mergekit writes it: a path, ``{model: path}``, or a LoRA adapter on a model
    (``model+adapter``, ``{model: path, lora: path}``), returned in the ``model+adapter`` notation."""
    lora = None
    if isinstance(reference, dict):
        lora = reference.get("lora")
        reference = reference.get("model", reference.get("path"))
        reference, lora = (value.get("path") if isinstance(value, dict) else value for value in (reference, lora))
    if not isinstance(reference, str) or not reference or (lora is not None and (not isinstance(lora, str) or not lora)):
        raise EvomergeError(f"{where}: a model must be a path, got {reference!r}")
    return f"{reference}+{lora}" if lora else reference


def _on_base(reference: str, base: str, where: str) -> str:
    """An expert's folder: the model's, or a LoRA adapter's when it is one on the base (evomerge merges
    adapters trained on the base as experts: docs/merge.md, "LoRA adapters as experts")."""
    if "+" not in reference:
        return reference
    model, adapter = reference.split("+", 1)
    if Path(model) != Path(base):
        raise EvomergeError(f"{where}: {reference} is a LoRA adapter on {model}; evomerge merges adapters trained "
                            f"on the base ({base}) only")
    return adapter


def to_search_space(raw: dict, name: str, source: str) -> dict:
    """The search-space mapping a mergekit-evolve config stands for (paths as given, resolved by the caller)."""
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise EvomergeError(f"{source}: unknown mergekit-evolve key {unknown[0]!r}; it has {', '.join(CONFIG_KEYS)}")
    genome = raw["genome"]
    unknown = sorted(set(genome) - set(GENOME_KEYS))
    if unknown:
        raise EvomergeError(f"{source}: unknown key genome.{unknown[0]}; mergekit-evolve's genome has "
                            f"{', '.join(GENOME_KEYS)}")
    method = genome.get("merge_method")
    if method not in METHODS:
        raise EvomergeError(f"{source}: genome.merge_method {method!r}: mergekit-evolve searches {', '.join(METHODS)}")
    if genome.get("smooth"):
        raise EvomergeError(f"{source}: genome.smooth is not supported: it interpolates each parameter across "
                            "layers, evomerge searches one value per layer group (layer_granularity)")
    if genome.get("tokenizer_source"):
        raise EvomergeError(f"{source}: genome.tokenizer_source is not supported: evomerge merges models that share "
                            "the base's tokenizer and vocabulary")
    if raw.get("random_init"):
        raise EvomergeError(f"{source}: random_init is not supported: evomerge first scores the uniform merges and "
                            "each model alone, then CMA-ES starts at the middle of every range; leave it out")
    models = [_model_path(m, f"{source}: genome.models[{i}]") for i, m in enumerate(genome.get("models") or [])]
    base = genome.get("base_model")
    base = _model_path(base, f"{source}: genome.base_model") if base is not None else None
    if method == "slerp":
        # mergekit-evolve interpolates, per layer group, the two models of highest weight (the first as
        # mergekit's slerp base); with two models that is t in [0, 1] from the first to the second
        if len(models) != 2:
            raise EvomergeError(f"{source}: genome.models: slerp is supported with exactly two models (evomerge "
                                f"interpolates from the first to the second), got {len(models)}; mergekit-evolve's "
                                "choice of two among more, per layer group, is not searched")
        if base is not None and base not in models:
            raise EvomergeError(f"{source}: genome.base_model: slerp merges the two models only; mergekit's slerp "
                                "refuses a third input (mergekit-evolve would add base_model as one); leave it out")
        base, models = models[0], models[1:]
    elif base is None:
        if method != "linear":
            raise EvomergeError(f"{source}: genome.base_model is required for {method} (as in mergekit-evolve)")
        base = models[0].split("+", 1)[0] if models else None   # linear: the base is no input, only the layout
    if not models:
        raise EvomergeError(f"{source}: genome.models names no model to merge")
    if "+" in base:
        raise EvomergeError(f"{source}: {'genome.base_model' if genome.get('base_model') else 'genome.models[0]'}: "
                            f"{base} is a base with a LoRA adapter merged in; write that merge to a folder and name it")
    models = [_on_base(m, base, f"{source}: genome.models") for m in models]
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        names = [f"{Path(m).name}-{i}" for i, m in enumerate(models)]

    merge: dict[str, Any] = {"method": method}
    granularity = genome.get("layer_granularity", 0) or 0
    if not isinstance(granularity, int) or granularity < 0:
        raise EvomergeError(f"{source}: genome.layer_granularity must be a whole number >= 0, got {granularity!r}")
    if granularity == 0:
        merge["granularity"] = "global"
    else:
        layers = open_model(base).num_layers
        if layers % granularity:
            raise EvomergeError(f"{source}: genome.layer_granularity {granularity} does not divide the "
                                f"{layers} layers of {base} (mergekit-evolve refuses it too)")
        merge.update(granularity="layer" if granularity == 1 else "layer_group", layer_groups=layers // granularity)
    filters = genome.get("filters") or []
    if filters:
        if set(filters) != MODULE_FILTERS:
            raise EvomergeError(f"{source}: genome.filters {filters} are not supported: evomerge splits a layer's "
                                "coefficients between attention and MLP only (filters: [self_attn, mlp])")
        merge["split_modules"] = True
    low = -1.0 if genome.get("allow_negative_weights") else 0.0
    params = {"t": [0.0, 1.0]} if method == "slerp" else {"weight": [low, 1.0]}
    if method in ("ties", "dare_ties"):
        params["density"] = [0.01, 1.0]  # mergekit-evolve clamps |density| to [0, 1]; 0 keeps nothing
    merge["params"] = params
    if method != "slerp":  # mergekit-evolve's default, not each method's own: dare_ties normalizes there too
        normalize = genome.get("normalize")
        merge["fixed"] = {"normalize": bool(normalize if normalize is not None else method in NORMALIZED)}

    if raw.get("shuffle") and raw.get("limit") is not None:
        raise EvomergeError(f"{source}: shuffle with limit is not supported: evomerge takes the first `limit` "
                            "documents, as lm-eval without shuffling; its item subsets are chosen by the estimator")
    common = {key: raw[key] for key in ("limit", "num_fewshot") if raw.get(key) is not None}
    common["apply_chat_template"] = bool(raw.get("apply_chat_template", True))   # mergekit-evolve's defaults
    common["fewshot_as_multiturn"] = bool(raw.get("fewshot_as_multiturn", True))
    benchmarks = []
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise EvomergeError(f"{source}: tasks must list at least one lm-eval task")
    for index, task in enumerate(tasks):
        task = {"name": task} if isinstance(task, str) else task
        if not isinstance(task, dict) or not isinstance(task.get("name"), str):
            raise EvomergeError(f"{source}: tasks[{index}] must be a task name or {{name, weight, metric}}")
        metric, _, selected = str(task.get("metric", "acc,none")).partition(",")
        entry = {"name": Path(task["name"]).stem, "lm_eval": task["name"], "weight": float(task.get("weight", 1.0)),
                 "metric": metric, **common}
        if selected and selected != "none":
            entry["filter"] = selected
        benchmarks.append(entry)
    space = {
        "name": name,
        "models": {"base": base, "experts": dict(zip(names, models))},
        "merge": merge,
        "benchmarks": benchmarks,
        "optimizer": {"name": "cmaes", "trials": MAX_FEVALS},
    }
    limit = raw.get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and 2 <= limit < DEFAULT_SUBSET_SIZE:
        space["estimator"] = {"subset_size": limit}   # every candidate on all `limit` documents, as mergekit-evolve
    return space
