"""Linear: a weighted average of the experts themselves (the base is not an input)."""

from __future__ import annotations

from typing import Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param


def linear_combine(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """mergekit's linear merge of the experts (base + task vector), accumulated in float32."""
    acc_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=acc_dtype, device=base.device)
    acc = out if out.dtype == acc_dtype else torch.zeros(base.shape, dtype=acc_dtype, device=base.device)
    acc.zero_()
    for index, task_vector in enumerate(task_vectors):
        expert = torch.add(base, task_vector, out=scratch)
        acc.addcmul_(expert, w[index])
    if normalize:
        acc.div_(w.sum())
    if acc is not out:
        out.copy_(acc)
    return out


class Linear(MergeMethod):
    name = "linear"
    keeps_unchanged_base = False  # normalize: false scales the weights by their sum
    base_is_input = False
    reference = "https://arxiv.org/abs/2203.05482"
    params = (
        Param("weight", REQUIRED, per_expert=True, search=(0.0, 1.0)),
        Param("normalize", True, boolean=True),
    )

    def check_resolved(self, resolved, where):
        if resolved["normalize"] and sum(resolved["weight"]) == 0:
            raise EvomergeError(f"linear merge with normalize needs weights that do not sum to 0 ({where})")

    def endpoint(self, expert, num_experts):
        if expert is None:
            return None  # the base is not an input of a linear merge
        return {"weight": [1.0 if e == expert else 0.0 for e in range(num_experts)]}

    def elementwise(self, params):
        return True

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        return unit_numel * (torch.empty((), dtype=dtype).element_size() + 8)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        n = unit.end - unit.start
        linear_combine(
            block.base_range(unit.start, unit.end),
            [block.tv_range(e, unit.start, unit.end) for e in range(ctx.num_experts)],
            params["weight"],
            normalize=params["normalize"],
            out=out,
            scratch=ctx.work.row(n),
        )
