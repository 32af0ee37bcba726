"""Walk the blocks of a plan, staging the non-resident ones while the previous block merges.

Two staging slots on the merge device take turns: while the core merges block
i from one slot, a worker thread fills the other with block i+1 (host blocks
by a copy, disk blocks read from the mapped safetensors). On CUDA the copies
run on a side stream from pinned host memory (disk blocks go through pinned
staging first), and events order them against the merge on the compute
stream: a slot is refilled only after the merge that read it. On CPU the same
code runs with the worker thread doing plain copies, so the tests exercise the
pipeline and its buffer reuse. A disk block of a task vector holds the
expert's weights after the copy; `walk` turns it into the task vector
(expert - base, the same operation the loader uses for resident blocks). A
LoRA adapter's block in the `factors` tier is not copied at all: `walk`
recomputes it on the device from the adapter's factors and the block's base
values (the same function the loader uses for its dense blocks).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import torch

from evomerge.merge.methods.base import BlockData
from evomerge.merge.planner import BASE, DEVICE, DISK, FACTORS, HOST, STAGING_SLOTS


class Stager:
    """Double-buffered staging of non-resident block inputs with copy/compute overlap."""

    def __init__(self, plan, layout, stores: dict, disk_sources: dict, device: torch.device, ledger,
                 adapters: Optional[dict] = None):
        self.plan = plan
        self.layout = layout
        self.stores = stores  # (tier, source) -> BlockStore
        self.disk = disk_sources  # source -> DiskSource
        self.adapters = adapters or {}  # source -> AdapterWeights (LoRA experts)
        self.device = device
        self.cuda = device.type == "cuda"
        slot_numel = plan.staging_slot_numel
        dtype = layout.dtype
        self.slots = [torch.empty(slot_numel, dtype=dtype, device=device) for _ in range(STAGING_SLOTS)] if slot_numel else []
        ledger.add(DEVICE, "staging", sum(s.numel() * s.element_size() for s in self.slots))
        recompute_numel = plan.materialize_slot_numel
        self.recompute = torch.empty(recompute_numel, dtype=dtype, device=device) if recompute_numel else None
        ledger.add(DEVICE, "adapter buffer", recompute_numel * plan.element_size)
        self.pinned = []
        if self.cuda and plan.pinned_staging_bytes:
            pinned_numel = plan.pinned_staging_bytes // plan.element_size // STAGING_SLOTS
            self.pinned = [torch.empty(pinned_numel, dtype=dtype, pin_memory=True) for _ in range(STAGING_SLOTS)]
            ledger.add(HOST, "pinned staging", sum(p.numel() * p.element_size() for p in self.pinned))
        self.side_stream = torch.cuda.Stream(device) if self.cuda else None
        self.released = [None] * STAGING_SLOTS  # CUDA events: the merge that read slot k is done
        self.copied = [None] * STAGING_SLOTS  # CUDA events: the host->device copy out of pinned slot k is done
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-stage") if self.slots else None
        self.bytes_moved = 0

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    # ------------------------------------------------------------------ one block
    def _regions(self, block, k: int) -> dict:
        """Source -> its [block.numel] region of staging slot k, for the block's streamed inputs."""
        regions = {}
        for position, (source, _tier) in enumerate(self.plan.streamed(block.index)):
            start = position * block.numel
            regions[source] = self.slots[k][start : start + block.numel]
        return regions

    def _fill(self, block, k: int):
        """Worker thread: copy the block's streamed inputs into slot k; returns a CUDA event or None."""
        regions = self._regions(block, k)
        streamed = self.plan.streamed(block.index)
        if not self.cuda:
            for source, tier in streamed:
                if tier == HOST:
                    regions[source].copy_(self.stores[(HOST, source)].view(block))
                else:
                    self.disk[source].read_block(block, regions[source])
            return None
        disk_sources = [s for s, t in streamed if t == DISK]
        if disk_sources:
            if self.copied[k] is not None:
                self.copied[k].synchronize()  # the previous copy out of this pinned slot has finished
            for position, source in enumerate(disk_sources):
                pinned = self.pinned[k][position * block.numel : (position + 1) * block.numel]
                self.disk[source].read_block(block, pinned)
        with torch.cuda.device(self.device), torch.cuda.stream(self.side_stream):
            if self.released[k] is not None:
                self.side_stream.wait_event(self.released[k])
            disk_position = 0
            for source, tier in streamed:
                if tier == HOST:
                    src = self.stores[(HOST, source)].view(block)
                else:
                    src = self.pinned[k][disk_position * block.numel : (disk_position + 1) * block.numel]
                    disk_position += 1
                regions[source].copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side_stream)
        self.copied[k] = event
        return event

    def _data(self, block, k: Optional[int]) -> BlockData:
        regions = self._regions(block, k) if k is not None else {}

        recomputed = self.plan.recomputed(block.index)

        def source_view(source):
            tier = self.plan.tier(block.index, source)
            if tier == DEVICE:
                return self.stores[(DEVICE, source)].view(block)
            if tier == FACTORS:
                start = recomputed.index(source) * block.numel
                return self.recompute[start : start + block.numel]
            return regions[source]

        base = source_view(BASE)
        tvs = [source_view(e) for e in range(self.plan.num_experts)]
        for e in range(self.plan.num_experts):
            if self.plan.tier(block.index, e) == DISK:
                tvs[e].sub_(base)  # staged expert weights -> task vector
            elif self.plan.tier(block.index, e) == FACTORS:
                self.adapters[e].block_task_vector_into(block, base, tvs[e])
        return BlockData(block.start, base, tvs)

    # ------------------------------------------------------------------ all blocks
    def walk(self, blocks: list) -> Iterator:
        """Yield (block, BlockData) in order; the next streamed block is filled while this one merges.

        The caller must be done with a block's data before asking for the next one.
        """
        streams = [bool(self.plan.streamed(b.index)) for b in blocks]
        following = [None] * len(blocks)  # the first streamed block after i
        upcoming = None
        for i in range(len(blocks) - 1, -1, -1):
            following[i] = upcoming
            if streams[i]:
                upcoming = i
        submitted, turn = {}, 0

        def ensure(j):
            nonlocal turn
            if j is not None and j not in submitted:
                k = turn % STAGING_SLOTS
                turn += 1
                submitted[j] = (k, self.executor.submit(self._fill, blocks[j], k))

        for i, block in enumerate(blocks):
            k = None
            if streams[i]:
                ensure(i)
                k, future = submitted.pop(i)
                event = future.result()
                if event is not None:
                    torch.cuda.current_stream(self.device).wait_event(event)
                self.bytes_moved += len(self.plan.streamed(block.index)) * block.numel * self.plan.element_size
            ensure(following[i])  # its slot is the other one: free once the block before this one merged
            yield block, self._data(block, k)
            if k is not None and self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.released[k] = event
