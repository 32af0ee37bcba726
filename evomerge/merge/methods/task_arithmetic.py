"""The task-arithmetic family: task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

mergekit's GeneralizedTaskArithmeticMerge: sparsify each expert's task vector
(`evomerge.merge.methods.sparsify`), weight it, optionally elect signs (TIES
consensus), sum, normalise, scale by lambda and add to the base.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param
from evomerge.merge.methods.sparsify import Della, Magnitude, Outliers, Random, Sparsifier

COMBINE_CHUNK_ELEMENTS = 1 << 22  # the sign election runs in chunks to bound its temporaries


def combine_task_vectors(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    deltas: torch.Tensor,
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
    chunk: int = COMBINE_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """base + lambda * (weighted, optionally sign-elected and normalised) sum of task vectors.

    `sources[e]` (expert e's task vector, sparsified or not; may be `deltas[e]`)
    times its weight goes into `deltas[e]`, which is then overwritten. This is
    the tail of mergekit's GeneralizedTaskArithmeticMerge.merge_group after
    sparsification; every step is per element, so it runs chunk by chunk.
    """
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).reshape(len(weights), 1)
    for e, source in enumerate(sources):
        torch.mul(source, w[e], out=deltas[e])
    n = deltas.shape[1]
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        part = deltas[:, start:end]
        if consensus:
            # sign(delta) == majority sign (+1 if the sum is >= 0), zeros excluded;
            # a product with the +-1 majority is exact and cheaper than torch.where.
            majority = (part.sum(dim=0) >= 0).to(part.dtype) * 2 - 1
            keep = (part * majority) > 0
            del majority
            divisor = (w * keep).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed = part.mul_(keep).sum(dim=0)
            del keep
        else:
            mixed = part.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        torch.add(base[start:end], mixed, out=out[start:end])
    return out


class TaskArithmetic(MergeMethod):
    """One member of the family: consensus (TIES sign election) and a sparsifier (or none)."""

    def __init__(self, name: str, *, consensus: bool, sparsifier: Optional[Sparsifier], normalize: bool,
                 rescale: bool, reference: str = ""):
        self.name = name
        self.consensus = consensus
        self.sparsifier = sparsifier
        self.reference = reference
        density = sparsifier.density_param() if sparsifier else Param(
            "density", 1.0, per_expert=True, low=0.0, high=1.0, low_open=True)
        self.params = (
            Param("weight", REQUIRED, per_expert=True, search=(0.0, 1.2)),
            density,
            Param("normalize", normalize, boolean=True),
            Param("rescale", rescale, boolean=True),
            Param("lambda", 1.0),
            Param("int8_mask", False, boolean=True),
            *(sparsifier.extra_params if sparsifier else ()),
        )
        self.side_kinds = (type(sparsifier).__name__,) if sparsifier else ()

    def check_resolved(self, resolved, where):
        if isinstance(self.sparsifier, Della):
            for i, (density, eps) in enumerate(zip(resolved["density"], resolved["epsilon"])):
                if density < 1 and not (density - eps > 0 and density + eps < 1):
                    raise EvomergeError(
                        f"della needs density±epsilon in (0, 1); expert {i} has density {density} "
                        f"and epsilon {eps} ({where})"
                    )

    def endpoint(self, expert, num_experts):
        """Weight 1 for the expert (others 0), its density 1, lambda 1; all weights 0 for the base."""
        targets = {"weight": [1.0 if e == expert else 0.0 for e in range(num_experts)]}
        if expert is not None:
            targets["density"] = [1.0 if e == expert else None for e in range(num_experts)]
            targets["lambda"] = 1.0
        return targets

    def elementwise(self, params):
        return self.sparsifier is None or all(d >= 1 for d in params["density"])

    def cache_bytes_per_element(self, num_experts, dtype):
        return num_experts * self.sparsifier.cache_bytes_per_element(dtype) if self.sparsifier else 0

    def workspace_bytes(self, unit_numel, num_experts, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        chunk = min(unit_numel, COMBINE_CHUNK_ELEMENTS)
        # deltas rows + one sparsification's temporaries (key, mask, float32 uniforms) + the chunked election
        return unit_numel * (num_experts * size + 4 + 4 + 1) + chunk * (num_experts * (2 * size + 1) + 4 * size)

    def prepare(self, slot, block: BlockData, ctx):
        if self.sparsifier is not None:
            for e in range(ctx.num_experts):
                self.sparsifier.prepare(slot, e, block.tv_of(slot, e), ctx)

    def merge(self, unit, block: BlockData, params, seed, out, ctx):
        n = unit.end - unit.start
        deltas = ctx.work.rows(n)
        if unit.elementwise:
            sources = [block.tv_range(e, unit.start, unit.end) for e in range(ctx.num_experts)]
        else:
            (slot,) = unit.slots
            for e in range(ctx.num_experts):
                if params["density"][e] >= 1:
                    deltas[e].copy_(block.tv_of(slot, e))
                else:
                    self.sparsifier.sparsify(slot, e, block.tv_of(slot, e), params, params["rescale"], seed,
                                             deltas[e], ctx)
            sources = list(deltas)
        combine_task_vectors(
            block.base_range(unit.start, unit.end),
            sources,
            deltas,
            params["weight"],
            consensus=self.consensus,
            normalize=params["normalize"],
            lam=params["lambda"],
            out=out,
        )


_MEMBERS = (  # name, TIES sign election, sparsifier, normalize and rescale defaults, arXiv paper
    ("task_arithmetic", False, None, False, False, "2212.04089"),
    ("ties", True, Magnitude(), True, False, "2306.01708"),
    ("dare_ties", True, Random(), False, True, "2311.03099"),
    ("dare_linear", False, Random(), False, True, "2311.03099"),
    ("breadcrumbs", False, Outliers(), False, False, "2312.06795"),
    ("breadcrumbs_ties", True, Outliers(), False, False, "2312.06795"),
    ("della", True, Della(), True, True, "2406.11617"),
    ("della_linear", False, Della(), False, True, "2406.11617"),
)
FAMILY = tuple(
    TaskArithmetic(name, consensus=consensus, sparsifier=sparsifier, normalize=normalize, rescale=rescale,
                   reference=f"https://arxiv.org/abs/{paper}")
    for name, consensus, sparsifier, normalize, rescale, paper in _MEMBERS
)
