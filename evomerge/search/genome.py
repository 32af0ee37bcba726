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
from evomerge.search.space import PER_EXPERT_PARAMS, SearchSpace


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
    for group in tensor_groups(space, num_layers):
        for param, bounds in space.ranges.items():
            if param in PER_EXPERT_PARAMS:
                for expert in space.expert_names:
                    genome[f"{param}.{expert}.{group.name}"] = bounds
            else:
                genome[f"{param}.{group.name}"] = bounds
    return genome


def _group_params(space: SearchSpace, genome: dict[str, float], group: TensorGroup) -> dict:
    params = {}
    for param in space.ranges:
        if param in PER_EXPERT_PARAMS:
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
    return Recipe(method=space.method, params=default, overrides=overrides)


def uniform_genome(space: SearchSpace, num_layers: int, values: dict[str, float]) -> dict[str, float]:
    """A genome with one value per parameter everywhere (clipped to its bounds): a uniform merge."""
    genome = {}
    for name, (low, high) in genome_space(space, num_layers).items():
        param = name.split(".", 1)[0]
        value = values.get(param, (low + high) / 2)
        genome[name] = min(max(float(value), low), high)
    return genome
