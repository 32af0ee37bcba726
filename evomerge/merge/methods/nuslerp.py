"""NuSLERP: spherical interpolation of two experts (or of their task vectors), t from their two weights.

t = w_1 / (w_0 + w_1) (0.5 when the weights sum to ~0). With `nuslerp_flatten` each tensor is one
vector; otherwise every row (`nuslerp_row_wise`: every column) is interpolated on its own. With
`task_vectors` (mergekit: `base_model` set) the task vectors are interpolated and the base added
back; without, the experts' own weights (read exactly: `evomerge.merge.methods.experts`).
Nearly colinear inputs are interpolated linearly. As mergekit 0.1.5's `nuslerp`, in the same dtype
and layout, so the bits are mergekit's.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param
from evomerge.merge.methods.experts import expert_weights

WEIGHT_SUM_EPS = 1e-6  # mergekit: weights summing to less than this give t = 0.5
COLINEAR_EPS = 1e-8  # mergekit: 1 - cos^2 <= eps^2 counts as colinear
NORM_MIN = 1e-7  # mergekit: clamp of the norms the inputs are divided by


def nuslerp_t(weights: list) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else weights[1] / total


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """mergekit's `nuslerp(t, v0, v1, dim=0 if row_wise else -1, flatten=flatten)`."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_MIN)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_MIN)
    cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(out_shape)


class NuSlerp(MergeMethod):
    name = "nuslerp"
    min_experts = max_experts = 2
    params = (
        Param("weight", REQUIRED, per_expert=True, search=(0.0, 1.0)),
        Param("nuslerp_row_wise", False, boolean=True),
        Param("nuslerp_flatten", True, boolean=True),
        Param("task_vectors", True, boolean=True, recipe_wide=True, mergekit=False),
    )

    def uses_base(self, params):
        return params["task_vectors"]

    def endpoint(self, expert, num_experts):
        if expert is None:
            return None
        return {"weight": [1.0 if e == expert else 0.0 for e in range(num_experts)]}

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        # the two inputs (weights read exactly), their directions, the products, both branches, the result
        return unit_numel * 10 * size

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        if params["task_vectors"]:
            v0, v1 = (block.tv_of(slot, e).view(slot.shape) for e in range(2))
        else:
            rows = ctx.work.rows(slot.numel)
            v0, v1 = (expert_weights(slot, block, ctx, e, rows[e]).view(slot.shape) for e in range(2))
        merged = nuslerp(nuslerp_t(params["weight"]), v0, v1, row_wise=params["nuslerp_row_wise"],
                         flatten=params["nuslerp_flatten"])
        if params["task_vectors"]:
            merged = block.base_of(slot).view(slot.shape) + merged
        out.copy_(merged.reshape(-1))
