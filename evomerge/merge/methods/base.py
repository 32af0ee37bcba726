"""What a merge method is: parameters with domains, side data prepared once, per-block math.

The core walks the model block by block (a decoder layer, or the tensors before
and after the layer stack); a block's inputs may be resident or staged from
host memory or disk (`evomerge.merge.streaming`), so a method only ever sees
views of one block (`BlockData`). Per tensor, a method may prepare side data
once (`prepare`: sort orders, norms, angles: everything that does not depend
on the coefficients) and then merges any number of candidates (`merge`) on
slices of the block. Each method lives in one module of this package and
registers itself by name (`evomerge.merge.methods.METHODS`), so a new method
touches one file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch

from evomerge.errors import EvomergeError

REQUIRED = object()  # marker default: the recipe must supply this parameter


@dataclass(frozen=True)
class Param:
    """One merge parameter: default, scope, domain and how a search treats it.

    `per_expert` parameters may be one value for all experts or a list with one
    value per expert (mergekit's per-model parameters); the others are shared.
    The domain is `low`/`high` with open or closed ends. `grid` makes searched
    values snap to multiples of it (threshold tables exist only there);
    `integer` ones take whole numbers (searched values round to them);
    `search` is the default search range a space uses. `recipe_wide`
    parameters have one value for the whole merge (overrides may not set
    them), and `mergekit=False` ones shape the export instead of being
    written as a mergekit parameter (e.g. whether the base is an input).
    """

    name: str
    default: Any = REQUIRED
    per_expert: bool = False
    boolean: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    grid: Optional[float] = None
    search: Optional[tuple[float, float]] = None
    integer: bool = False
    recipe_wide: bool = False
    mergekit: bool = True

    @property
    def domain(self) -> str:
        if self.boolean:
            return "true or false"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        interval = f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"
        return f"{interval} (whole numbers)" if self.integer else interval

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def check(self, value: Any, where: str) -> None:
        """Raise EvomergeError naming `where` unless `value` (one scalar) is in the domain."""
        if self.boolean:
            if not isinstance(value, bool):
                raise EvomergeError(f"parameter {self.name!r} must be true or false, got {value!r} ({where})")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvomergeError(f"parameter {self.name!r} must be a finite number, got {value!r} ({where})")
        if not self.contains(value) or (self.integer and value != int(value)):
            raise EvomergeError(f"{self.name} must be in {self.domain}, got {value} ({where})")

    def snap(self, value: float) -> float:
        """The grid value (or whole number) nearest to `value`, kept inside the domain."""
        if self.boolean:
            return value
        if self.integer:
            whole = round(value)
            if not self.contains(whole):
                whole += 1 if whole <= (self.low or 0) else -1
            return whole
        if self.grid is None:
            return value
        steps = round(value / self.grid)
        decimals = max(0, -int(math.floor(math.log10(self.grid))))
        snapped = round(steps * self.grid, decimals)
        if not self.contains(snapped):  # e.g. density 0.0004 -> 0.001, gamma 0.9996 -> 0.999
            snapped = round((steps + (1 if snapped <= (self.low or 0) else -1)) * self.grid, decimals)
        return snapped


@dataclass
class BlockData:
    """One block's inputs, wherever they came from: the base and each expert's task vector.

    `base` and every entry of `tvs` are 1-D views of the block's elements,
    which start at flat offset `start` of the core's layout.
    """

    start: int
    base: torch.Tensor
    tvs: list

    def base_range(self, start: int, end: int) -> torch.Tensor:
        return self.base[start - self.start : end - self.start]

    def tv_range(self, expert: int, start: int, end: int) -> torch.Tensor:
        return self.tvs[expert][start - self.start : end - self.start]

    def base_of(self, slot) -> torch.Tensor:
        return self.base_range(slot.offset, slot.end)

    def tv_of(self, slot, expert: int) -> torch.Tensor:
        return self.tv_range(expert, slot.offset, slot.end)


class MergeMethod(ABC):
    """A merge method: its parameter spec, side data, per-block math and mergekit name.

    The core calls `prepare(slot, block, ctx)` once per tensor before the first
    merge with this method (only if `side_kinds` is not empty), then
    `merge(unit, block, params, seed, out, ctx)` per candidate, for each unit:
    one tensor, or several consecutive tensors when `elementwise(params)` says
    the math treats every element alike. `ctx` offers `side` (the side-data
    store), `work` (reusable scratch) and `num_experts`.
    """

    name: str = ""
    params: tuple = ()
    min_experts: int = 1
    max_experts: Optional[int] = None
    base_is_input: bool = True  # mergekit: base_model set and the base listed as a source
    reference: str = ""
    side_kinds: tuple = ()  # names of the side data `prepare` makes (empty: nothing to prepare)
    statistics: tuple = ()  # data statistics it reads (`evomerge.merge.statistics.KINDS`), collected before it merges
    # Experts that all equal the base there merge to the base, whatever the parameters: the coefficients
    # of tensors no expert changes (outside a LoRA adapter's layers) are then not searched
    # (`evomerge.search.genome.inert_groups`; tests/test_genome_pruning.py holds every method to it).
    keeps_unchanged_base: bool = True

    # ------------------------------------------------------------------ spec
    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise EvomergeError(
            f"unknown parameter {name!r} for merge method {self.name!r}; valid: {', '.join(self.param_names)}"
        )

    @property
    def param_names(self) -> list:
        return [p.name for p in self.params]

    @property
    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    @property
    def per_expert(self) -> frozenset:
        return frozenset(p.name for p in self.params if p.per_expert)

    def check_param(self, name: str, value: Any, where: str) -> None:
        """Type and domain of one explicit value (a scalar, or a list for per-expert parameters)."""
        if name not in self.param_names:
            raise EvomergeError(
                f"unknown parameter {name!r} for merge method {self.name!r} in {where}; "
                f"valid: {', '.join(self.param_names)}"
            )
        param = self.param(name)
        if isinstance(value, list):
            if not param.per_expert:
                raise EvomergeError(
                    f"parameter {name!r} of {self.name!r} is shared by all experts and cannot be a list ({where})"
                )
            for v in value:
                param.check(v, where)
        else:
            param.check(value, where)

    def check_range(self, name: str, low: float, high: float, where: str) -> None:
        """A search range [low, high] must lie inside the parameter's domain (checked at parse time)."""
        param = self.param(name)
        for bound in (low, high):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise EvomergeError(f"{where}: bounds must be finite numbers, got [{low!r}, {high!r}]")
        for bound in (low, high):
            if not param.contains(bound):
                raise EvomergeError(f"{where}: {name} must be in {param.domain}, got [{low:g}, {high:g}]")

    def check_resolved(self, resolved: dict, where: str) -> None:
        """Combinations that are only invalid together (after defaults are filled in)."""

    def snap(self, params: dict) -> dict:
        """`params` with grid parameters snapped (scalars and per-expert lists)."""
        result = dict(params)
        for name, value in params.items():
            param = next((p for p in self.params if p.name == name), None)
            if param is None or (param.grid is None and not param.integer):
                continue
            result[name] = [param.snap(v) for v in value] if isinstance(value, list) else param.snap(value)
        return result

    def search_ranges(self) -> dict:
        """Default searched parameters of a search space using this method, with their ranges."""
        return {p.name: p.search for p in self.params if p.search is not None}

    def uses_base(self, params: dict) -> bool:
        """Whether the base is an input of a merge with these resolved (recipe-wide) parameters.

        mergekit: `base_model` set and the base listed as a source of every slice.
        """
        return self.base_is_input

    def endpoint(self, expert: Optional[int], num_experts: int) -> Optional[dict]:
        """Parameter values whose merge is `expert` alone (or the base for None); None if none is.

        Per-expert targets are lists with None where the value does not matter.
        """
        return None

    def check_experts(self, num_experts: int) -> None:
        if num_experts < self.min_experts:
            raise EvomergeError(
                f"merge method {self.name!r} needs at least {self.min_experts} expert(s), got {num_experts}"
            )
        if self.max_experts is not None and num_experts > self.max_experts:
            raise EvomergeError(
                f"merge method {self.name!r} needs exactly {self.max_experts} expert(s), got {num_experts}"
            )

    # ------------------------------------------------------------------ planning
    def elementwise(self, params: dict) -> bool:
        """True if every element is merged alike, so consecutive tensors can share one call."""
        return False

    def cache_bytes_per_element(self, num_experts: int, dtype: torch.dtype) -> int:
        """Bytes per element of optional per-element caches (kept only where the plan has room)."""
        return 0

    def statistics_bytes(self, layout, num_experts: int) -> int:
        """Device bytes the data statistics of one tensor take while it merges (all experts' at once)."""
        return 0

    def workspace_bytes(self, unit_numel: int, num_experts: int, dtype: torch.dtype) -> int:
        """Upper estimate of temporaries while merging a unit of `unit_numel` elements."""
        size = torch.empty((), dtype=dtype).element_size()
        return unit_numel * (num_experts * size + 8)

    # ------------------------------------------------------------------ per block
    def prepare(self, slot, block: BlockData, ctx) -> None:
        """Side data for one tensor (called once, before the first merge with this method)."""

    @abstractmethod
    def merge(self, unit, block: BlockData, params: dict, seed: int, out: torch.Tensor, ctx) -> None:
        """Write the merge of `unit` (flat elements unit.start..unit.end) into `out` (same length)."""

    # ------------------------------------------------------------------ export
    @property
    def mergekit_name(self) -> str | None:
        """The same method's name in mergekit; None where mergekit has no equivalent (data-informed methods)."""
        return self.name

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"
