"""Random drops (DARE, DELLA) that are reproducible per candidate, tensor and expert.

Masks are `uniform < p` with float32 uniforms drawn from a generator seeded by
blake2b(candidate seed, tensor name, expert index): the same candidate gives
the same masks whatever the merge order, the blocks' tiers or the batching;
another seed gives other masks. mergekit draws from torch's global RNG, so its
DARE output matches ours only when given our masks (as the tests do).
"""

from __future__ import annotations

import hashlib

import torch


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


def sparsify_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """mergekit's dtype for random/DELLA sparsification (bernoulli lacks fp16 on CPU)."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32
