"""The experts' own weights, bit for bit, for methods that merge weights rather than task vectors.

The core holds each expert as a task vector (expert - base, in the merge
dtype). Rebuilding the expert as base + task vector gives its checkpoint's
values back only where the subtraction was exact: where expert and base are
within a factor of two of each other it always is, elsewhere (values far
apart, or of opposite signs) it may round, which in bf16 happens (10 of
95,904 elements on the bf16 test family; about 13% for unrelated values).
mergekit merges the checkpoint's values, so methods that read an expert's
weights (Karcher, NearSwap, Arcee Fusion, the SLERPs without a base) take
them from here:

* once per tensor and expert, the checkpoint's values are compared bit for
  bit with the rebuild; where they differ, the positions and true values are
  kept as side data (`Fixes`: 4 bytes + one element each, where the plan
  left device room), nothing where the rebuild is exact (float32, in practice);
* per candidate, the rebuild plus those fixes; where there was no room for
  the fixes, the tensor is read from the checkpoint again instead.

Every tier and budget thus gives the same bits: the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from evomerge.merge.methods.base import BlockData

KIND = "expert_weights"  # side-data kind: fixes that make base + task vector the expert's weights
RECHECKPOINT = "read the checkpoint"  # side-data marker: no room for the fixes, read the weights per candidate

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Fixes:
    """Where base + task vector is not the expert's checkpoint value, and that value."""

    positions: Optional[torch.Tensor]  # None: the rebuild is exact everywhere
    values: Optional[torch.Tensor]

    @property
    def nbytes(self) -> int:
        if self.positions is None:
            return 0
        return self.positions.numel() * self.positions.element_size() + self.values.numel() * self.values.element_size()


def find_fixes(rebuilt: torch.Tensor, weights: torch.Tensor) -> Fixes:
    """The elements whose bits differ between the rebuild and the checkpoint (signed zeros and NaNs included)."""
    bits = _BITS[rebuilt.element_size()]
    wrong = rebuilt.view(bits) != weights.view(bits)
    positions = torch.nonzero(wrong).reshape(-1)
    if not positions.numel():
        return Fixes(None, None)
    if rebuilt.numel() < 2**31:
        positions = positions.to(torch.int32)
    return Fixes(positions, weights[positions])


def prepare_expert_weights(slot, block: BlockData, ctx, experts=None) -> None:
    """The fixes of one tensor for every expert in `experts` (all by default), unless already made."""
    for e in range(ctx.num_experts) if experts is None else experts:
        key = (KIND, slot.index, e)
        if ctx.side.get(key) is not None:
            continue
        rebuilt = torch.add(block.base_of(slot), block.tv_of(slot, e))
        fixes = find_fixes(rebuilt, ctx.read_expert(slot, e))
        if fixes.positions is None or ctx.side.reserve(fixes.nbytes):
            ctx.side.put(key, fixes)
        else:
            ctx.side.put(key, RECHECKPOINT)


def expert_weights(slot, block: BlockData, ctx, expert: int, out: torch.Tensor) -> torch.Tensor:
    """Write expert `expert`'s checkpoint values of one tensor into `out` (flat, the merge dtype)."""
    key = (KIND, slot.index, expert)
    fixes = ctx.side.get(key)
    if fixes is None:
        prepare_expert_weights(slot, block, ctx, [expert])
        fixes = ctx.side.get(key)
    if fixes is RECHECKPOINT:
        return out.copy_(ctx.read_expert(slot, expert))
    torch.add(block.base_of(slot), block.tv_of(slot, expert), out=out)
    if fixes.positions is not None:
        out[fixes.positions] = fixes.values
    return out
