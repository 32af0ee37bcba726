"""Export a Recipe as a mergekit 0.1.5 YAML config that reproduces the same merge.

Per-layer overrides become one `slices` entry per layer (layer_range [i, i+1]).
Per-module overrides become mergekit's conditional parameters: a list of
`{filter, value}` entries, first substring match wins, so the filters are
emitted in the same precedence as `recipe.module_type_of` (norm before
self_attn before mlp, then a catch-all). Embeddings, the final norm and lm_head
are planned by mergekit with the first / last slice's parameters, so those
slices also carry exact-name filters for them, placed first.

Every parameter is written fully resolved (method defaults included), so the
YAML does not depend on mergekit's defaults staying the same. Methods without
a base input (linear, karcher, the SLERPs of the experts' own weights) get no
`base_model` and no base source; a method's `mergekit=False` parameters shape
the config instead of being written (`MergeMethod.uses_base`). `dtype` and
`out_dtype` are the merge dtype: mergekit then computes in it and writes it,
as the core does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.adapters import mergekit_note, mergekit_reference
from evomerge.merge.loading import open_model
from evomerge.merge.recipe import Recipe, layer_of, module_type_of

# Filters in the order evomerge classifies layer tensors (see module_type_of).
_LAYER_FILTERS = (("norm", "norm"), ("attention", "self_attn"), ("mlp", "mlp"))
_LLAMA_NON_LAYER = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _non_layer_tensors(base_path) -> tuple[list[str], list[str]]:
    """Names of tensors outside the layer stack, split into (before layers, after layers)."""
    names: list[str]
    try:
        names = [n for n in open_model(base_path).shapes if layer_of(n) is None]
    except Exception:  # base not readable here: fall back to the Llama layout
        names = list(_LLAMA_NON_LAYER)
    pre = sorted(n for n in names if "embed" in n)
    post = sorted(n for n in names if "embed" not in n)
    return pre, post


def _setting(entries: list[tuple[Optional[str], object]]):
    """A scalar when every entry agrees, else a mergekit conditional list."""
    values = [v for _, v in entries]
    if all(v == values[0] and type(v) is type(values[0]) for v in values):
        return values[0]
    result = []
    for filt, value in entries:
        entry = {"filter": filt, "value": value} if filt is not None else {"value": value}
        result.append(entry)
    return result


def recipe_to_mergekit_yaml(
    recipe: Recipe,
    base_path,
    expert_paths,
    num_layers: int,
    dtype: str = "float32",
) -> str:
    """mergekit-yaml config text for `recipe` merging `expert_paths` onto `base_path`."""
    note = mergekit_note(expert_paths)
    expert_paths = [mergekit_reference(p, base_path) for p in expert_paths]  # a LoRA adapter: BASE+ADAPTER
    base = str(base_path)
    num_experts = len(expert_paths)
    recipe.validate(num_experts)
    spec = recipe.spec
    if spec.mergekit_name is None:
        raise EvomergeError(f"mergekit has no equivalent of the {spec.name!r} merge (it needs data statistics)")
    pre, post = _non_layer_tensors(base_path)
    uses_base = spec.uses_base(recipe.resolved_params(None, None, num_experts))
    exported = [p.name for p in spec.params if p.mergekit]

    def positions(layer: int):
        """(filter, layer, module_type) in first-match order for one slice."""
        items = []
        if layer == 0:
            items += [(name, None, module_type_of(name)) for name in pre]
        if layer == num_layers - 1:
            items += [(name, None, module_type_of(name)) for name in post]
        items += [(filt, layer, module) for module, filt in _LAYER_FILTERS]
        items.append((None, layer, None))
        return items

    slices = []
    for layer in range(num_layers):
        resolved = [(filt, recipe.resolved_params(lay, mod, num_experts)) for filt, lay, mod in positions(layer)]
        sources = []
        for e, path in enumerate(expert_paths):
            params = {
                name: _setting([(filt, r[name][e]) for filt, r in resolved])
                for name in exported
                if name in spec.per_expert
            }
            source = {"model": path, "layer_range": [layer, layer + 1]}
            if params:
                source["parameters"] = params
            sources.append(source)
        if uses_base:
            sources.append({"model": base, "layer_range": [layer, layer + 1]})
        shared = {
            name: _setting([(filt, r[name]) for filt, r in resolved])
            for name in exported
            if name not in spec.per_expert
        }
        out_slice = {"sources": sources}
        if shared:
            out_slice["parameters"] = shared
        slices.append(out_slice)

    config = {"merge_method": spec.mergekit_name}
    if uses_base:
        config["base_model"] = base
    config["dtype"] = dtype
    config["out_dtype"] = dtype  # a few kernels (arcee_fusion, ramplus_tl) return float32; the core writes `dtype`
    config["slices"] = slices
    return note + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def write_mergekit_yaml(path, recipe: Recipe, base_path, expert_paths, num_layers: int, dtype: str = "float32"):
    Path(path).write_text(recipe_to_mergekit_yaml(recipe, base_path, expert_paths, num_layers, dtype))
