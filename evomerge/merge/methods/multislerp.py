"""Multi-SLERP: a weighted spherical interpolation of any number of experts (or of their task vectors).

Per tensor, the inputs are projected onto the unit sphere, their weighted mean direction is
normalised, each direction is mapped to the tangent space there, the weighted tangent vectors are
summed and mapped back by the exponential map, and the result is scaled by the weighted mean of the
norms. With `task_vectors` (mergekit: `base_model` set) the inputs are the task vectors and the base
is added back; without, the experts' own weights (read exactly: `evomerge.merge.methods.experts`).
As mergekit 0.1.5's `multislerp`, in the same dtype and shapes, so the bits are mergekit's.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param
from evomerge.merge.methods.experts import expert_weights


def multislerp(stacked: torch.Tensor, weights: list, *, normalize_weights: bool, eps: float, name: str) -> torch.Tensor:
    """mergekit's multislerp of `stacked` ([inputs, *shape]: task vectors or weights), before the base is added back."""
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:  # mergekit falls back to a linear interpolation
            return (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        if not bool((norms > 0).any()):
            raise EvomergeError(
                f"multislerp of tensor {name}: every expert's task vector is zero there (no expert changed it), "
                "which has no direction to interpolate (mergekit 0.1.5 fails on it too); merge the experts' "
                "weights (task_vectors: false) or use another method"
            )
        raise EvomergeError(
            f"multislerp of tensor {name}: the weighted sum of the unit inputs is zero (antipodal inputs "
            "whose weights cancel; mergekit 0.1.5 fails on it too); choose other weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])


class MultiSlerp(MergeMethod):
    name = "multislerp"
    min_experts = 2
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    keeps_unchanged_base = False  # task vectors that are all zero have no direction (an error, as in mergekit)
    params = (
        Param("weight", REQUIRED, per_expert=True, search=(0.0, 1.0)),
        Param("normalize_weights", True, boolean=True),
        Param("eps", 1e-8, low=0.0, low_open=True),
        Param("task_vectors", True, boolean=True, recipe_wide=True, mergekit=False),
    )

    def uses_base(self, params):
        return params["task_vectors"]

    def check_resolved(self, resolved, where):
        if resolved["normalize_weights"] and sum(resolved["weight"]) == 0:
            raise EvomergeError(f"multislerp with normalize_weights needs weights that do not sum to 0 ({where})")

    def endpoint(self, expert, num_experts):
        if expert is None:
            return None
        return {"weight": [1.0 if e == expert else 0.0 for e in range(num_experts)]}

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        # the stacked inputs, their directions and tangents, their weighted products, the result
        return unit_numel * (4 * num_experts * size + 4 * size)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        stacked = torch.empty((ctx.num_experts, slot.numel), dtype=block.base.dtype, device=block.base.device)
        for e in range(ctx.num_experts):
            if params["task_vectors"]:
                stacked[e].copy_(block.tv_of(slot, e))  # mergekit's expert - base, in the same dtype
            else:
                expert_weights(slot, block, ctx, e, stacked[e])
        merged = multislerp(stacked.view(ctx.num_experts, *slot.shape), params["weight"],
                            normalize_weights=params["normalize_weights"], eps=params["eps"], name=slot.name)
        if params["task_vectors"]:
            merged = merged + block.base_of(slot).view(slot.shape)
        out.copy_(merged.reshape(-1))
