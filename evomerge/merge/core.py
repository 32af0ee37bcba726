"""In-memory merge core: load base + experts once, merge many candidates fast, within memory budgets.

Layout (`evomerge.merge.layout`): every floating tensor of the base gets a
slice of one flat index space, grouped into per-layer blocks. The memory plan
(`evomerge.merge.planner`) puts each block of the base and of every task
vector (expert - base) on the device, in host memory or leaves it on disk,
within `device_memory` / `host_memory`; an expert may be a LoRA adapter
folder (`evomerge.merge.adapters`), whose task vector is made from its
factors kept on the device. A merge walks the blocks in order
(`evomerge.merge.streaming`): resident blocks are read in place, the others
are copied into staging while the previous block merges. Every path gives the
same bits: the same per-block units and the same math run on identical inputs.

`new_model()` builds the model on its device with its parameters rebound onto
one flat buffer laid out like the core, so `merge_into` writes the merge
straight into the model, with no copy and no allocation per candidate beyond
small temporaries.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.adapters import AdapterFiles, AdapterWeights, is_adapter, open_adapter, open_experts
from evomerge.merge.layout import DEFAULT_BLOCK_ELEMENTS, Layout, TensorSlot  # noqa: F401 (TensorSlot re-exported)
from evomerge.merge.loading import check_compatible, open_model
from evomerge.merge.memory import Budgets, Ledger
from evomerge.merge.methods import get_method
from evomerge.merge.planner import BASE, DEVICE, DISK, FACTORS, HOST, plan_memory
from evomerge.merge.recipe import Recipe
from evomerge.merge.statistics import StatisticsFiles
from evomerge.merge.streaming import Stager
from evomerge.merge.tiers import BlockStore, DiskSource

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
class _Unit:
    """Contiguous slots merged in one call: several (elementwise) or one (per-tensor)."""

    slots: list
    params: dict
    elementwise: bool
    start: int = 0
    end: int = 0


class SideData:
    """Side data of the methods (orders, norms, angles), with a device allowance for per-element caches."""

    def __init__(self, ledger: Ledger, room: int, caches: bool):
        self.ledger = ledger
        self.room = room if caches else 0
        self.values: dict = {}
        self.cached_bytes = 0

    def get(self, key):
        return self.values.get(key)

    def put(self, key, value) -> None:
        """Keep side data (per-element caches must have been `reserve`d first)."""
        self.values[key] = value

    def reserve(self, nbytes: int) -> bool:
        """Take `nbytes` of device room for a per-element cache, if the plan left that much."""
        if self.cached_bytes + nbytes > self.room:
            return False
        self.cached_bytes += nbytes
        self.ledger.add(DEVICE, "side data", nbytes)
        return True

    def clear(self) -> None:
        self.values.clear()
        self.ledger.remove(DEVICE, "side data", self.cached_bytes)
        self.cached_bytes = 0


class Workspace:
    """Reusable [experts, n] and [n] scratch buffers, allocated once at their largest size."""

    def __init__(self, num_experts: int, dtype: torch.dtype, device, size: int):
        self.num_experts, self.dtype, self.device, self.size = num_experts, dtype, device, size
        self._rows: Optional[torch.Tensor] = None
        self._row: Optional[torch.Tensor] = None

    def rows(self, n: int) -> torch.Tensor:
        if self._rows is None or self._rows.shape[1] < n:
            self._rows = torch.empty((self.num_experts, max(n, self.size)), dtype=self.dtype, device=self.device)
        return self._rows[:, :n]

    def row(self, n: int) -> torch.Tensor:
        if self._row is None or self._row.shape[0] < n:
            self._row = torch.empty(max(n, self.size), dtype=self.dtype, device=self.device)
        return self._row[:n]


@dataclass
class _Context:
    """What a method's per-block calls may use (``statistics``: the data statistics, for methods that read them;
    ``read_expert(slot, expert)``: an expert's own weights of one tensor, read from its checkpoint)."""

    side: SideData
    work: Workspace
    num_experts: int
    device: torch.device
    prepared: set = field(default_factory=set)
    statistics: Optional[StatisticsFiles] = None
    read_expert: Optional[Callable] = None


_META_BUILD = threading.local()
_META_PATCH_LOCK = threading.Lock()
_ORIGINAL_REGISTER_PARAMETER = torch.nn.Module.register_parameter


def _register_parameter(module, name, param):
    """`nn.Module.register_parameter`, moving the parameter to the meta device while this thread builds
    inside `_parameters_on_meta` (other threads, and this one outside it, register as usual)."""
    _ORIGINAL_REGISTER_PARAMETER(module, name, param)
    if param is not None and getattr(_META_BUILD, "depth", 0):
        module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (buffers stay real): no weights allocated.

    The hook is installed once for the process and acts only in the thread inside this block, so a
    model built meanwhile by another thread (a scorer, a second core) gets real weights.
    """
    with _META_PATCH_LOCK:
        if torch.nn.Module.register_parameter is not _register_parameter:
            torch.nn.Module.register_parameter = _register_parameter
    _META_BUILD.depth = getattr(_META_BUILD, "depth", 0) + 1
    try:
        yield
    finally:
        _META_BUILD.depth -= 1


class MergeCore:
    """Merge a base with experts for many recipes without touching the disk (unless the plan says so).

    `device_memory` / `host_memory` (bytes or strings like "20GiB") bound what
    the core accounts on the merge device and in host memory; blocks that do
    not fit are streamed from host memory or from the safetensors files (see
    `memory_report()`). `cache_orderings` allows int32 magnitude-rank caches
    (4 bytes/element/expert) where the plan has device room; elsewhere TIES and
    breadcrumbs use exact threshold tables (with per-element tie codes where
    there is room, else repeating mergekit's sort for those thresholds) and
    DELLA recomputes its ranks. Every way selects mergekit's elements.
    `methods` (names) prepares their side data now, in one pass, instead of
    at the first merge, and sizes the workspace for them.
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
        device_memory=None,
        host_memory=None,
        scoring_headroom=None,
        methods: Sequence[str] = (),
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        statistics: Optional[StatisticsFiles] = None,
    ):
        self.device = torch.device(device or default_device())
        self.base_path = base_path
        self.expert_paths = list(expert_paths)
        if not self.expert_paths:
            raise EvomergeError("a merge needs at least one expert model")
        self.base_files = open_model(base_path)
        self.expert_files = open_experts(self.base_files, self.expert_paths)  # ModelFiles or AdapterFiles
        self.config = self.base_files.config
        self.num_layers = self.base_files.num_layers
        self.num_experts = len(self.expert_files)
        self.cache_orderings = cache_orderings
        self.chunk_elements = int(chunk_elements)
        self.layout = Layout.from_files(self.base_files, resolve_dtype(dtype), block_elements)
        self.dtype = self.layout.dtype
        self.slots = self.layout.slots
        self.numel = self.layout.numel
        self.slot_by_name = {s.name: s for s in self.slots}
        self._block_of = {slot.index: block for block in self.layout.blocks for slot in block.slots}
        self.passthrough_names = list(self.layout.passthrough)
        self.methods = [get_method(m) for m in methods]

        self.budgets = Budgets.resolve(self.device, device_memory, host_memory, scoring_headroom)
        adapter_files = {e: f for e, f in enumerate(self.expert_files) if isinstance(f, AdapterFiles)}
        self.plan = plan_memory(
            self.layout, self.num_experts, self.budgets, methods=self.methods,
            pinned=self.device.type == "cuda", chunk_elements=self.chunk_elements,
            adapters={e: f.device_bytes for e, f in adapter_files.items()},
        )
        self.ledger = Ledger()
        self.ledger.add(DEVICE, "resident model", self.plan.resident_bytes)
        self.ledger.add(DEVICE, "workspace", self.plan.workspace_bytes)
        self.adapters = {e: AdapterWeights(f, self.device) for e, f in adapter_files.items()}
        self.ledger.add(DEVICE, "adapter factors", sum(a.nbytes for a in self.adapters.values()))
        self._load()
        self.stager = Stager(self.plan, self.layout, self.stores, self.disk, self.device, self.ledger, self.adapters)
        self._context = _Context(
            side=SideData(self.ledger, self.plan.cache_room, cache_orderings),
            work=Workspace(self.num_experts, self.dtype, self.device,
                           max(self.layout.largest_tensor, min(self.chunk_elements, self.layout.largest_block))),
            num_experts=self.num_experts,
            device=self.device,
            statistics=statistics,
            read_expert=self.expert_weights,
        )
        self._out_flat: Optional[torch.Tensor] = None
        self._moved_last = 0
        self._checkpoints: dict = {}  # BASE or expert -> DiskSource, for `expert_weights`
        if self.methods:
            self._prepare(self.methods)

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        """Fill the device and host stores the plan asks for; map what stays on disk."""
        plan, layout = self.plan, self.layout
        pinned = self.device.type == "cuda"
        self.stores: dict = {}
        for tier, where, pin in ((DEVICE, self.device, False), (HOST, "cpu", pinned)):
            for source in plan.sources:
                blocks = [b for b in layout.blocks if plan.tier(b.index, source) == tier]
                if blocks:
                    store = BlockStore(blocks, self.dtype, where, pinned=pin)
                    self.stores[(tier, source)] = store
                    self.ledger.add(tier, "base blocks" if source == BASE else "task vector blocks", store.nbytes)
        files = {BASE: self.base_files, **dict(enumerate(self.expert_files))}
        self.disk = {s: DiskSource(files[s]) for s in plan.sources
                     if any(plan.tier(b.index, s) == DISK for b in layout.blocks)}  # never an adapter (FACTORS)

        block_of = {slot.name: self._block_of[slot.index] for slot in self.slots}
        self.passthrough = {}
        for name, tensor in self.base_files.iter_tensors():
            if name not in self.slot_by_name:
                self.passthrough[name] = tensor.to(self.device)
                self.ledger.add(DEVICE, "resident model", tensor.numel() * tensor.element_size())
                continue
            block = block_of[name]
            tier = plan.tier(block.index, BASE)
            if tier != DISK:
                self.stores[(tier, BASE)].slot_view(block, self.slot_by_name[name]).copy_(tensor.reshape(-1))
        for e, adapter in self.adapters.items():  # dense task-vector blocks of LoRA experts, made from the factors
            for block in layout.blocks:
                if plan.tier(block.index, e) != DEVICE:
                    continue
                store = self.stores[(DEVICE, e)]
                for slot in block.slots:
                    adapter.task_vector_into(slot.name, self._base_slot(block, slot), store.slot_view(block, slot))
        for e, files in enumerate(self.expert_files):
            if e in self.adapters:
                continue
            wanted = [s.name for s in self.slots if plan.tier(block_of[s.name].index, e) != DISK]
            for name, tensor in files.iter_tensors(wanted):
                slot = self.slot_by_name[name]
                block = block_of[name]
                expert = tensor.to(device=self.device, dtype=self.dtype).reshape(-1)
                base = self._base_slot(block, slot)
                store = self.stores[(plan.tier(block.index, e), e)]
                if store.data.device == self.device:
                    torch.sub(expert, base, out=store.slot_view(block, slot))
                else:
                    store.slot_view(block, slot).copy_(torch.sub(expert, base))
                del expert

    def _base_slot(self, block, slot) -> torch.Tensor:
        """The base's values of one tensor on the merge device (a view when resident)."""
        tier = self.plan.tier(block.index, BASE)
        if tier == DEVICE:
            return self.stores[(DEVICE, BASE)].slot_view(block, slot)
        if tier == HOST:
            return self.stores[(HOST, BASE)].slot_view(block, slot).to(self.device)
        return self.disk[BASE].view(slot.name).to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ helpers
    @property
    def tensor_names(self) -> list[str]:
        return [s.name for s in self.slots]

    def changed_tensors(self) -> set[str]:
        """Names of the merged tensors some expert changes: a LoRA adapter's own; a full checkpoint's task
        vectors are not read for this, so it counts as changing every tensor."""
        changed: set[str] = set()
        for files in self.expert_files:
            changed |= files.changed if isinstance(files, AdapterFiles) else set(self.tensor_names)
        return changed

    def base_view(self, slot: TensorSlot) -> torch.Tensor:
        """The base's values of one tensor (flat, on the merge device; a view when resident)."""
        return self._base_slot(self._block_of[slot.index], slot)

    def task_vector(self, slot: TensorSlot, expert: int) -> torch.Tensor:
        """Expert `expert` minus the base for one tensor (flat, on the merge device; a view when resident)."""
        block = self._block_of[slot.index]
        tier = self.plan.tier(block.index, expert)
        if tier == DEVICE:
            return self.stores[(DEVICE, expert)].slot_view(block, slot)
        if tier == HOST:
            return self.stores[(HOST, expert)].slot_view(block, slot).to(self.device)
        if tier == FACTORS:
            base = self._base_slot(block, slot)
            return self.adapters[expert].task_vector_into(slot.name, base, torch.empty_like(base))
        weights = self.disk[expert].view(slot.name).to(device=self.device, dtype=self.dtype)
        return torch.sub(weights, self._base_slot(block, slot))

    def expert_weights(self, slot: TensorSlot, expert: int) -> torch.Tensor:
        """Expert `expert`'s own weights of one tensor, read from its checkpoint (a flat copy on the merge device).

        The blocks hold task vectors, and base + (expert - base) rounds back to the expert only
        where the subtraction was exact (not always in bf16); methods that merge the experts'
        weights themselves read them here (`evomerge.merge.methods.experts`). A LoRA expert's
        weights are its base checkpoint's with the adapter merged as peft merges it: the model
        mergekit's BASE+ADAPTER reads.
        """
        adapter = self.adapters.get(expert)
        if adapter is None:
            weights = self._checkpoint_tensor(expert, slot.name)
        else:
            base = self._checkpoint_tensor(BASE, slot.name, convert=False)
            weights = adapter.merged(slot.name, base) if adapter.changes(slot.name) else base
        return weights.to(device=self.device, dtype=self.dtype).reshape(-1)

    def _checkpoint_tensor(self, source: int, name: str, convert: bool = True) -> torch.Tensor:
        """One tensor of the base (`BASE`) or of a full expert as its checkpoint holds it (a copy, on the merge
        device; in the merge dtype when `convert`)."""
        files = self._checkpoints.get(source)
        if files is None:
            model_files = self.base_files if source == BASE else self.expert_files[source]
            files = self._checkpoints[source] = DiskSource(model_files)
        dtype = self.dtype if convert else None
        tensor = files.view(name).to(device=self.device, dtype=dtype, copy=True)
        files.release(name)
        return tensor

    def clear_cache(self) -> None:
        """Forget all side data (it is prepared again at the next merge)."""
        self._context.side.clear()
        self._context.prepared.clear()

    def close(self) -> None:
        """Stop the staging worker (the core is unusable afterwards)."""
        self.stager.close()

    def memory_report(self) -> dict:
        """Accounted bytes: peaks per tier, what the plan placed where, and what one candidate moves.

        `peak_device_bytes` / `peak_host_bytes` count the core's own buffers
        (resident model, blocks, staging, side data) plus the planned merge
        workspace; `bytes_moved_per_candidate` is what the last merge copied
        into device staging (0 when everything is resident).
        """
        report = {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "peak_device_bytes": self.ledger.peak.get(DEVICE, 0),
            "peak_host_bytes": self.ledger.peak.get(HOST, 0),
            "bytes_moved_per_candidate": self._moved_last,
            "device_bytes": self.ledger.by_category(DEVICE),
            "host_bytes": self.ledger.by_category(HOST),
            "side_data_cached_bytes": self._context.side.cached_bytes,
        }
        report.update(self.plan.summary())
        if self.device.type == "cuda":
            report["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return report

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

        The model is built with its parameters on the meta device, then each
        is rebound onto one flat buffer laid out like the core (filled with the
        base), so the weights are never allocated twice. Tied embeddings share
        one Parameter and are written once. The tokenizer is None when the base
        folder has none.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        config = AutoConfig.from_pretrained(str(self.base_path))
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        arena = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for block in self.layout.blocks:
                for slot in block.slots:
                    arena[slot.offset : slot.end].copy_(self._base_slot(block, slot))
        for name, _param in list(model.named_parameters()):
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            slot = self.slot_by_name.get(name)
            if slot is not None:
                view = arena[slot.offset : slot.end].view(slot.shape)
            elif name in self.passthrough:
                view = self.passthrough[name]
            else:
                continue  # e.g. a head tied to the embeddings: re-tied below
            module._parameters[param_name] = torch.nn.Parameter(view, requires_grad=False)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise EvomergeError(f"model built from {self.base_path} has parameter {missing[0]} that its weights lack")
        model.to(self.device)  # buffers (rotary tables); the parameters are already there
        model.eval()
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(self.base_path))
        except (OSError, ValueError):
            pass
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

    @torch.no_grad()
    def load_weights_into(self, model, path):
        """Write a compatible checkpoint's own weights (e.g. the base or one expert) into `model`, in place.

        Lets a search score its endpoints in the model it already holds instead of
        loading a second copy onto the device. Tensors are read one at a time. A LoRA
        adapter folder gives the base with the adapter merged as peft's merge_and_unload()
        does (from the factors this core holds when it is one of its experts).
        """
        arena = getattr(model, "_evomerge_arena", None)
        if arena is None or getattr(model, "_evomerge_layout", None) != id(self):
            raise EvomergeError("load_weights_into needs a model made by this core's new_model()")
        if is_adapter(path):
            adapter = self._adapter_weights(path)
            for block in self.layout.blocks:
                for slot in block.slots:
                    base = self._base_slot(block, slot)
                    merged = adapter.merged(slot.name, base) if adapter.changes(slot.name) else base
                    arena[slot.offset : slot.end].copy_(merged.reshape(-1))
            return model
        files = open_model(path)
        check_compatible(self.base_files, [files])
        for name, tensor in files.iter_tensors(self.tensor_names):
            slot = self.slot_by_name[name]
            arena[slot.offset : slot.end].copy_(tensor.reshape(-1))
        return model

    def _adapter_weights(self, path) -> AdapterWeights:
        """This core's loaded adapter for `path` when it is one of its experts, else the adapter read now."""
        for adapter in self.adapters.values():
            if adapter.files.path.resolve() == Path(path).resolve():
                return adapter
        return AdapterWeights(open_adapter(path, self.base_files), self.device)

    # ------------------------------------------------------------------ merging
    def _units(self, recipe: Recipe, block, by_position: dict, interned: dict) -> list[_Unit]:
        """Group a block's slots into units: runs of elementwise slots with equal params, else one slot."""
        method = recipe.spec
        units: list[_Unit] = []
        for slot in block.slots:
            key = (slot.layer, slot.module_type)
            params = by_position.get(key)
            if params is None:
                resolved = recipe.resolved_params(slot.layer, slot.module_type, self.num_experts)
                params = interned.setdefault(json.dumps(resolved, sort_keys=True), resolved)
                by_position[key] = params
            elementwise = method.elementwise(params)
            last = units[-1] if units else None
            if (
                elementwise
                and last is not None
                and last.elementwise
                and last.params is params
                and last.end - last.start + slot.numel <= self.chunk_elements
            ):
                last.slots.append(slot)
                last.end = slot.end
            else:
                units.append(_Unit([slot], params, elementwise, slot.offset, slot.end))
        return units

    def _prepare(self, methods) -> None:
        """Side data of `methods` for every tensor, in one pass over the blocks."""
        needed = [m for m in methods if m.side_kinds and not self._is_prepared(m)]
        if not needed:
            return
        with torch.no_grad():
            for block, data in self.stager.walk(self.layout.blocks):
                for method in needed:
                    self._prepare_block(method, block, data)

    def _is_prepared(self, method) -> bool:
        return all((kind, s.index) in self._context.prepared for kind in method.side_kinds for s in self.slots)

    def _prepare_block(self, method, block, data) -> None:
        prepared = self._context.prepared
        for slot in block.slots:
            if any((kind, slot.index) not in prepared for kind in method.side_kinds):
                method.prepare(slot, data, self._context)
                prepared.update((kind, slot.index) for kind in method.side_kinds)

    def _merge_flat(self, recipe: Recipe, seed: int, out: torch.Tensor) -> None:
        if not isinstance(recipe, Recipe):
            raise EvomergeError(f"expected a Recipe, got {type(recipe).__name__}")
        recipe.validate(self.num_experts)
        method = recipe.spec
        if method.statistics and self._context.statistics is None:
            raise EvomergeError(f"merge method {method.name!r} needs data statistics ({', '.join(method.statistics)}) "
                                "that this merge core was not given; a search collects them from its benchmarks' data")
        by_position, interned = {}, {}
        moved_before = self.stager.bytes_moved
        with torch.no_grad():
            for block, data in self.stager.walk(self.layout.blocks):
                if method.side_kinds:
                    self._prepare_block(method, block, data)
                for unit in self._units(recipe, block, by_position, interned):
                    method.merge(unit, data, unit.params, seed, out[unit.start : unit.end], self._context)
        self._moved_last = self.stager.bytes_moved - moved_before
