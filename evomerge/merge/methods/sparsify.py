"""The four sparsifications of the task-arithmetic family, each with its side data.

Each follows mergekit 0.1.5's `mergekit.sparsify` (same dtypes, same
operation order) from side data prepared once per tensor and expert:

| sparsifier | mergekit name | side data |
|---|---|---|
| `Magnitude` (TIES) | magnitude | mergekit's descending order: int32 ranks where the plan has room, else a threshold table (tie codes where there is room); L1 norm |
| `Outliers` (breadcrumbs) | magnitude_outliers | mergekit's ascending order, likewise; L1 norm |
| `Random` (DARE) | random | L1 norm (work dtype); the mask is drawn per candidate |
| `Della` (DELLA) | della_magprune | per-row normalised ranks where the plan has room, else recomputed per candidate; L1 norm |
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from evomerge.merge.methods import orders
from evomerge.merge.methods.base import Param
from evomerge.merge.methods.orders import (
    ASCENDING,
    DESCENDING,
    RankOrder,
    ThresholdOrder,
    grid_positions,
    order_key,
    window_positions,
)
from evomerge.merge.methods.randomness import bernoulli_mask, mask_generator, random_keep, sparsify_work_dtype

RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's eps
DENSITY_GRID = 0.001
_DELLA_ROWS_PER_CHUNK_ELEMENTS = 1 << 22


def rescale_l1_(masked: torch.Tensor, before_scale: torch.Tensor) -> torch.Tensor:
    """Scale `masked` in place to the L1 norm of the unmasked tensor (mergekit's rescale).

    `before_scale` is the original tensor's |.|-sum, prepared once.
    """
    after_scale = masked.abs().sum()
    if before_scale < RESCALE_EPS or after_scale < RESCALE_EPS:
        return masked
    return masked.mul_(before_scale / after_scale)


def della_rank_norm(task_vector: torch.Tensor) -> torch.Tensor:
    """DELLA's per-row rank in [0, 1] (work dtype, 2-D), as mergekit.sparsify.della_magprune."""
    work_dtype = sparsify_work_dtype(task_vector)
    tensor = task_vector.unsqueeze(0) if task_vector.dim() < 2 else task_vector
    sorted_indices = torch.argsort(tensor.abs(), dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    return ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)


def della_rank_norm_by_rows(task_vector: torch.Tensor) -> torch.Tensor:
    """`della_rank_norm` computed a few rows at a time (rows are independent), to bound temporaries."""
    if task_vector.dim() != 2:
        return della_rank_norm(task_vector)
    rows = max(1, _DELLA_ROWS_PER_CHUNK_ELEMENTS // max(1, task_vector.shape[1]))
    if rows >= task_vector.shape[0]:
        return della_rank_norm(task_vector)
    parts = [della_rank_norm(task_vector[r : r + rows]) for r in range(0, task_vector.shape[0], rows)]
    return torch.cat(parts)


def della_probs(rank_norm: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    return (density - epsilon) + rank_norm * 2 * epsilon


class Sparsifier(ABC):
    """Drops part of one expert's task vector for one tensor (density < 1)."""

    mergekit_name: str = ""
    extra_params: tuple = ()
    density_search: tuple = (0.2, 1.0)
    density_grid = None  # searched densities snap to this grid when threshold tables are used

    def density_param(self) -> Param:
        return Param("density", 1.0, per_expert=True, low=0.0, high=1.0, low_open=True,
                     grid=self.density_grid, search=self.density_search)

    def prepare(self, slot, expert: int, task_vector: torch.Tensor, ctx) -> None:
        """Side data for this tensor and expert."""

    def cache_bytes_per_element(self, dtype: torch.dtype) -> int:
        return 0

    @abstractmethod
    def sparsify(self, slot, expert: int, task_vector, params: dict, rescale: bool, seed: int,
                 dest: torch.Tensor, ctx) -> None:
        """Write the sparsified (optionally L1-rescaled) task vector into `dest` (density < 1: the caller
        copies the task vector as it is at density 1, as mergekit skips the drop there)."""


def _l1(ctx, slot, expert: int, tensor: torch.Tensor, shape) -> torch.Tensor:
    """The task vector's L1 norm in `tensor`'s dtype, prepared once per tensor, expert and dtype."""
    key = ("l1", slot.index, expert, tensor.dtype)
    value = ctx.side.get(key)
    if value is None:
        value = tensor.view(shape).abs().sum()
        ctx.side.put(key, value)
    return value


class _OrderSparsifier(Sparsifier):
    """Sparsifiers that keep a window of a magnitude order (ranks or a threshold table)."""

    direction = DESCENDING
    density_grid = DENSITY_GRID

    def cache_bytes_per_element(self, dtype):
        return 4

    def grid_positions(self, numel: int) -> tuple:
        """The k a threshold table answers without touching the data (every grid value of the parameters)."""
        return grid_positions(numel, DENSITY_GRID)

    def prepare(self, slot, expert, task_vector, ctx):
        key = (self.direction, slot.index, expert)
        if ctx.side.get(key) is None:
            if ctx.side.reserve(4 * slot.numel):
                order = RankOrder.build(task_vector, self.direction)
            else:
                order = ThresholdOrder.build(task_vector, self.direction, self.grid_positions(slot.numel))
                if order.code_bytes > orders.FREE_CODE_BYTES and not ctx.side.reserve(order.code_bytes):
                    order.drop_codes()  # those positions repeat mergekit's sort per candidate
            ctx.side.put(key, order)
        _l1(ctx, slot, expert, task_vector, slot.shape)

    def _order(self, slot, expert, task_vector, ctx):
        order = ctx.side.get((self.direction, slot.index, expert))
        if order is None:  # pragma: no cover - the core prepares before merging
            self.prepare(slot, expert, task_vector, ctx)
            order = ctx.side.get((self.direction, slot.index, expert))
        key = order_key(task_vector) if order.needs_key else None
        return order, key

    def _finish(self, slot, expert, task_vector, keep, rescale, dest, ctx):
        torch.mul(task_vector, keep, out=dest)
        if rescale:
            rescale_l1_(dest, _l1(ctx, slot, expert, task_vector, slot.shape))


class Magnitude(_OrderSparsifier):
    """TIES: keep the max(1, int(density * n)) largest magnitudes."""

    mergekit_name = "magnitude"

    def sparsify(self, slot, expert, task_vector, params, rescale, seed, dest, ctx):
        density = params["density"][expert]
        order, key = self._order(slot, expert, task_vector, ctx)
        keep = order.first(max(1, int(density * slot.numel)), key)
        self._finish(slot, expert, task_vector, keep, rescale, dest, ctx)


class Outliers(_OrderSparsifier):
    """Breadcrumbs: drop the gamma largest, then the smallest, to keep int(density * n)."""

    mergekit_name = "magnitude_outliers"
    direction = ASCENDING
    density_search = (0.2, 0.98)
    extra_params = (Param("gamma", 0.01, per_expert=True, low=0.0, high=1.0, high_open=True, grid=DENSITY_GRID),)

    def grid_positions(self, numel):
        return window_positions(numel, DENSITY_GRID)

    def sparsify(self, slot, expert, task_vector, params, rescale, seed, dest, ctx):
        density = params["density"][expert]
        num = slot.numel
        target_n = int(density * num)
        n_top = int(params["gamma"][expert] * num)
        n_bot = max(0, num - target_n - n_top)
        order, key = self._order(slot, expert, task_vector, ctx)
        keep = order.window(n_bot, n_bot + target_n, key)
        self._finish(slot, expert, task_vector, keep, rescale, dest, ctx)


class Random(Sparsifier):
    """DARE: keep each element with probability density (seeded per candidate, tensor, expert)."""

    mergekit_name = "random"

    def prepare(self, slot, expert, task_vector, ctx):
        _l1(ctx, slot, expert, task_vector.to(sparsify_work_dtype(task_vector)), slot.shape)

    def sparsify(self, slot, expert, task_vector, params, rescale, seed, dest, ctx):
        density = params["density"][expert]
        work_dtype = sparsify_work_dtype(task_vector)
        generator = mask_generator(seed, slot.name, expert, task_vector.device)
        keep = random_keep(slot.shape, density, work_dtype, generator, task_vector.device).reshape(-1)
        if work_dtype == task_vector.dtype:
            torch.mul(task_vector, keep, out=dest)
            masked = dest
        else:
            masked = task_vector.to(work_dtype) * keep
        if rescale:
            rescale_l1_(masked, _l1(ctx, slot, expert, task_vector.to(work_dtype), slot.shape))
        if masked is not dest:
            dest.copy_(masked)


class Della(Sparsifier):
    """DELLA: keep probability rises with the per-row magnitude rank (density +- epsilon)."""

    mergekit_name = "della_magprune"
    density_search = (0.3, 0.8)
    extra_params = (Param("epsilon", 0.15, per_expert=True, low=0.0, high=1.0, high_open=True),)

    def cache_bytes_per_element(self, dtype):
        return 4 if dtype in (torch.float16, torch.float32) else torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def _shape2d(slot) -> tuple:
        return (1, slot.numel) if len(slot.shape) < 2 else tuple(slot.shape)

    def prepare(self, slot, expert, task_vector, ctx):
        key = ("della", slot.index, expert)
        if ctx.side.get(key) is None:
            tensor = task_vector.view(slot.shape)
            nbytes = slot.numel * torch.empty((), dtype=sparsify_work_dtype(tensor)).element_size()
            if ctx.side.reserve(nbytes):
                ctx.side.put(key, della_rank_norm(tensor))
            else:
                ctx.side.put(key, False)  # no room: recomputed per candidate
        _l1(ctx, slot, expert, task_vector.to(sparsify_work_dtype(task_vector)), self._shape2d(slot))

    def sparsify(self, slot, expert, task_vector, params, rescale, seed, dest, ctx):
        density = params["density"][expert]
        work_dtype = sparsify_work_dtype(task_vector)
        rank_norm = ctx.side.get(("della", slot.index, expert))
        if rank_norm is None or rank_norm is False:
            rank_norm = della_rank_norm_by_rows(task_vector.view(slot.shape))
        probs = della_probs(rank_norm, density, params["epsilon"][expert])
        mask = bernoulli_mask(probs, mask_generator(seed, slot.name, expert, task_vector.device))
        del probs
        masked = (task_vector.view(rank_norm.shape).to(work_dtype) * mask).reshape(-1)
        if rescale:
            rescale_l1_(masked, _l1(ctx, slot, expert, task_vector.to(work_dtype), self._shape2d(slot)))
        dest.copy_(masked)
