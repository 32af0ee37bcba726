"""The memory plan: which tier holds each block of the base and of every task vector.

Tiers, fastest first: `device` (resident where the merge runs), `host` (RAM,
pinned when the device is CUDA; copied into staging per candidate) and `disk`
(the checkpoints' safetensors, memory-mapped; a task-vector block is
recomputed as expert minus base after staging). On the device, the resident
model the merge writes into, the merge workspace and, when anything streams,
two staging buffers (one being filled while the other is merged) come first;
then blocks are placed fastest tier first: the base, then each expert's task
vector, largest blocks first (so staging stays small). Per-element side data
(int32 rank caches) gets only the device room left after that: a byte moved
per candidate costs more than a threshold table. The plan is arithmetic on a
`Layout`, so it runs from headers or configs alone.

An expert that is a LoRA adapter (`evomerge.merge.adapters`) has no checkpoint
to stream: its factors stay on the device (accounted as fixed bytes), and each
block of its task vector is either kept dense on the device or, in the tier
`factors`, recomputed there from the factors per candidate into one
materialization buffer (no copy between tiers). Its blocks get device room
after the full experts', whose alternative is a transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from evomerge.errors import EvomergeError
from evomerge.merge.memory import Budgets, format_bytes
from evomerge.merge.methods import METHODS

DEVICE, HOST, DISK, FACTORS = "device", "host", "disk", "factors"
TIERS = (DEVICE, HOST, DISK, FACTORS)  # FACTORS: an adapter's block, recomputed on the device per candidate
BASE = -1  # source index of the base; experts are 0..E-1
STAGING_SLOTS = 2
DEFAULT_HOST_BANDWIDTH = 25e9  # bytes/s, pinned host -> device over PCIe 4.0 x16
DEFAULT_DISK_BANDWIDTH = 3e9  # bytes/s, one NVMe SSD


@dataclass
class MemoryPlan:
    """Tier of every (block, source), with the fixed reservations and what streams per candidate."""

    num_experts: int
    element_size: int
    dtype: str
    block_numels: list
    budgets: Budgets
    tiers: dict  # (block index, source) -> tier
    resident_bytes: int
    passthrough_bytes: int
    workspace_bytes: int
    staging_bytes: int  # device, all slots
    pinned_staging_bytes: int  # host, all slots (CUDA with disk blocks)
    cache_bytes_wanted: int = 0  # per-element side data the methods would like (rank caches)
    adapter_bytes: dict = field(default_factory=dict)  # expert index of a LoRA adapter -> its factors' device bytes
    materialize_bytes: int = 0  # device buffer that adapter blocks in the factors tier are recomputed into
    notes: list = field(default_factory=list)

    @property
    def sources(self) -> list:
        return [BASE, *range(self.num_experts)]

    def tier(self, block: int, source: int) -> str:
        return self.tiers[(block, source)]

    def streamed(self, block: int) -> list:
        """(source, tier) of the block's inputs copied into staging (host or disk), in source order."""
        return [(s, self.tiers[(block, s)]) for s in self.sources if self.tiers[(block, s)] in (HOST, DISK)]

    def recomputed(self, block: int) -> list:
        """The adapters whose task vector of the block is recomputed from their factors, in source order."""
        return [s for s in self.sources if self.tiers[(block, s)] == FACTORS]

    @property
    def materialize_slot_numel(self) -> int:
        return max((len(self.recomputed(b)) * n for b, n in enumerate(self.block_numels)), default=0)

    def item_bytes(self, block: int) -> int:
        return self.block_numels[block] * self.element_size

    def bytes_on(self, tier: str, source_kind: Optional[str] = None) -> int:
        total = 0
        for (block, source), where in self.tiers.items():
            if where == tier and (source_kind is None or (source == BASE) == (source_kind == "base")):
                total += self.item_bytes(block)
        return total

    @property
    def staging_slot_numel(self) -> int:
        return max((len(self.streamed(b)) * n for b, n in enumerate(self.block_numels)), default=0)

    @property
    def device_bytes(self) -> int:
        """Everything accounted on the device once the model exists (before side caches)."""
        return (self.resident_bytes + self.passthrough_bytes + self.workspace_bytes + self.staging_bytes
                + self.bytes_on(DEVICE) + sum(self.adapter_bytes.values()) + self.materialize_bytes)

    @property
    def host_bytes(self) -> int:
        return self.bytes_on(HOST) + self.pinned_staging_bytes

    @property
    def cache_room(self) -> int:
        """Device bytes left within the budget for per-element side data."""
        return max(0, self.budgets.device - self.device_bytes)

    def streamed_bytes(self, tier: Optional[str] = None) -> int:
        """Bytes copied into device staging per candidate (from `tier`, or from host and disk)."""
        return sum(self.bytes_on(t) for t in (HOST, DISK) if tier in (None, t))

    def transfer_seconds(self, host_bandwidth: float = DEFAULT_HOST_BANDWIDTH,
                         disk_bandwidth: float = DEFAULT_DISK_BANDWIDTH) -> float:
        """Projected copy time per candidate: host blocks at the host->device rate, disk blocks at the disk rate."""
        return self.streamed_bytes(HOST) / host_bandwidth + self.streamed_bytes(DISK) / disk_bandwidth

    def summary(self) -> dict:
        return {
            "device_budget_bytes": self.budgets.device,
            "host_budget_bytes": self.budgets.host,
            "resident_model_bytes": self.resident_bytes + self.passthrough_bytes,
            "workspace_bytes": self.workspace_bytes,
            "staging_bytes": self.staging_bytes,
            "pinned_staging_bytes": self.pinned_staging_bytes,
            "device_blocks_bytes": self.bytes_on(DEVICE),
            "host_blocks_bytes": self.bytes_on(HOST),
            "disk_blocks_bytes": self.bytes_on(DISK),
            "planned_device_bytes": self.device_bytes,
            "planned_host_bytes": self.host_bytes,
            "streamed_bytes_per_candidate": self.streamed_bytes(),
            "cache_room_bytes": self.cache_room,
            "cache_bytes_wanted": self.cache_bytes_wanted,
            "adapter_factor_bytes": sum(self.adapter_bytes.values()),
            "adapter_materialize_bytes": self.materialize_bytes,
            "recomputed_bytes_per_candidate": self.bytes_on(FACTORS),
        }

    def describe(self, host_bandwidth: float = DEFAULT_HOST_BANDWIDTH,
                 disk_bandwidth: float = DEFAULT_DISK_BANDWIDTH) -> str:
        """A few lines for `evomerge plan` and the logs."""
        model = sum(self.block_numels) * self.element_size
        lines = [
            f"model: {sum(self.block_numels) / 1e9:.2f}B merged parameters ({self.dtype}, {format_bytes(model)} per model), "
            f"{self.num_experts} expert(s), {len(self.block_numels)} blocks",
        ]

        def share(tier, kind):
            total = model if kind == "base" else model * self.num_experts
            return f"{100 * self.bytes_on(tier, kind) / total:.0f}%" if total else "0%"

        lines.append(
            f"device: {format_bytes(self.device_bytes)} of {format_bytes(self.budgets.device)}: resident model "
            f"{format_bytes(self.resident_bytes + self.passthrough_bytes)}, workspace {format_bytes(self.workspace_bytes)}, "
            f"staging {format_bytes(self.staging_bytes)}, blocks {format_bytes(self.bytes_on(DEVICE))} "
            f"(base {share(DEVICE, 'base')}, task vectors {share(DEVICE, 'tv')})"
            + (f", adapters {format_bytes(sum(self.adapter_bytes.values()) + self.materialize_bytes)}"
               if self.adapter_bytes else "")
        )
        lines.append(
            f"host:   {format_bytes(self.host_bytes)} of {format_bytes(self.budgets.host)}: blocks "
            f"{format_bytes(self.bytes_on(HOST))} (base {share(HOST, 'base')}, task vectors {share(HOST, 'tv')}), "
            f"pinned staging {format_bytes(self.pinned_staging_bytes)}"
        )
        lines.append(
            f"disk:   {format_bytes(self.bytes_on(DISK))} read from the safetensors files "
            f"(base {share(DISK, 'base')}, task vectors {share(DISK, 'tv')})"
        )
        if self.adapter_bytes:
            adapters_total = model * len(self.adapter_bytes)
            dense = sum(self.item_bytes(b) for (b, s), t in self.tiers.items()
                        if s in self.adapter_bytes and t == DEVICE)
            factors = format_bytes(sum(self.adapter_bytes.values()))
            lines.append(
                f"adapters: {len(self.adapter_bytes)} LoRA expert(s), factors {factors} "
                f"on the device; task vectors {100 * dense / adapters_total:.0f}% dense on the device, "
                f"{100 * self.bytes_on(FACTORS) / adapters_total:.0f}% recomputed from the factors per candidate "
                f"({format_bytes(self.bytes_on(FACTORS))}, buffer {format_bytes(self.materialize_bytes)})"
            )
        if self.cache_bytes_wanted:
            fit = min(self.cache_room, self.cache_bytes_wanted)
            lines.append(
                f"side data: per-element caches (rank caches, SCE's variance) would take "
                f"{format_bytes(self.cache_bytes_wanted)}; {format_bytes(fit)} fit on the device, "
                "threshold tables or recomputation for the rest"
            )
        streamed = self.streamed_bytes()
        lines.append(
            f"streamed per candidate: {format_bytes(streamed)} (host {format_bytes(self.streamed_bytes(HOST))}, "
            f"disk {format_bytes(self.streamed_bytes(DISK))}); projected transfer {self.transfer_seconds(host_bandwidth, disk_bandwidth):.2f} s "
            f"per candidate at {host_bandwidth / 1e9:g} GB/s host->device and {disk_bandwidth / 1e9:g} GB/s disk"
        )
        lines += self.notes
        return "\n".join(lines)


def _unit_numel(layout, chunk_elements: int) -> int:
    return max(layout.largest_tensor, min(chunk_elements, layout.largest_block))


def workspace_bytes(layout, num_experts: int, methods: Sequence, chunk_elements: int) -> int:
    """The largest merge workspace of `methods` (of every registered method when empty)."""
    unit = _unit_numel(layout, chunk_elements)
    chosen = list(methods) or list(METHODS.values())
    merge = max(m.workspace_bytes(unit, num_experts, layout.dtype) for m in chosen)
    return merge + max((m.statistics_bytes(layout, num_experts) for m in methods), default=0)


def plan_memory(
    layout,
    num_experts: int,
    budgets: Budgets,
    *,
    methods: Sequence = (),
    pinned: bool = False,
    chunk_elements: int = 1 << 24,
    what: str = "the merge",
    adapters: Optional[Mapping[int, int]] = None,
) -> MemoryPlan:
    """Place every block of the base and of each task vector in the fastest tier with room.

    `adapters` maps the index of each expert that is a LoRA adapter to the device
    bytes of its factors: its blocks are dense on the device or recomputed there
    (tier `factors`), never staged. Raises EvomergeError, naming the sizes, when
    the device budget cannot hold the resident model, the workspace, the adapters'
    factors and the staging / materialization buffers, or the host budget cannot
    hold the pinned staging needed to read from disk.
    """
    adapters = dict(adapters or {})
    size = layout.element_size
    numels = [b.numel for b in layout.blocks]
    sources = [BASE, *range(num_experts)]
    full = [s for s in sources if s not in adapters]  # sources with a checkpoint to stream: base, full fine-tunes
    low_rank = [s for s in sources if s in adapters]
    resident = layout.numel * size
    passthrough = layout.passthrough_bytes
    workspace = workspace_bytes(layout, num_experts, methods, chunk_elements)
    factors = sum(adapters.values())
    fixed = resident + passthrough + workspace + factors
    by_size = sorted(range(len(numels)), key=lambda b: -numels[b])
    order = [(b, s) for s in full + low_rank for b in by_size]
    fallback = {s: (FACTORS if s in adapters else DISK) for s in sources}
    tiers = {item: fallback[item[1]] for item in order}
    total = sum(numels) * size * len(sources)
    cache_wanted = max((m.cache_bytes_per_element(num_experts, layout.dtype) for m in methods), default=0) * layout.numel
    plan_args = dict(num_experts=num_experts, element_size=size, dtype=str(layout.dtype).replace("torch.", ""),
                     block_numels=numels, budgets=budgets, resident_bytes=resident, passthrough_bytes=passthrough,
                     workspace_bytes=workspace, cache_bytes_wanted=cache_wanted, adapter_bytes=adapters)

    if fixed + total <= budgets.device:
        return MemoryPlan(tiers={item: DEVICE for item in order}, staging_bytes=0, pinned_staging_bytes=0, **plan_args)

    def staging(tier_filter) -> int:
        per_block = [sum(1 for s in sources if tier_filter(tiers[(b, s)])) * numels[b] for b in range(len(numels))]
        return STAGING_SLOTS * max(per_block, default=0) * size

    def materialize() -> int:
        return max((sum(1 for s in low_rank if tiers[(b, s)] == FACTORS) * n for b, n in enumerate(numels)),
                   default=0) * size

    worst_staging = STAGING_SLOTS * len(full) * layout.largest_block * size
    worst_materialize = len(low_rank) * layout.largest_block * size
    if fixed + worst_staging + worst_materialize > budgets.device:
        adapter_part = (f", the LoRA adapters' factors {format_bytes(factors)} and a buffer to recompute their "
                        f"largest block in {format_bytes(worst_materialize)}" if adapters else "")
        raise EvomergeError(
            f"device memory budget {format_bytes(budgets.device)} is too small for {what}: the resident model needs "
            f"{format_bytes(resident + passthrough)}, the merge workspace {format_bytes(workspace)}{adapter_part} and "
            f"staging for the largest block {STAGING_SLOTS} x {format_bytes(worst_staging // STAGING_SLOTS)} "
            f"({format_bytes(fixed + worst_staging + worst_materialize)} in all); give more --device-memory or use "
            "a smaller dtype"
        )

    def fill(tier: str, room: int) -> int:
        """Move items still in their fallback tier into `tier` while room lasts (adapters: the device only)."""
        for item in order:
            nbytes = numels[item[0]] * size
            movable = tiers[item] == fallback[item[1]] and (tier == DEVICE or item[1] not in adapters)
            if movable and nbytes <= room:
                tiers[item] = tier
                room -= nbytes
        return room

    def streams(tier: str) -> bool:
        return tier in (HOST, DISK)

    room = fill(DEVICE, budgets.device - fixed - worst_staging - worst_materialize)
    fill(DEVICE, room + worst_staging + worst_materialize - staging(streams) - materialize())
    device_staging = staging(streams)

    pinned_staging = 0
    worst_pinned = STAGING_SLOTS * len(full) * layout.largest_block * size if pinned else 0
    host_room = budgets.host - worst_pinned
    if host_room >= 0:
        host_room = fill(HOST, host_room)
    if pinned and any(t == DISK for t in tiers.values()):
        pinned_staging = staging(lambda t: t == DISK)
        if pinned_staging > budgets.host:
            raise EvomergeError(
                f"host memory budget {format_bytes(budgets.host)} is too small for {what}: reading blocks from disk "
                f"needs {format_bytes(pinned_staging)} of pinned staging; give more --host-memory"
            )
        fill(HOST, host_room + worst_pinned - pinned_staging)
        pinned_staging = staging(lambda t: t == DISK)
    return MemoryPlan(tiers=tiers, staging_bytes=device_staging, pinned_staging_bytes=pinned_staging,
                      materialize_bytes=materialize(), **plan_args)
