"""The genome: named bounded floats that an optimizer proposes, and how they become a merge Recipe.

Granularity decides how many groups of tensors get their own coefficients:
`global` (one group), `layer_group` (contiguous blocks of layers) or `layer`.
Tensors outside the decoder layers (embeddings, final norm, lm_head) form the
`rest` group. With `split_modules`, attention and MLP inside a layer group get
separate coefficients (layer norms follow the attention values).

A gene is structured, (parameter, owner, group): its name (what the optimizer
and Optuna see, e.g. ``weight.Qwen2.5-Math.G0_mlp``) is only a label, never
parsed back, so any expert name works, dots included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from evomerge.merge import Override, Recipe, get_method
from evomerge.search.optimizers import Choices
from evomerge.search.space import MergeSpec


def gene_name(param: str, owner: str | None, group: str) -> str:
    """The label of a gene: ``param.owner.group`` (``param.group`` for a shared one)."""
    return f"{param}.{owner}.{group}" if owner is not None else f"{param}.{group}"


METHOD_GENE = "method"
"""The gene naming a trial's merge method, when a space searches several."""


@dataclass(frozen=True)
class Gene:
    """One searched value: ``param`` of ``owner`` (an expert; None: shared by all) in tensor ``group``.

    A data-flow genome uses the same shape: ``include`` of owner ``r0.lang`` in group ``L3``.
    A gene with ``choices`` is categorical (the merge method): its value is one of them.
    """

    param: str
    owner: str | None
    group: str
    low: float
    high: float
    choices: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return gene_name(self.param, self.owner, self.group) if self.param != METHOD_GENE else METHOD_GENE

    @property
    def bounds(self):
        """(low, high), or the choices of a categorical gene (`evomerge.search.optimizers.Choices`)."""
        return Choices(self.choices) if self.choices is not None else (self.low, self.high)

    def to_list(self) -> list:
        """How a study stores the gene's structure (`records.StudyKey.GENES`)."""
        return [self.param, self.owner, self.group]


Genes = dict[str, Gene]
"""Gene name -> gene, in the genome's order."""


def bounds_of(genes: Genes) -> dict[str, tuple[float, float]]:
    """The genome as an optimizer takes it: name -> (low, high)."""
    return {name: gene.bounds for name, gene in genes.items()}


@dataclass(frozen=True)
class TensorGroup:
    """A set of tensors sharing coefficients: layers=None means the non-layer tensors."""

    name: str
    layers: tuple[int, ...] | None
    modules: tuple[str, ...] | None


def tensor_groups(merge: MergeSpec, num_layers: int) -> list[TensorGroup]:
    """The groups in the order their overrides are applied (the `rest` group is the recipe's default)."""
    if merge.granularity == "global":
        return [TensorGroup("all", None, None)]
    if merge.granularity == "layer":
        blocks = [(i,) for i in range(num_layers)]
    else:
        count = min(merge.layer_groups, num_layers)
        blocks = [
            tuple(range(num_layers * g // count, num_layers * (g + 1) // count)) for g in range(count)
        ]
    groups = [TensorGroup("rest", None, None)]
    for index, layers in enumerate(blocks):
        prefix = f"L{layers[0]}" if merge.granularity == "layer" else f"G{index}"
        if merge.split_modules:
            groups.append(TensorGroup(f"{prefix}_attention", layers, ("attention", "norm")))
            groups.append(TensorGroup(f"{prefix}_mlp", layers, ("mlp",)))
        else:
            groups.append(TensorGroup(prefix, layers, None))
    return groups


def group_of(groups: list[TensorGroup], layer: int | None, module_type: str | None) -> TensorGroup:
    """The group whose coefficients a tensor takes: the last layer group matching it, as a recipe's
    overrides apply (later ones win), else the first group (`rest`, or `all`)."""
    group = groups[0]
    for candidate in groups[1:]:
        if layer in candidate.layers and (candidate.modules is None or module_type in candidate.modules):
            group = candidate
    return group


def inert_groups(merge: MergeSpec, num_layers: int,
                 tensors: Iterable[tuple[int | None, str | None, bool]]) -> frozenset:
    """Names of the groups whose genes would change nothing: no expert changes any of their tensors
    (``tensors``: (layer, module type, changed by some expert) each; a LoRA adapter changes only its own
    layers and modules) and every method of the space merges unchanged tensors to the base. Empty when
    every group has a changed tensor, or none has (nothing to prune to)."""
    if not all(get_method(method).keeps_unchanged_base for method in merge.methods):
        return frozenset()
    groups = tensor_groups(merge, num_layers)
    changed = {group_of(groups, layer, module).name for layer, module, touched in tensors if touched}
    return frozenset(g.name for g in groups if g.name not in changed) if changed else frozenset()


def genome_space(merge: MergeSpec, experts: list[str], num_layers: int, inert: frozenset = frozenset()) -> Genes:
    """Every searched value, e.g. gene ``weight.arith.G0_mlp`` with bounds (0.0, 1.2); first the method,
    when the space searches several. Groups named in ``inert`` (`inert_groups`) have no genes."""
    genes: Genes = {}
    if merge.searches_method:
        genes[METHOD_GENE] = Gene(METHOD_GENE, None, "all", 0.0, 0.0, choices=merge.methods)
    for group in tensor_groups(merge, num_layers):
        if group.name in inert:
            continue
        for param, (low, high) in merge.ranges.items():
            owners = experts if param in merge.per_expert else [None]
            for owner in owners:
                gene = Gene(param, owner, group.name, low, high)
                genes[gene.name] = gene
    return genes


def method_of(merge: MergeSpec, genome: Mapping[str, float]) -> str:
    """The merge method of a genome: its method gene, or the space's one method."""
    return str(genome[METHOD_GENE]) if merge.searches_method else merge.method


def _group_params(merge: MergeSpec, experts: list[str], genome: Mapping[str, float], group: TensorGroup) -> dict:
    params = {}
    for param in merge.params_of(method_of(merge, genome)):
        if param in merge.per_expert:
            params[param] = [float(genome[gene_name(param, e, group.name)]) for e in experts]
        else:
            params[param] = float(genome[gene_name(param, None, group.name)])
    return params


def genome_to_recipe(merge: MergeSpec, experts: list[str], genome: Mapping[str, float], num_layers: int,
                     inert: frozenset = frozenset()) -> Recipe:
    """Turn an optimizer's proposal into the merge recipe it stands for. Groups in ``inert`` get no
    override: their tensors take the recipe's default parameters (the first searched group's), which
    change nothing there."""
    groups = [g for g in tensor_groups(merge, num_layers) if g.name not in inert]
    method = method_of(merge, genome)
    fixed = {k: v for k, v in merge.fixed.items() if k in get_method(method).param_names}
    default = {**fixed, **_group_params(merge, experts, genome, groups[0])}
    overrides = [
        Override(
            layers=list(group.layers),
            modules=list(group.modules) if group.modules else None,
            params=_group_params(merge, experts, genome, group),
        )
        for group in groups[1:]
    ]
    # Grid parameters (TIES / breadcrumbs density, gamma) snap to the grid their threshold
    # tables are exact on; the trial records the snapped recipe, so exports say what was merged.
    return Recipe(method=method, params=default, overrides=overrides).snapped()


def uniform_genome(genes: Genes, values: Mapping[str, float]) -> dict[str, float]:
    """A genome with one value per parameter everywhere (clipped to its bounds): a uniform merge."""
    genome = {}
    for name, gene in genes.items():
        if gene.choices is not None:
            genome[name] = values.get(gene.param, gene.choices[0])
            continue
        value = values.get(gene.param, (gene.low + gene.high) / 2)
        genome[name] = min(max(float(value), gene.low), gene.high)
    return genome


def _within(value: float, gene: Gene) -> bool:
    return gene.low - 1e-9 <= value <= gene.high + 1e-9


def _matches(value, target) -> bool:
    """A fixed value (scalar or per-expert list) agrees with a target (per-expert entries None = any)."""
    if isinstance(target, list):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(target)
        return len(values) == len(target) and all(t is None or float(v) == t for v, t in zip(values, target))
    return not isinstance(value, (list, tuple)) and float(value) == target


def endpoint_genome(merge: MergeSpec, experts: list[str], genes: Genes, expert: str | None) -> dict[str, float] | None:
    """A genome whose merge is exactly one endpoint: ``expert`` alone, or the base (``None``).

    Task-arithmetic methods (TIES, DARE, ...): weight 1 for the expert and 0 for the
    others with the expert's density 1 (nothing dropped; a sign election among one
    expert keeps everything), or all weights 0 for the base. Linear: one-hot weights
    (no base). SLERP: t = 0 is the base, t = 1 the expert. Returns None where the space
    cannot express the point: a bound excludes the value (density capped below 1), a
    fixed parameter contradicts it (lambda 0.8), or the method has no such point.
    """
    for method in merge.methods:  # the first method that can express the endpoint
        genome = _endpoint_of(method, merge, experts, genes, expert)
        if genome is not None:
            return genome
    return None


def _endpoint_of(method: str, merge: MergeSpec, experts: list[str], genes: Genes, expert: str | None):
    targets = get_method(method).endpoint(None if expert is None else experts.index(expert), len(experts))
    if targets is None:
        return None  # e.g. linear cannot give the base back; model_stock has no coefficients
    if any(param in merge.fixed and not _matches(merge.fixed[param], target) for param, target in targets.items()):
        return None
    genome = uniform_genome(genes, {METHOD_GENE: method})
    active = set(merge.params_of(method))
    for name, gene in genes.items():
        if gene.choices is not None or gene.param not in active:
            continue
        target = targets.get(gene.param)
        if isinstance(target, list):
            target = target[experts.index(gene.owner)]
        if target is None:
            if gene.param == "density" and _within(1.0, gene):
                genome[name] = 1.0  # keep everything where the value does not matter
            continue
        if not _within(target, gene):
            return None
        genome[name] = float(target)
    return genome
