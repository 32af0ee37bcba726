"""The data-flow genome: which slots a path includes and the hidden-state level of every layer.

Slots, as in Sakana's DFS: the sources' layers in order (all of the first
source, then the second ...), the whole sequence repeated ``repeats`` times
(T = M x r slots for M layers in all). ``include.r<k>.<source>.L<i>`` in
[0, 1] puts slot (pass k, layer i of source) on the path when >= 0.5; the
path is the included slots in slot order, kept while they fit the layer and
parameter budgets (a slot that does not fit is skipped).

Scaling by consecutive layer pair, compactly: Sakana's M x M table W[i, j]
scales the hidden state entering layer j when layer i precedes it. Here every
layer i has a log2 *level* ``level.<source>.L<i>`` (the scale of the stream it
produces) and every source an embedding level ``level.<source>.E``; entering
layer j after i, the stream is scaled by 2 ** (level(pred j) - level(i)), where
pred j is the layer before j in its own model (its embedding for layer 0). So
W is rank one in log space (M + sources genes, not M^2), a model's own
consecutive layers always get 1, and all levels 0 is the unscaled path.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from evomerge.dataflow.path import DataFlowPath
from evomerge.search.dfs_space import DataFlowSpace
from evomerge.search.genome import Gene, Genes, bounds_of

INCLUDED = 0.5


def include_gene(rep: int, source: str, layer: int) -> Gene:
    """Whether slot (pass ``rep``, ``layer`` of ``source``) is on the path (>= 0.5)."""
    return Gene("include", f"r{rep}.{source}", f"L{layer}", 0.0, 1.0)


def level_gene(space: DataFlowSpace, source: str, layer: int) -> Gene:
    """The log2 level after ``layer`` of ``source`` (-1: its embedding)."""
    low, high = space.level_range
    return Gene("level", source, "E" if layer < 0 else f"L{layer}", low, high)


def dfs_genome_space(space: DataFlowSpace) -> Genes:
    genes = [include_gene(*slot) for slot in space.slots()]
    if space.scaling == "levels":
        genes += [level_gene(space, source.name, layer) for source in space.sources
                  for layer in range(-1, source.num_layers)]
    return {gene.name: gene for gene in genes}


def genome_to_path(space: DataFlowSpace, genome: Mapping[str, float]) -> DataFlowPath:
    """The included slots that fit the budgets, with the scale entering each position."""
    layers: list[tuple[str, int]] = []
    chosen = [(genome[include_gene(*slot).name], slot) for slot in space.slots()]
    for value, (_, source, layer) in chosen:
        if value < INCLUDED or len(layers) >= space.max_layers:
            continue
        if space.max_params is not None and space.path_params(layers + [(source, layer)]) > space.max_params:
            continue
        layers.append((source, layer))
    if not layers:  # nothing included: the single most-wanted slot
        _, (_, source, layer) = max(chosen, key=lambda c: c[0])
        layers = [(source, layer)]
    return DataFlowPath(layers, path_scales(space, genome, layers))


def path_scales(space: DataFlowSpace, genome: Mapping[str, float], layers: Sequence[tuple[str, int]]) -> list[float]:
    """2 ** (level expected by each layer - level of what precedes it on the path)."""
    if space.scaling == "none":
        return [1.0] * len(layers)
    scales = []
    previous = level_gene(space, layers[0][0], -1).name  # the path's embeddings are its first source's
    for source, layer in layers:
        expected = level_gene(space, source, layer - 1).name
        scales.append(1.0 if expected == previous else 2.0 ** (float(genome[expected]) - float(genome[previous])))
        previous = level_gene(space, source, layer).name
    return scales


def path_genome(space: DataFlowSpace, layers: Sequence[tuple[str, int]]) -> dict[str, float]:
    """The unscaled genome whose path is ``layers`` (which must fit the slots)."""
    indices = space.path_slots(layers)
    if indices is None:
        raise ValueError(f"path {layers} does not fit the slots")
    wanted = set(indices)
    genome = {name: min(max(0.0, low), high) for name, (low, high) in bounds_of(dfs_genome_space(space)).items()}
    for index, slot in enumerate(space.slots()):  # equal levels: no scaling
        genome[include_gene(*slot).name] = 1.0 if index in wanted else 0.0
    return genome
