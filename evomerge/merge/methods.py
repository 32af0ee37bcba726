"""Merge math, written to give mergekit 0.1.5's results from cached per-tensor data.

mergekit recomputes everything from the input tensors for each merge. A search
merges the same models thousands of times with different coefficients, so the
parts that do not depend on the coefficients are split out and cached by the
core: magnitude orderings (as ranks), DELLA's normalised ranks, L1 norms, SLERP
angles. The remaining per-candidate arithmetic follows mergekit's operation
order (same dtypes, same reductions) so results match to float rounding.

Randomness (DARE, DELLA) uses `uniform < p` drawn from a generator seeded by
(candidate seed, tensor name, expert index): reproducible per candidate and
independent of the order tensors are merged in.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's eps
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
_SLERP_CHUNK_ELEMENTS = 1024 * 1024


# --------------------------------------------------------------------------- randomness
def mask_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit seed that depends only on the candidate, the tensor and the expert."""
    digest = hashlib.blake2b(f"{int(seed)}|{tensor_name}|{int(expert_index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mask_generator(seed: int, tensor_name: str, expert_index: int, device="cpu") -> torch.Generator:
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(mask_seed(seed, tensor_name, expert_index))
    return generator


def bernoulli_mask(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(probs) as `uniform < probs`, returned in probs' dtype (like torch.bernoulli).

    The uniforms are float32 with probs' shape, so the same generator always
    draws the same mask for the same tensor whatever the merge order.
    """
    uniform = torch.rand(probs.shape, generator=generator, dtype=torch.float32, device=probs.device)
    return (uniform < probs).to(probs.dtype)


def random_keep(shape, density: float, work_dtype: torch.dtype, generator: torch.Generator, device) -> torch.Tensor:
    """DARE's keep mask (bool) without materialising a tensor full of `density`.

    Equal to bernoulli_mask(full(shape, density, work_dtype)): the comparison
    uses density rounded to the work dtype, as mergekit's full_like does.
    """
    threshold = torch.tensor(density, dtype=work_dtype).item()
    uniform = torch.rand(tuple(shape), generator=generator, dtype=torch.float32, device=device)
    return uniform < threshold


# --------------------------------------------------------------------------- orderings
def sparsify_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """mergekit's dtype for random/DELLA sparsification (bernoulli lacks fp16 on CPU)."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def _ranks_from_order(order: torch.Tensor) -> torch.Tensor:
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    ranks = torch.empty(order.shape, dtype=dtype, device=order.device)
    ranks[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return ranks


def magnitude_ranks(task_vector: torch.Tensor) -> torch.Tensor:
    """Position of each element in mergekit.sparsify.magnitude's descending argsort."""
    w = task_vector.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    return _ranks_from_order(torch.argsort(w, descending=True))


def outlier_ranks(task_vector: torch.Tensor) -> torch.Tensor:
    """Position of each element in mergekit.sparsify.magnitude_outliers' ascending sort."""
    w = task_vector.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    return _ranks_from_order(torch.sort(w, descending=False).indices)


def della_rank_norm(task_vector: torch.Tensor) -> torch.Tensor:
    """DELLA's per-row rank in [0, 1] (work dtype, 2-D), as mergekit.sparsify.della_magprune."""
    work_dtype = sparsify_work_dtype(task_vector)
    tensor = task_vector.unsqueeze(0) if task_vector.dim() < 2 else task_vector
    sorted_indices = torch.argsort(tensor.abs(), dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    return ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)


# --------------------------------------------------------------------------- sparsification
def magnitude_keep(ranks: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, int(density*n)) largest-magnitude elements (flat bool mask)."""
    k = max(1, int(density * ranks.numel()))
    return ranks < k


def outlier_keep(ranks: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the gamma largest, then the smallest, to keep int(density*n)."""
    num = ranks.numel()
    target_n = int(density * num)
    n_top = int(gamma * num)
    n_bot = max(0, num - target_n - n_top)
    return (ranks >= n_bot) & (ranks < n_bot + target_n)


def della_probs(rank_norm: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    return (density - epsilon) + rank_norm * 2 * epsilon


def rescale_l1_(masked: torch.Tensor, before_scale: torch.Tensor) -> torch.Tensor:
    """Scale `masked` in place to the L1 norm of the unmasked tensor (mergekit's rescale).

    `before_scale` is the original tensor's |.|-sum, cached by the caller.
    """
    after_scale = masked.abs().sum()
    if before_scale < RESCALE_EPS or after_scale < RESCALE_EPS:
        return masked
    return masked.mul_(before_scale / after_scale)


# --------------------------------------------------------------------------- combination
def combine_task_vectors(
    base: torch.Tensor,
    source: torch.Tensor,
    deltas: torch.Tensor,
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """base + lambda * (weighted, optionally sign-elected and normalised) sum of deltas.

    `source` ([experts, *shape]: the task vectors, sparsified or not) times the
    weights goes into `deltas` (same shape, may be `source` itself), which is
    then overwritten. This is the tail of mergekit's
    GeneralizedTaskArithmeticMerge.merge_group after sparsification.
    """
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(len(weights), *([1] * (deltas.dim() - 1)))
    torch.mul(source, w, out=deltas)
    if consensus:
        # sign(delta) == majority sign (+1 if the sum is >= 0), zeros excluded;
        # a product with the +-1 majority is exact and cheaper than torch.where.
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        keep = (deltas * majority) > 0
        del majority
        divisor = (w * keep).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = deltas.mul_(keep).sum(dim=0)
        del keep
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=out)


def linear_combine(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
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
    for index in range(task_vectors.shape[0]):
        expert = torch.add(base, task_vectors[index], out=scratch)
        acc.addcmul_(expert, w[index])
    if normalize:
        acc.div_(w.sum())
    if acc is not out:
        out.copy_(acc)
    return out


# --------------------------------------------------------------------------- slerp
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


def slerp_coefficients(geometry: dict, t: float) -> tuple[float, float]:
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


# --------------------------------------------------------------------------- model stock
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


def flat_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1)


__all__ = [
    "mask_seed",
    "mask_generator",
    "bernoulli_mask",
    "random_keep",
    "magnitude_ranks",
    "outlier_ranks",
    "della_rank_norm",
    "magnitude_keep",
    "outlier_keep",
    "della_probs",
    "rescale_l1_",
    "combine_task_vectors",
    "linear_combine",
    "slerp_geometry",
    "slerp_coefficients",
    "slerp_apply",
    "model_stock",
]
