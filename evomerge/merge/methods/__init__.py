"""Merge methods, one module per family, behind one registry (`METHODS`, `get_method`).

| module | methods |
|---|---|
| `linear.py` | linear |
| `task_arithmetic.py` | task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear |
| `slerp.py` | slerp |
| `model_stock.py` | model_stock |
| `regmean.py` | regmean (data-informed: Gram matrices of each linear layer's inputs) |
| `fisher.py` | fisher (data-informed: diagonal Fisher information) |
| `sce.py` | sce (variance top-k, energy weights, TIES signs) |
| `karcher.py` | karcher (Karcher mean of the experts on the unit sphere) |
| `multislerp.py` | multislerp (weighted spherical mean of the experts or their task vectors) |
| `nuslerp.py` | nuslerp (SLERP of two experts or task vectors, t from two weights) |
| `nearswap.py` | nearswap (the expert where it is within t of the base) |
| `arcee_fusion.py` | arcee_fusion (the expert's change where abs(delta) x row KL is an outlier) |
| `ram.py` | ram, ramplus_tl (lone changes kept, shared ones averaged; RAM+ scales lone ones) |

Shared pieces: `base.py` (the `MergeMethod` interface and `Param` spec),
`sparsify.py` (TIES / DARE / breadcrumbs / DELLA drops), `orders.py` (exact
magnitude selections: rank caches and threshold tables), `randomness.py`
(seeded masks), `experts.py` (the experts' own weights, bit for bit, for
methods that merge weights rather than task vectors). A new method is one
`MergeMethod` subclass passed to `register`.
"""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.merge.methods.arcee_fusion import ArceeFusion
from evomerge.merge.methods.base import REQUIRED, BlockData, MergeMethod, Param
from evomerge.merge.methods.fisher import FisherMerge
from evomerge.merge.methods.karcher import Karcher
from evomerge.merge.methods.linear import Linear, linear_combine
from evomerge.merge.methods.model_stock import ModelStock, model_stock
from evomerge.merge.methods.multislerp import MultiSlerp
from evomerge.merge.methods.nearswap import NearSwap
from evomerge.merge.methods.nuslerp import NuSlerp
from evomerge.merge.methods.ram import Ram, RamPlus
from evomerge.merge.methods.regmean import RegMean
from evomerge.merge.methods.randomness import bernoulli_mask, mask_generator, mask_seed, random_keep
from evomerge.merge.methods.sce import Sce
from evomerge.merge.methods.slerp import Slerp
from evomerge.merge.methods.task_arithmetic import FAMILY, TaskArithmetic, combine_task_vectors

METHODS: dict = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make `method` available by its name to recipes, search spaces and the mergekit export."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    method = METHODS.get(name)
    if method is None:
        raise EvomergeError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return method


for _method in (Linear(), *FAMILY, Slerp(), ModelStock(), RegMean(), FisherMerge(), Sce(), Karcher(), MultiSlerp(),
                NuSlerp(), NearSwap(), ArceeFusion(), Ram(), RamPlus()):
    register(_method)

__all__ = [
    "METHODS",
    "REQUIRED",
    "BlockData",
    "MergeMethod",
    "Param",
    "TaskArithmetic",
    "get_method",
    "register",
    "mask_seed",
    "mask_generator",
    "bernoulli_mask",
    "random_keep",
    "combine_task_vectors",
    "linear_combine",
    "model_stock",
]
