"""In-memory merge core: load base + experts once, merge many candidates fast.

Layout: every floating tensor of the base gets a slice of one flat buffer
(`base_flat`, shape [N]); task vectors (expert - base) share the same layout in
`task_vectors` ([experts, N]). Flat storage lets elementwise merges process many
small tensors (norms, per-layer groups with equal coefficients) as one slice,
and lets `new_model()` rebind a model's parameters onto one flat output buffer
so `merge_into` writes the merge straight into the model, with no copy and no
allocation per candidate beyond small temporaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import methods as M
from evomerge.merge.loading import check_compatible, open_model
from evomerge.merge.recipe import Recipe, layer_of, module_type_of

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPE_NAMES:
        return _DTYPE_NAMES[str(dtype)]
    raise EvomergeError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPE_NAMES)}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TensorSlot:
    """Where one tensor lives in the flat buffers and which overrides can reach it."""

    index: int
    name: str
    shape: tuple
    offset: int
    numel: int
    layer: Optional[int]
    module_type: Optional[str]

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass
class _Unit:
    """Contiguous slots merged in one call: several (elementwise) or one (per-tensor)."""

    slots: list
    params: dict
    elementwise: bool
    start: int = 0
    end: int = 0
    names: list = field(default_factory=list)


def _slot_order(name: str):
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if "embed" in name else 2, 0, name)


class MergeCore:
    """Merge a base with experts for many recipes without touching the disk.

    `cache_orderings` keeps magnitude ranks (4 bytes/element/expert) after the
    first TIES / breadcrumbs / DELLA merge so later candidates skip the sort.
    """

    def __init__(
        self,
        base_path,
        expert_paths,
        device=None,
        dtype=None,
        *,
        cache_orderings: bool = True,
        chunk_elements: int = 1 << 24,
    ):
        self.device = torch.device(device or default_device())
        self.base_path = base_path
        self.expert_paths = list(expert_paths)
        if not self.expert_paths:
            raise EvomergeError("a merge needs at least one expert model")
        self.base_files = open_model(base_path)
        self.expert_files = [open_model(p) for p in self.expert_paths]
        check_compatible(self.base_files, self.expert_files)
        self.config = self.base_files.config
        self.num_layers = self.base_files.num_layers
        self.num_experts = len(self.expert_files)
        self.cache_orderings = cache_orderings
        self.chunk_elements = int(chunk_elements)

        float_names = [n for n, d in self.base_files.dtypes.items() if d.is_floating_point]
        self.passthrough_names = [n for n, d in self.base_files.dtypes.items() if not d.is_floating_point]
        self.dtype = resolve_dtype(dtype) or self._checkpoint_dtype(float_names)

        self.slots: list[TensorSlot] = []
        offset = 0
        for index, name in enumerate(sorted(float_names, key=_slot_order)):
            shape = tuple(self.base_files.shapes[name])
            numel = 1
            for s in shape:
                numel *= s
            self.slots.append(TensorSlot(index, name, shape, offset, numel, layer_of(name), module_type_of(name)))
            offset += numel
        self.numel = offset
        self.slot_by_name = {s.name: s for s in self.slots}

        self.base_flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.passthrough = {}
        for name, tensor in self.base_files.iter_tensors():
            if name in self.slot_by_name:
                self.base_view(self.slot_by_name[name]).copy_(tensor.to(self.dtype).reshape(-1))
            else:
                self.passthrough[name] = tensor.to(self.device)
        self.task_vectors = torch.empty((self.num_experts, self.numel), dtype=self.dtype, device=self.device)
        for e, files in enumerate(self.expert_files):
            for name, tensor in files.iter_tensors([s.name for s in self.slots]):
                slot = self.slot_by_name[name]
                expert = tensor.to(device=self.device, dtype=self.dtype).reshape(-1)
                torch.sub(expert, self.base_view(slot), out=self.task_vectors[e, slot.offset : slot.end])
                del expert

        self._cache: dict = {}
        self._scratch: Optional[torch.Tensor] = None
        self._scratch_row: Optional[torch.Tensor] = None
        self._out_flat: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ helpers
    def _checkpoint_dtype(self, float_names) -> torch.dtype:
        counts: dict = {}
        for name in float_names:
            d = self.base_files.dtypes[name]
            counts[d] = counts.get(d, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    @property
    def tensor_names(self) -> list[str]:
        return [s.name for s in self.slots]

    def base_view(self, slot: TensorSlot) -> torch.Tensor:
        return self.base_flat[slot.offset : slot.end]

    def task_vector(self, slot: TensorSlot, expert: int) -> torch.Tensor:
        return self.task_vectors[expert, slot.offset : slot.end]

    def _scratch_rows(self, numel: int) -> torch.Tensor:
        """[experts, numel] work buffer, allocated once at its largest size."""
        if self._scratch is None or self._scratch.shape[1] < numel:
            size = max(numel, min(self.chunk_elements, self.numel), max((s.numel for s in self.slots), default=0))
            self._scratch = torch.empty((self.num_experts, size), dtype=self.dtype, device=self.device)
            self._scratch_row = torch.empty(size, dtype=self.dtype, device=self.device)
        return self._scratch[:, :numel]

    def _cached(self, key, compute):
        if not self.cache_orderings:
            return compute()
        value = self._cache.get(key)
        if value is None:
            value = compute()
            self._cache[key] = value
        return value

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ public API
    def merge(self, recipe: Recipe, seed: int = 0) -> dict[str, torch.Tensor]:
        """Merged tensors by name (fresh storage the caller owns), plus non-float passthroughs."""
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self._merge_flat(recipe, seed, out)
        result = {s.name: out[s.offset : s.end].view(s.shape) for s in self.slots}
        for name, tensor in self.passthrough.items():
            result[name] = tensor.clone()
        return result

    def new_model(self):
        """(model, tokenizer) from the base folder, on the core's device, as merge targets.

        The model's merged parameters are rebound onto one flat buffer laid out
        like the core's, so `merge_into` computes directly into them. Tied
        embeddings share one Parameter and are written once. The tokenizer is
        None when the base folder has none.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(self.base_path), dtype=self.dtype)
        model.to(self.device)
        model.eval()
        params = dict(model.named_parameters())
        arena = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for slot in self.slots:
                param = params.get(slot.name)
                if param is None:
                    raise EvomergeError(f"model built from {self.base_path} has no parameter {slot.name}")
                view = arena[slot.offset : slot.end].view(slot.shape)
                view.copy_(param.data)
                param.data = view
        model._evomerge_arena = arena
        model._evomerge_layout = id(self)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.base_path))
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return model, tokenizer

    @torch.no_grad()
    def merge_into(self, model, recipe: Recipe, seed: int = 0):
        """Write the merge into `model`'s parameters in place; returns the model."""
        arena = getattr(model, "_evomerge_arena", None)
        if arena is not None and getattr(model, "_evomerge_layout", None) == id(self) and arena.dtype == self.dtype:
            self._merge_flat(recipe, seed, arena)
            return model
        params = dict(model.named_parameters())
        missing = [s.name for s in self.slots if s.name not in params]
        if missing:
            raise EvomergeError(f"model has no parameter {missing[0]} (merged from {self.base_path})")
        if self._out_flat is None:
            self._out_flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self._merge_flat(recipe, seed, self._out_flat)
        for slot in self.slots:
            params[slot.name].data.copy_(self._out_flat[slot.offset : slot.end].view(slot.shape))
        return model

    # ------------------------------------------------------------------ planning
    def _plan(self, recipe: Recipe) -> list[_Unit]:
        """Group slots into units: runs of elementwise slots with equal params, else one slot."""
        spec = recipe.spec
        by_position: dict = {}
        interned: dict = {}
        units: list[_Unit] = []
        for slot in self.slots:
            key = (slot.layer, slot.module_type)
            params = by_position.get(key)
            if params is None:
                resolved = recipe.resolved_params(slot.layer, slot.module_type, self.num_experts)
                params = interned.setdefault(json.dumps(resolved, sort_keys=True), resolved)
                by_position[key] = params
            elementwise = spec.kind == "linear" or (
                spec.kind == "task_arithmetic"
                and (spec.sparsification is None or all(d >= 1 for d in params["density"]))
            )
            last = units[-1] if units else None
            if (
                elementwise
                and last is not None
                and last.elementwise
                and last.params is params
                and last.end == slot.offset
                and last.end - last.start + slot.numel <= self.chunk_elements
            ):
                last.slots.append(slot)
                last.end = slot.end
            else:
                units.append(_Unit([slot], params, elementwise, slot.offset, slot.end))
        return units

    def _merge_flat(self, recipe: Recipe, seed: int, out: torch.Tensor) -> None:
        if not isinstance(recipe, Recipe):
            raise EvomergeError(f"expected a Recipe, got {type(recipe).__name__}")
        recipe.validate(self.num_experts)
        spec = recipe.spec
        with torch.no_grad():
            for unit in self._plan(recipe):
                if spec.kind == "linear":
                    self._merge_linear(unit, out)
                elif spec.kind == "task_arithmetic":
                    self._merge_task_arithmetic(spec, unit, seed, out)
                elif spec.kind == "slerp":
                    self._merge_slerp(unit, out)
                elif spec.kind == "model_stock":
                    self._merge_model_stock(unit, out)
                else:  # pragma: no cover - table and code out of sync
                    raise EvomergeError(f"merge method kind {spec.kind!r} is not implemented")

    # ------------------------------------------------------------------ methods
    def _merge_linear(self, unit: _Unit, out: torch.Tensor) -> None:
        n = unit.end - unit.start
        self._scratch_rows(n)
        M.linear_combine(
            self.base_flat[unit.start : unit.end],
            self.task_vectors[:, unit.start : unit.end],
            unit.params["weight"],
            normalize=unit.params["normalize"],
            out=out[unit.start : unit.end],
            scratch=self._scratch_row[:n],
        )

    def _merge_task_arithmetic(self, spec, unit: _Unit, seed: int, out: torch.Tensor) -> None:
        n = unit.end - unit.start
        params = unit.params
        deltas = self._scratch_rows(n)
        if unit.elementwise:
            source = self.task_vectors[:, unit.start : unit.end]
        else:
            (slot,) = unit.slots
            for e in range(self.num_experts):
                self._sparsified_delta(spec, slot, e, params, seed, deltas[e])
            source = deltas
        M.combine_task_vectors(
            self.base_flat[unit.start : unit.end],
            source,
            deltas,
            params["weight"],
            consensus=spec.consensus,
            normalize=params["normalize"],
            lam=params["lambda"],
            out=out[unit.start : unit.end],
        )

    def _sparsified_delta(self, spec, slot: TensorSlot, e: int, params: dict, seed: int, dest: torch.Tensor):
        """Write expert e's sparsified (and optionally L1-rescaled) task vector into dest."""
        tv = self.task_vector(slot, e)
        density = params["density"][e]
        rescale = params["rescale"]
        method = spec.sparsification
        if density >= 1:
            dest.copy_(tv)
            return
        if method in ("magnitude", "magnitude_outliers"):
            if method == "magnitude":
                ranks = self._cached(("magnitude", slot.index, e), lambda: M.magnitude_ranks(tv))
                keep = M.magnitude_keep(ranks, density)
            else:
                ranks = self._cached(("outliers", slot.index, e), lambda: M.outlier_ranks(tv))
                keep = M.outlier_keep(ranks, density, params["gamma"][e])
            torch.mul(tv, keep, out=dest)
            if rescale:
                before = self._cached(("l1", slot.index, e, tv.dtype), lambda: tv.view(slot.shape).abs().sum())
                M.rescale_l1_(dest, before)
            return
        work_dtype = M.sparsify_work_dtype(tv)
        generator = M.mask_generator(seed, slot.name, e, self.device)
        if method == "random":
            keep = M.random_keep(slot.shape, density, work_dtype, generator, self.device).reshape(-1)
            if work_dtype == tv.dtype:
                torch.mul(tv, keep, out=dest)
                masked = dest
            else:
                masked = tv.to(work_dtype) * keep
        elif method == "della":
            rank_norm = self._cached(("della", slot.index, e), lambda: M.della_rank_norm(tv.view(slot.shape)))
            probs = M.della_probs(rank_norm, density, params["epsilon"][e])
            mask = M.bernoulli_mask(probs, generator)
            masked = (tv.view(rank_norm.shape).to(work_dtype) * mask).reshape(-1)
        else:  # pragma: no cover
            raise EvomergeError(f"sparsification {method!r} is not implemented")
        if rescale:
            shape = slot.shape if method == "random" else rank_norm.shape
            before = self._cached(
                ("l1", slot.index, e, work_dtype), lambda: tv.to(work_dtype).view(shape).abs().sum()
            )
            M.rescale_l1_(masked, before)
        if masked is not dest:
            dest.copy_(masked)

    def _merge_slerp(self, unit: _Unit, out: torch.Tensor) -> None:
        (slot,) = unit.slots
        base = self.base_view(slot)
        expert = torch.add(base, self.task_vector(slot, 0), out=self._scratch_rows(slot.numel)[0])
        geometry = self._cached(("slerp", slot.index), lambda: M.slerp_geometry(base, expert))
        coef_a, coef_b = M.slerp_coefficients(geometry, unit.params["t"])
        M.slerp_apply(base, expert, coef_a, coef_b, out[slot.offset : slot.end])

    def _merge_model_stock(self, unit: _Unit, out: torch.Tensor) -> None:
        (slot,) = unit.slots
        base = self.base_view(slot)
        rows = self._scratch_rows(slot.numel)
        experts = [torch.add(base, self.task_vector(slot, e), out=rows[e]).view(slot.shape) for e in range(self.num_experts)]
        M.model_stock(
            base.view(slot.shape),
            experts,
            filter_wise=unit.params["filter_wise"],
            out=out[slot.offset : slot.end].view(slot.shape),
        )
