"""Fisher merging: every parameter a weighted average of the experts', weighted by each one's Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022). With ``F_e`` each
expert's diagonal Fisher on its own task's prompts (`evomerge.merge.statistics.Fisher`) and ``w_e``
its weight, ``theta = sum_e w_e (F_e + m) theta_e / sum_e w_e (F_e + m)``: an expert counts where its
own task is sensitive to the parameter. ``min_fisher`` (``m``) keeps parameters no prompt reached
defined (there: the plain weighted average), as FusionBench's ``minimal_fisher_weight`` does.
Computed on task vectors (``theta_e = base + tau_e``) in float32. mergekit has no Fisher merging:
an export writes no mergekit.yaml for it.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import BlockData, MergeMethod, Param


def fisher_delta(task_vectors: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float],
                 min_fisher: float) -> torch.Tensor:
    """``sum_e w_e (F_e + m) tau_e / sum_e w_e (F_e + m)`` (float32)."""
    numerator = torch.zeros_like(task_vectors[0], dtype=torch.float32)
    denominator = torch.zeros_like(numerator)
    for tau, fisher, weight in zip(task_vectors, fishers, weights):
        importance = (fisher.to(torch.float32) + min_fisher) * weight
        numerator.addcmul_(importance, tau.to(torch.float32))
        denominator.add_(importance)
    return numerator.div_(denominator)


class FisherMerge(MergeMethod):
    name = "fisher"
    reference = "https://arxiv.org/abs/2111.09832"
    statistics = ("fisher",)
    params = (
        Param("weight", 1.0, per_expert=True, low=0.0, search=(0.0, 1.0)),
        Param("min_fisher", 1e-6, low=0.0, low_open=True),
    )

    @property
    def mergekit_name(self):
        return None

    def check_resolved(self, resolved, where):
        if sum(resolved["weight"]) <= 0:
            raise EvomergeError(f"fisher merging needs expert weights that sum above 0 ({where})")

    def endpoint(self, expert, num_experts):
        if expert is None:
            return None
        return {"weight": [1.0 if e == expert else 0.0 for e in range(num_experts)]}

    def statistics_bytes(self, layout, num_experts):
        return layout.largest_tensor * 4 * (num_experts + 2)

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        return unit_numel * 4 * 3

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        weights = [float(w) for w in params["weight"]]
        for slot in unit.slots:
            taus = [block.tv_of(slot, e) for e in range(ctx.num_experts)]
            fishers = []
            for e in range(ctx.num_experts):
                fisher = ctx.statistics.get("fisher", slot.name, e)
                if fisher is None:
                    raise EvomergeError(f"the fisher statistics of expert {e} have no tensor {slot.name}; "
                                        "collect them again for this model")
                fishers.append(fisher.reshape(-1).to(ctx.device))
            delta = fisher_delta(taus, fishers, weights, float(params["min_fisher"]))
            target = out[slot.offset - unit.start: slot.end - unit.start]
            target.copy_(block.base_of(slot).to(torch.float32) + delta)
