"""SLERP: spherical interpolation between the base (t = 0) and one expert (t = 1), per tensor."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
_SLERP_CHUNK_ELEMENTS = 1024 * 1024


def slerp_geometry(v0: torch.Tensor, v1: torch.Tensor) -> dict:
    """The coefficient-independent part of mergekit's slerp for one tensor: angle and norms."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    if not a.shape[1]:
        return {"empty": True}
    chunk = _SLERP_CHUNK_ELEMENTS
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], chunk):
        norm_a_parts.append(torch.linalg.vector_norm(a[:, start : start + chunk].to(dtype), dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(b[:, start : start + chunk].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], chunk):
        x = a[:, start : start + chunk].to(dtype) / norm_a
        y = b[:, start : start + chunk].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    return {"empty": False, "linear": linear, "theta": theta, "sin_theta": torch.sin(theta), "dtype": dtype}


def slerp_coefficients(geometry: dict, t: float) -> tuple:
    dtype = geometry.get("dtype", torch.float32)
    if geometry["empty"]:
        return 1 - t, t
    tt = torch.tensor([[t]], dtype=dtype, device=geometry["theta"].device)
    linear, theta, sin_theta = geometry["linear"], geometry["theta"], geometry["sin_theta"]
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def slerp_apply(v0: torch.Tensor, v1: torch.Tensor, coef_a, coef_b, out: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    if isinstance(coef_a, torch.Tensor):
        coef_a = coef_a.reshape(())
        coef_b = coef_b.reshape(())
    out.copy_(coef_a * v0.to(dtype) + coef_b * v1.to(dtype))
    return out


class Slerp(MergeMethod):
    name = "slerp"
    min_experts = max_experts = 1
    reference = "https://en.wikipedia.org/wiki/Slerp"
    side_kinds = ("slerp",)
    params = (Param("t", REQUIRED, low=0.0, high=1.0, search=(0.0, 1.0)),)

    def endpoint(self, expert, num_experts):
        return {"t": 0.0 if expert is None else 1.0}

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        return unit_numel * (torch.empty((), dtype=dtype).element_size() + 3 * 4)

    def prepare(self, slot, block: BlockData, ctx):
        key = ("slerp", slot.index)
        if ctx.side.get(key) is None:
            base = block.base_of(slot)
            expert = torch.add(base, block.tv_of(slot, 0), out=ctx.work.row(slot.numel))
            ctx.side.put(key, slerp_geometry(base, expert))

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        (slot,) = unit.slots
        base = block.base_of(slot)
        expert = torch.add(base, block.tv_of(slot, 0), out=ctx.work.row(slot.numel))
        coef_a, coef_b = slerp_coefficients(ctx.side.get(("slerp", slot.index)), params["t"])
        slerp_apply(base, expert, coef_a, coef_b, out)
