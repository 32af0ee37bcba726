"""RegMean: each linear layer solved in closed form from the Gram matrices of its inputs on each expert's data.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023). For a linear
weight ``W`` (out x in) and each expert's input Gram matrix ``G_e = X_e^T X_e`` (in x in, from its own
task's prompts: `evomerge.merge.statistics.Gram`), the merge that best reproduces every expert's outputs
on its own inputs is ``W = (sum_e w_e W_e G_e) (sum_e w_e G_e)^-1``. RegMean's off-diagonal scale
``alpha`` shrinks each Gram towards its diagonal (``alpha G + (1 - alpha) diag(G)``: alpha 0 is a
weighted average scaled per input feature, 1 the plain closed form). Tensors that are not a linear
layer's weight (embeddings, norms, a head tied to the embeddings) are averaged with the same weights.

Computed as ``W_base + (sum_e w_e tau_e G_e) (sum_e w_e G_e)^-1`` on the task vectors ``tau_e``
(the same matrix, without the large cancellation), in float64 for the solve. A tiny ridge
(1e-9 of the mean diagonal) keeps the solve defined when the prompts' tokens do not span the inputs.
mergekit has no RegMean: an export writes no mergekit.yaml for it.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import BlockData, MergeMethod, Param

RIDGE = 1e-9


def regmean_delta(task_vectors: list[torch.Tensor], grams: list[torch.Tensor], weights: list[float],
                  alpha: float) -> torch.Tensor:
    """``(sum_e w_e tau_e G_e') (sum_e w_e G_e')^-1`` with ``G' = alpha G + (1 - alpha) diag(G)`` (float64)."""
    total = None
    mixed = None
    for tau, gram, weight in zip(task_vectors, grams, weights):
        if weight == 0:
            continue
        g = gram.to(torch.float64)
        g = g * alpha + torch.diag_embed(torch.diagonal(g)) * (1.0 - alpha)
        total = g * weight if total is None else total.add_(g, alpha=weight)
        term = (tau.to(torch.float64) @ g) * weight
        mixed = term if mixed is None else mixed.add_(term)
    ridge = RIDGE * float(torch.diagonal(total).mean().clamp_min(1e-30))
    total.diagonal().add_(ridge)
    return torch.linalg.solve(total, mixed.T).T  # total is symmetric: (mixed total^-1)^T = total^-1 mixed^T


class RegMean(MergeMethod):
    name = "regmean"
    reference = "https://arxiv.org/abs/2212.09849"
    statistics = ("gram",)
    params = (
        Param("weight", 1.0, per_expert=True, low=0.0, search=(0.0, 1.0)),
        Param("alpha", 0.9, low=0.0, high=1.0, search=(0.0, 1.0)),
    )

    @property
    def mergekit_name(self):
        return None

    def check_resolved(self, resolved, where):
        if sum(resolved["weight"]) <= 0:
            raise EvomergeError(f"regmean needs expert weights that sum above 0 ({where})")

    def endpoint(self, expert, num_experts):
        if expert is None:
            return None  # the base is no expert: RegMean has no point that gives it back
        return {"weight": [1.0 if e == expert else 0.0 for e in range(num_experts)]}

    def statistics_bytes(self, layout, num_experts):
        widest = max((slot.shape[1] for slot in layout.slots if len(slot.shape) == 2), default=0)
        return widest * widest * 8 * (num_experts + 2)  # float64 Grams of one tensor, their sum, the solve

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        return unit_numel * 8 * 3

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        weights = [float(w) for w in params["weight"]]
        for slot in unit.slots:
            base = block.base_of(slot)
            target = out[slot.offset - unit.start: slot.end - unit.start]
            taus = [block.tv_of(slot, e) for e in range(ctx.num_experts)]
            grams = ([ctx.statistics.get("gram", slot.name, e) for e in range(ctx.num_experts)]
                     if len(slot.shape) == 2 else [None])
            if any(g is None for g in grams):  # not a linear layer's weight: the weighted average
                mixed = sum(tau.to(torch.float64) * w for tau, w in zip(taus, weights)) / sum(weights)
                target.copy_(base.to(torch.float64) + mixed)
                continue
            shaped = [tau.view(slot.shape) for tau in taus]
            grams = [g.to(ctx.device) for g in grams]
            delta = regmean_delta(shaped, grams, weights, float(params["alpha"]))
            target.copy_((base.view(slot.shape).to(torch.float64) + delta).reshape(-1))
