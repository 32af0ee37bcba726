"""RAM and RAM+ (tensor-local): add every expert's change where it alone made one, average where several did.

Reinforced Agent Merging (arXiv 2601.13572). An element of expert e's task vector counts as a
contribution when |tau_e| > `epsilon`. RAM adds, per element, the contributions of the experts
that made one, each divided by how many did (a lone contribution is kept whole, shared ones are
averaged). RAM+ (`ramplus_tl`) also scales each expert's lone contributions by
lambda_e = 1 + r * clamp(rho_e, 0, alpha), with rho_e the ratio of the expert's shared to lone
contributions within the tensor, so an expert whose changes are mostly shared is not drowned out.
As mergekit 0.1.5's `ram` and `ramplus_tl`, in the same dtypes, so the bits are mergekit's; the
merge runs over chunks of elements (every step is per element, and RAM+'s counts are exact integers),
so its temporaries stay small. RAM+'s lambda is float32, which makes mergekit's merged tensor float32
(the core writes the merge dtype: the export's `out_dtype`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Sequence

import torch

from evomerge.merge.methods.base import BlockData, MergeMethod, Param

RAM_CHUNK_ELEMENTS = 1 << 22  # elements per step: all is per element but RAM+'s per-expert counts (exact integers)


def contributions(task_vectors: Sequence[torch.Tensor], start: int, end: int, epsilon: float) -> tuple:
    """(mergekit's stacked flat task vectors, who contributes, how many per element) for elements start:end.

    The counts are small integers: summed as uint8 (int64 past 255 experts) they are mergekit's int64
    counts without an int64 copy of every mask.
    """
    flat = torch.stack([tv[start:end] for tv in task_vectors])
    contributes = flat.abs() > epsilon
    dtype = torch.uint8 if len(task_vectors) < 256 else torch.int64
    return flat, contributes, contributes.sum(dim=0, keepdim=True, dtype=dtype)


def lone_scales(task_vectors: Sequence[torch.Tensor], r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """RAM+'s lambda_e = 1 + r * clamp(shared_e / lone_e, 0, alpha), counted over the whole tensor (float32)."""
    numel, chunk = task_vectors[0].numel(), RAM_CHUNK_ELEMENTS
    shared = torch.zeros(len(task_vectors), dtype=torch.int64, device=task_vectors[0].device)
    lone = torch.zeros_like(shared)
    for start in range(0, numel, chunk):
        _, contributes, counts = contributions(task_vectors, start, min(numel, start + chunk), epsilon)
        is_shared, is_lone = counts > 1, counts == 1
        for e, row in enumerate(contributes):  # one expert at a time: int64 sums of one row
            shared[e] += (row & is_shared[0]).sum()
            lone[e] += (row & is_lone[0]).sum()
    rho = shared / lone.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def merged_task_vector(task_vectors: Sequence[torch.Tensor], start: int, end: int, epsilon: float,
                       scales: Optional[torch.Tensor]) -> torch.Tensor:
    """RAM's merged task vector of elements start:end, [1, end - start] (float32 with RAM+'s `scales`).

    mergekit's operations, some in place or row by row (the same kernels per element: the same bits)
    so fewer full-size copies live at once.
    """
    kept, contributes, counts = contributions(task_vectors, start, end, epsilon)
    shared, lone, divisor = counts > 1, counts == 1, counts.clamp(min=1)
    del counts
    kept.mul_(contributes)
    del contributes
    shared_part = (kept * shared).div_(divisor)
    lone_part = kept * lone
    del kept
    if scales is None:
        return lone_part.add_(shared_part).sum(dim=0, keepdim=True)
    scaled = torch.empty(lone_part.shape, dtype=torch.promote_types(lone_part.dtype, scales.dtype),
                         device=lone_part.device)
    for e in range(len(scaled)):  # one row at a time is converted to float32
        torch.mul(lone_part[e], scales[e : e + 1], out=scaled[e])  # [1], not 0-dim: promotes as mergekit's
        scaled[e].add_(shared_part[e])
    return scaled.sum(dim=0, keepdim=True)


def ram_merge(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], epsilon: float, out: torch.Tensor,
              scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """base + RAM's merged task vector (RAM+ with the lone contributions' `scales`), flat, into `out`."""
    numel, chunk = base.numel(), RAM_CHUNK_ELEMENTS
    for start in range(0, numel, chunk):
        end = min(numel, start + chunk)
        merged = merged_task_vector(task_vectors, start, end, epsilon, scales).reshape(-1)
        out[start:end].copy_(base[start:end] + merged)
    return out


class _RamFamily(MergeMethod):
    reference = "https://arxiv.org/abs/2601.13572"

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        # per element of a step: the kept task vectors, the lone part (and RAM+'s float32 one), the shared
        # part, the masks and counts
        return min(unit_numel, RAM_CHUNK_ELEMENTS) * (num_experts * (3 * size + 4) + 8)

    @abstractmethod
    def scales(self, task_vectors: list, params: dict) -> Optional[torch.Tensor]:
        """Per-expert factors of the lone contributions (None: RAM's 1)."""

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        task_vectors = [block.tv_of(slot, e) for e in range(ctx.num_experts)]
        ram_merge(block.base_of(slot), task_vectors, params["epsilon"], out, self.scales(task_vectors, params))


class Ram(_RamFamily):
    name = "ram"
    params = (Param("epsilon", 1e-5, low=0.0, search=(0.0, 0.001)),)

    def scales(self, task_vectors, params):
        return None


class RamPlus(_RamFamily):
    name = "ramplus_tl"
    params = (
        Param("r", 0.1, low=0.0, search=(0.0, 1.0)),
        Param("alpha", 0.2, low=0.0, search=(0.0, 1.0)),
        Param("epsilon", 1e-5, low=0.0, low_open=True),  # 0 would divide 0 lone contributions by 0
    )

    def scales(self, task_vectors, params):
        return lone_scales(task_vectors, params["r"], params["alpha"], params["epsilon"])
