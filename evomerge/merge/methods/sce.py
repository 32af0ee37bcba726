"""SCE: select the elements where the experts disagree most, weight each expert by its energy, elect signs.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990). Per tensor, with task
vectors tau_e: keep the fraction `select_topk` of elements with the largest variance across experts
(mergekit counts the fraction of the elements whose variance is not 0), weight each expert by its
mean squared task vector over the tensor (normalised to sum 1), keep each element only in the
experts whose sign agrees with the TIES majority (sign of the sum), and add the weighted mean of
what is kept to the base. As mergekit 0.1.5's `sce` does, with the same operations in the same dtype
and shapes, so the bits are mergekit's (its top-k among equal variances included).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import BlockData, MergeMethod, Param

WEIGHT_SUM_EPS = 1e-6  # mergekit: below this total energy every expert weighs 1 / n
DIVISOR_MIN = 1e-6  # mergekit: clamp of the kept weights' sum


def sce_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """mergekit's `sce_mask`: 1 where the variance across experts is among the top `select_topk` of its non-zeros."""
    if select_topk <= 0:
        return torch.zeros_like(task_vectors[0])
    if select_topk >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    if k == 0:
        return torch.zeros_like(variance)
    magnitudes = variance.abs().view(-1)
    shape, dtype = variance.shape, variance.dtype
    del variance
    indices = torch.topk(magnitudes, k=k, largest=True).indices
    del magnitudes
    mask = torch.zeros(shape, dtype=dtype, device=indices.device)
    mask.view(-1)[indices] = 1
    return mask


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each expert's mean squared task vector, normalised to sum 1 (uniform when all are ~0)."""
    energies = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energies).item()
    if abs(total) < WEIGHT_SUM_EPS:
        return torch.ones_like(energies) / energies.shape[0]
    return energies / total


def sce_merge(base: torch.Tensor, task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """base + SCE's merged task vector; `task_vectors` ([experts, *base.shape], a fresh stack) is overwritten.

    mergekit's operations, some in place (the same kernels, so the same bits) to hold fewer copies.
    """
    if select_topk < 1:
        task_vectors.mul_(sce_mask(task_vectors, select_topk).unsqueeze(0))
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
    params = (
        Param("select_topk", 1.0, low=0.0, high=1.0, low_open=True, search=(0.1, 1.0)),
        Param("int8_mask", False, boolean=True),  # mergekit's mask dtype: the same bits either way
    )

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        n = num_experts
        # the stacked task vectors and, at the widest step, either the variance's top-k (torch's
        # topk holds up to ~2 elements + 22 bytes per input element), or the signs / the kept weights
        # with the agreement mask and a float32 mean
        top_k = n * size + size + (2 * size + 22)
        election = 2 * n * size + 5 * n + 3 * size
        return unit_numel * (max(top_k, election) + 4)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        task_vectors = torch.stack([block.tv_of(slot, e).view(slot.shape) for e in range(ctx.num_experts)])
        merged = sce_merge(block.base_of(slot).view(slot.shape), task_vectors, params["select_topk"])
        out.copy_(merged.reshape(-1))
