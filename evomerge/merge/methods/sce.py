"""SCE: select the elements where the experts disagree most, weight each expert by its energy, elect signs.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990). Per tensor, with task
vectors tau_e: keep the fraction `select_topk` of elements with the largest variance across experts
(mergekit counts the fraction of the elements whose variance is not 0), weight each expert by its
mean squared task vector over the tensor (normalised to sum 1), keep each element only in the
experts whose sign agrees with the TIES majority (sign of the sum), and add the weighted mean of
what is kept to the base. As mergekit 0.1.5's `sce` does, with the same operations in the same dtype
and shapes, so the bits are mergekit's (its top-k among equal variances included). The variance
depends on no parameter: it is computed once per tensor and kept where the plan has room.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import BlockData, MergeMethod, Param

WEIGHT_SUM_EPS = 1e-6  # mergekit: below this total energy every expert weighs 1 / n
DIVISOR_MIN = 1e-6  # mergekit: clamp of the kept weights' sum


def variance_magnitudes(task_vectors: torch.Tensor) -> tuple:
    """(|variance across experts| flat, how many are non-zero as a 0-dim tensor): what SCE's top-k ranks.

    No parameter enters it, so it is side data, kept where the plan has room.
    """
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    return variance.abs().view(-1), torch.count_nonzero(variance)


def sce_mask(magnitudes: torch.Tensor, nonzero: torch.Tensor, select_topk: float, shape) -> torch.Tensor:
    """mergekit's `sce_mask`: 1 where the variance is among the top `select_topk` of its non-zeros.

    k = int(nonzero * select_topk) with the count a tensor (a float32 product), as mergekit computes it.
    """
    if select_topk <= 0:
        return torch.zeros(shape, dtype=magnitudes.dtype, device=magnitudes.device)
    if select_topk >= 1:
        return torch.ones(shape, dtype=magnitudes.dtype, device=magnitudes.device)
    k = int(nonzero * select_topk)
    mask = torch.zeros(shape, dtype=magnitudes.dtype, device=magnitudes.device)
    if k == 0:
        return mask
    mask.view(-1)[torch.topk(magnitudes, k=k, largest=True).indices] = 1
    return mask


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each expert's mean squared task vector, normalised to sum 1 (uniform when all are ~0)."""
    energies = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energies).item()
    if abs(total) < WEIGHT_SUM_EPS:
        return torch.ones_like(energies) / energies.shape[0]
    return energies / total


def sce_merge(base: torch.Tensor, task_vectors: torch.Tensor, select_topk: float, variance=None) -> torch.Tensor:
    """base + SCE's merged task vector; `task_vectors` ([experts, *base.shape], a fresh stack) is overwritten.

    `variance`: `variance_magnitudes(task_vectors)` if already known. mergekit's operations, some in
    place (the same kernels, so the same bits) to hold fewer copies.
    """
    if select_topk < 1:
        magnitudes, nonzero = variance if variance is not None else variance_magnitudes(task_vectors)
        task_vectors.mul_(sce_mask(magnitudes, nonzero, select_topk, base.shape).unsqueeze(0))
        del magnitudes
    majority = (task_vectors.sum(dim=0) >= 0).to(task_vectors.dtype) * 2 - 1
    agree = task_vectors.sign() == majority
    del majority
    weights = sce_weights(task_vectors)
    while weights.dim() < task_vectors.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * agree
    del agree
    merged = task_vectors.mul_(kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=DIVISOR_MIN)


class Sce(MergeMethod):
    name = "sce"
    reference = "https://arxiv.org/abs/2408.07990"
    side_kinds = ("sce_variance",)
    params = (
        Param("select_topk", 1.0, low=0.0, high=1.0, low_open=True, search=(0.1, 1.0)),
        Param("int8_mask", False, boolean=True),  # mergekit's mask dtype: the same bits either way
    )

    def cache_bytes_per_element(self, num_experts, dtype):
        return torch.empty((), dtype=dtype).element_size()  # |variance|

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        n = num_experts
        # the stacked task vectors and, at the widest step, either the variance's top-k (torch's
        # topk holds up to ~2 elements + 22 bytes per input element), or the signs / the kept weights
        # with the agreement mask and a float32 mean
        top_k = n * size + size + (2 * size + 22)
        election = 2 * n * size + 5 * n + 3 * size
        return unit_numel * (max(top_k, election) + 4)

    @staticmethod
    def _stack(slot, block: BlockData, num_experts: int) -> torch.Tensor:
        return torch.stack([block.tv_of(slot, e).view(slot.shape) for e in range(num_experts)])

    def prepare(self, slot, block: BlockData, ctx):
        key = ("sce_variance", slot.index)
        if ctx.side.get(key) is None:
            magnitudes, nonzero = variance_magnitudes(self._stack(slot, block, ctx.num_experts))
            kept = ctx.side.reserve(magnitudes.numel() * magnitudes.element_size())
            ctx.side.put(key, (magnitudes if kept else None, nonzero))  # None: recomputed per candidate

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        task_vectors = self._stack(slot, block, ctx.num_experts)
        variance = None
        if params["select_topk"] < 1:
            cached = ctx.side.get(("sce_variance", slot.index))
            if cached is not None and cached[0] is not None:
                variance = cached
        merged = sce_merge(block.base_of(slot).view(slot.shape), task_vectors, params["select_topk"], variance)
        out.copy_(merged.reshape(-1))
