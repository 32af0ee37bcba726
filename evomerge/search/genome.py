"""The genome: named bounded floats that an optimizer proposes, and how they become a merge Recipe.

Granularity decides how many groups of tensors get their own coefficients:
`global` (one group), `layer_group` (contiguous blocks of layers) or `layer`.
Tensors outside the decoder layers (embeddings, final norm, lm_head) form the
`rest` group. With `split_modules`, attention and MLP inside a layer group get
separate coefficients (layer norms follow the attention values).
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.merge import Override, Recipe
from evomerge.search.space import SearchSpace, per_expert_params


@dataclass(frozen=True)
class TensorGroup:
    """A set of tensors sharing coefficients: layers=None means the non-layer tensors."""

    name: str
    layers: tuple[int, ...] | None
    modules: tuple[str, ...] | None


def tensor_groups(space: SearchSpace, num_layers: int) -> list[TensorGroup]:
    """The groups in the order their overrides are applied (the `rest` group is the recipe's default)."""
    if space.granularity == "global":
        return [TensorGroup("all", None, None)]
    if space.granularity == "layer":
        blocks = [(i,) for i in range(num_layers)]
    else:
        count = min(space.layer_groups, num_layers)
        blocks = [
            tuple(range(num_layers * g // count, num_layers * (g + 1) // count)) for g in range(count)
        ]
    groups = [TensorGroup("rest", None, None)]
    for index, layers in enumerate(blocks):
        prefix = f"L{layers[0]}" if space.granularity == "layer" else f"G{index}"
        if space.split_modules:
            groups.append(TensorGroup(f"{prefix}_attention", layers, ("attention", "norm")))
            groups.append(TensorGroup(f"{prefix}_mlp", layers, ("mlp",)))
        else:
            groups.append(TensorGroup(prefix, layers, None))
    return groups


def genome_space(space: SearchSpace, num_layers: int) -> dict[str, tuple[float, float]]:
    """Every searched value with its bounds, e.g. `weight.arith.G0_mlp: (0.0, 1.2)`."""
    genome = {}
    per_expert = per_expert_params(space.method)
    for group in tensor_groups(space, num_layers):
        for param, bounds in space.ranges.items():
            if param in per_expert:
                for expert in space.expert_names:
                    genome[f"{param}.{expert}.{group.name}"] = bounds
            else:
                genome[f"{param}.{group.name}"] = bounds
    return genome


def _group_params(space: SearchSpace, genome: dict[str, float], group: TensorGroup) -> dict:
    params, per_expert = {}, per_expert_params(space.method)
    for param in space.ranges:
        if param in per_expert:
            params[param] = [float(genome[f"{param}.{e}.{group.name}"]) for e in space.expert_names]
        else:
            params[param] = float(genome[f"{param}.{group.name}"])
    return params


def genome_to_recipe(space: SearchSpace, genome: dict[str, float], num_layers: int) -> Recipe:
    """Turn an optimizer's proposal into the merge recipe it stands for."""
    groups = tensor_groups(space, num_layers)
    default = {**space.fixed, **_group_params(space, genome, groups[0])}
    overrides = [
        Override(
            layers=list(group.layers),
            modules=list(group.modules) if group.modules else None,
            params=_group_params(space, genome, group),
        )
        for group in groups[1:]
    ]
    # Grid parameters (TIES / breadcrumbs density, gamma) snap to the grid their threshold
    # tables are exact on; the trial records the snapped recipe, so exports say what was merged.
    return Recipe(method=space.method, params=default, overrides=overrides).snapped()


def uniform_genome(space: SearchSpace, num_layers: int, values: dict[str, float]) -> dict[str, float]:
    """A genome with one value per parameter everywhere (clipped to its bounds): a uniform merge."""
    genome = {}
    for name, (low, high) in genome_space(space, num_layers).items():
        param = name.split(".", 1)[0]
        value = values.get(param, (low + high) / 2)
        genome[name] = min(max(float(value), low), high)
    return genome


def _within(value: float, bounds: tuple[float, float]) -> bool:
    low, high = bounds
    return low - 1e-9 <= value <= high + 1e-9


def _matches(value, target) -> bool:
    """A fixed value (scalar or per-expert list) agrees with a target (per-expert entries None = any)."""
    if isinstance(target, list):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(target)
        return len(values) == len(target) and all(t is None or float(v) == t for v, t in zip(values, target))
    return not isinstance(value, (list, tuple)) and float(value) == target


def endpoint_genome(space: SearchSpace, num_layers: int, expert: str | None) -> dict[str, float] | None:
    """A genome whose merge is exactly one endpoint: ``expert`` alone, or the base (``None``).

    Task-arithmetic methods (TIES, DARE, ...): weight 1 for the expert and 0 for the
    others with the expert's density 1 (nothing dropped; a sign election among one
    expert keeps everything), or all weights 0 for the base. Linear: one-hot weights
    (no base). SLERP: t = 0 is the base, t = 1 the expert. Returns None where the space
    cannot express the point: a bound excludes the value (density capped below 1), a
    fixed parameter contradicts it (lambda 0.8), or the method has no such point.
    """
    from evomerge.merge import get_method

    names = space.expert_names
    targets = get_method(space.method).endpoint(None if expert is None else names.index(expert), len(names))
    if targets is None:
        return None  # e.g. linear cannot give the base back; model_stock has no coefficients
    if any(param in space.fixed and not _matches(space.fixed[param], target) for param, target in targets.items()):
        return None
    genome = uniform_genome(space, num_layers, {})
    for name in genome:
        param, *rest = name.split(".")
        target = targets.get(param)
        if isinstance(target, list):
            target = target[names.index(rest[0])]
        if target is None:
            if param == "density" and _within(1.0, space.ranges[param]):
                genome[name] = 1.0  # keep everything where the value does not matter
            continue
        if not _within(target, space.ranges[param]):
            return None
        genome[name] = float(target)
    return genome
