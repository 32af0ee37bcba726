"""Karcher mean: the experts' average direction on the unit sphere (iterated log / exp maps), times their mean norm.

Per tensor, each expert's weights are split into a norm and a unit direction. Starting from the
normalised Euclidean mean of the directions, each step moves the mean along the equally weighted
sum of the log maps (theta / sin(theta) * (u - cos(theta) m)) by the exp map, until that step is
shorter than `tol` or `max_iter` steps were taken (0 steps: the normalised average direction). The
result is that direction times the mean of the norms. The experts' own weights are merged (the base
is no input), read exactly (`evomerge.merge.methods.experts`). As mergekit 0.1.5's `karcher`, step
for step in the same dtypes, so the bits are mergekit's.
"""

from __future__ import annotations

from typing import Sequence

import torch

from evomerge.merge.methods.base import BlockData, MergeMethod, Param
from evomerge.merge.methods.experts import KIND, expert_weights, prepare_expert_weights


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's `karcher_merge_tensors`: the weighted Karcher mean of `tensors` on the unit sphere, rescaled."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))

    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    directions = [units[i] for i in valid]

    mean = torch.zeros_like(directions[0])
    for weight, unit in zip(weights, directions):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = directions[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, directions):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


class Karcher(MergeMethod):
    name = "karcher"
    base_is_input = False
    min_experts = 2
    reference = "https://arxiv.org/abs/2603.04972"
    side_kinds = (KIND,)  # the experts' weights, exact
    params = (
        Param("max_iter", 10, integer=True, low=0, search=(0, 10)),
        Param("tol", 1e-5, low=0.0),
    )

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        # the experts' weights and directions, the mean, the tangent and a step's temporaries (float32 norms)
        return unit_numel * (2 * num_experts * size + 6 * size + 8)

    def prepare(self, slot, block: BlockData, ctx):
        prepare_expert_weights(slot, block, ctx)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        rows = ctx.work.rows(slot.numel)
        experts = [expert_weights(slot, block, ctx, e, rows[e]).view(slot.shape) for e in range(ctx.num_experts)]
        alphas = [1.0 / len(experts)] * len(experts)
        merged = karcher_mean(experts, alphas, int(params["max_iter"]), params["tol"])
        out.copy_(merged.reshape(-1))
