"""NearSwap: take the expert's value where it is near the base's, the base's where they are far apart.

Per element, with d = |base - expert|: weight = clamp(t / max(d, 1e-6), 0, 1) and the merge is
weight * expert + (1 - weight) * base. So elements that moved less than `t` (in weight units) are
the expert's, those that moved more are pulled back towards the base in proportion. t = 0 gives
the base. Exactly one expert, whose own weights are read exactly (`evomerge.merge.methods.experts`).
As mergekit 0.1.5's `nearswap`, in the same dtype, so the bits are mergekit's.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param
from evomerge.merge.methods.experts import KIND, expert_weights, prepare_expert_weights

DISTANCE_MIN = 1e-6  # mergekit: clamp of |base - expert| before dividing


def nearswap(base: torch.Tensor, expert: torch.Tensor, t: float) -> torch.Tensor:
    weight = (t / torch.abs(base - expert).clamp(min=DISTANCE_MIN)).clamp(min=0, max=1)
    return weight * expert + (1 - weight) * base


class NearSwap(MergeMethod):
    name = "nearswap"
    min_experts = max_experts = 1
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    side_kinds = (KIND,)  # the experts' weights, exact
    params = (Param("t", REQUIRED, low=0.0, search=(0.0, 0.001)),)

    def endpoint(self, expert, num_experts):
        return {"t": 0.0} if expert is None else None  # any t above the largest |delta| gives the expert

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        return unit_numel * 6 * size

    def prepare(self, slot, block: BlockData, ctx):
        prepare_expert_weights(slot, block, ctx)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        expert = expert_weights(slot, block, ctx, 0, ctx.work.row(slot.numel))
        out.copy_(nearswap(block.base_of(slot), expert, params["t"]))
