"""Arcee Fusion: keep the expert's change only where it matters most, by a data-free importance score.

Per tensor, with the expert's weights x and the base's b (rows along the last axis): importance =
|x - b| * KL(softmax(x) || softmax(b)) (the KL of each row, broadcast over it; softmaxes + 1e-8),
and the expert's change is kept where the importance reaches median + 1.5 IQR of all importances
(quartiles read off the sorted scores at index floor(q (n - 1))), elsewhere the base stays. Exactly
one expert, whose weights are read exactly (`evomerge.merge.methods.experts`). No parameters.

As mergekit 0.1.5's `arcee_fusion`, in the same dtypes. mergekit estimates the quartiles of a
tensor over 1M elements from 1M indices drawn with replacement from torch's global generator
(so two mergekit runs differ there); evomerge draws them from a generator seeded by (candidate seed,
tensor name), so a merge is reproducible, and equals mergekit's when mergekit is given the same
draw (as the tests do). mergekit's mask is float32, which makes the merged tensor float32; the core
writes it in the merge dtype (the export's `out_dtype`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.merge.methods.base import BlockData, MergeMethod
from evomerge.merge.methods.experts import KIND, expert_weights, prepare_expert_weights
from evomerge.merge.methods.randomness import mask_generator

QUANTILE_SAMPLE = 1_000_000  # mergekit: larger tensors' quartiles come from this many sampled scores
SOFTMAX_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|expert - base| times the KL divergence of the rows' softmaxes (mergekit's `_compute_importance`)."""
    diff = (expert - base).abs()
    p = F.softmax(expert, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Q1, median, Q3 as mergekit's `approximate_quantiles` reads them (sampled above 1M elements)."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered, _ = torch.sort(flat)
    at = (torch.tensor(QUARTILES).to(ordered.device) * (ordered.numel() - 1)).long()
    return ordered[at]


def fusion_mask(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """1.0 (float32) where the importance reaches median + 1.5 IQR."""
    q1, median, q3 = quartiles(scores, generator)
    return (scores >= median + 1.5 * (q3 - q1)).float()


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    min_experts = max_experts = 1
    reference = "https://arcee.ai"
    side_kinds = (KIND,)  # the experts' weights, exact
    params = ()

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        # the expert's weights, the difference, two softmaxes, the scores and their sort, the float32 mask
        return unit_numel * (8 * size + 8 + 4 * 2)

    def prepare(self, slot, block: BlockData, ctx):
        prepare_expert_weights(slot, block, ctx)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        base = block.base_of(slot).view(slot.shape)
        expert = expert_weights(slot, block, ctx, 0, ctx.work.row(slot.numel)).view(slot.shape)
        generator = mask_generator(seed, slot.name, 0, base.device)
        mask = fusion_mask(importance(expert, base), generator)
        out.copy_((base + (expert - base) * mask).reshape(-1))
