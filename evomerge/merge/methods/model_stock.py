"""Model Stock: interpolate between the base and the experts' average by their task vectors' angle."""

from __future__ import annotations

from typing import Sequence

import torch

from evomerge.merge.methods.base import BlockData, MergeMethod, Param


def model_stock(w_0: torch.Tensor, experts: Sequence[torch.Tensor], *, filter_wise: bool, out: torch.Tensor):
    """mergekit's model_stock for one tensor (base + >= 2 experts)."""
    out_shape = w_0.shape
    ws = list(experts)
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for idx, offset_a in enumerate(offsets):
        for offset_b in offsets[idx + 1 :]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)
    average = sum(ws) / count
    out.copy_((t * average + (1 - t) * w_0).reshape(out_shape))
    return out


class ModelStock(MergeMethod):
    name = "model_stock"
    min_experts = 2
    reference = "https://arxiv.org/abs/2403.19522"
    params = (Param("filter_wise", False, boolean=True),)

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        return unit_numel * size * (3 * num_experts + 4)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        base = block.base_of(slot)
        rows = ctx.work.rows(slot.numel)
        experts = [
            torch.add(base, block.tv_of(slot, e), out=rows[e]).view(slot.shape) for e in range(ctx.num_experts)
        ]
        model_stock(base.view(slot.shape), experts, filter_wise=params["filter_wise"], out=out.view(slot.shape))
