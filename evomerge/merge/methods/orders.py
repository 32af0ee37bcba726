"""Exact "the k largest (or smallest) magnitudes" selections, cached two ways.

TIES keeps the k = max(1, int(density * n)) largest |delta| of a tensor;
breadcrumbs keeps a window of the ascending order. A search asks this for
thousands of densities, so the order is computed once per tensor and expert:

* `RankOrder`: the int32 rank of every element (4 bytes per element). Any k
  costs one comparison. Kept only where the memory plan has room.
* `ThresholdOrder`: for k on a fixed grid (the positions of densities in
  steps of 0.001), the exact k-th key and an index cut (a few KB per tensor).
  The first k elements are exactly `key > t`, plus the elements with
  `key == t` whose flat index is below `cut`. A k off the grid is refined
  exactly from the data, by sorting only the elements between the two
  neighbouring grid positions, and remembered.

Ties: both orders rank equal magnitudes by flat index, lowest first: the order
of a *stable* sort (`torch.sort(..., stable=True)`, and CUDA's radix sort).
mergekit 0.1.5 calls `torch.argsort` without `stable`, whose CPU kernel orders
ties by its introsort: a chaotic function of the whole tensor (changing one
element reorders almost every tie group), which no cache smaller than a sort
per candidate can reproduce. The two agree wherever no tie straddles the
threshold (float32 checkpoints in practice); on bf16 checkpoints they can
differ in which of the elements equal to the k-th magnitude are kept.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

DESCENDING = "desc"  # the k largest magnitudes first (TIES)
ASCENDING = "asc"  # the k smallest first (breadcrumbs)
_MEMO_LIMIT = 256


def order_key(task_vector: torch.Tensor, direction: str) -> torch.Tensor:
    """The flat key whose stable descending order is the wanted order (float32 on CPU, as mergekit)."""
    w = task_vector.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    return w if direction == DESCENDING else w.neg_()


def stable_order(key: torch.Tensor) -> torch.Tensor:
    """Indices of `key` sorted descending, ties by index (lowest first)."""
    return torch.sort(key, descending=True, stable=True).indices


def ranks_from_order(order: torch.Tensor) -> torch.Tensor:
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    ranks = torch.empty(order.shape, dtype=dtype, device=order.device)
    ranks[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return ranks


def grid_positions(numel: int, step: float = 0.001) -> list:
    """k = max(1, int(d * n)) for every density d on the grid, as mergekit computes it."""
    count = int(round(1 / step))
    decimals = len(f"{step:.10f}".rstrip("0").split(".")[1])
    positions = {max(1, int(round(j * step, decimals) * numel)) for j in range(1, count + 1)}
    return sorted(p for p in positions if p <= numel)


class RankOrder:
    """Rank of every element in the stable order; `first(k)` is one comparison."""

    needs_key = False

    def __init__(self, ranks: torch.Tensor):
        self.ranks = ranks

    @classmethod
    def build(cls, task_vector: torch.Tensor, direction: str) -> "RankOrder":
        return cls(ranks_from_order(stable_order(order_key(task_vector, direction))))

    @property
    def nbytes(self) -> int:
        return self.ranks.numel() * self.ranks.element_size()

    def first(self, k: int, key: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.ranks < k


class ThresholdOrder:
    """Exact (threshold, index cut) of the first k elements for k on a grid, refined off it."""

    needs_key = True

    def __init__(self, numel: int, positions: np.ndarray, thresholds: np.ndarray, cuts: np.ndarray):
        self.numel = numel
        # Sentinels: nothing (k = 0) and everything (k = n).
        self.positions = np.concatenate([[0], positions, [numel]]).astype(np.int64)
        self.thresholds = np.concatenate([[np.inf], thresholds, [-np.inf]]).astype(np.float64)
        self.cuts = np.concatenate([[0], cuts, [numel]]).astype(np.int64)
        self._memo: dict = {}

    @classmethod
    def build(cls, task_vector: torch.Tensor, direction: str, positions: Sequence[int]) -> "ThresholdOrder":
        key = order_key(task_vector, direction)
        values, indices = torch.sort(key, descending=True, stable=True)
        n = key.numel()
        inner = np.asarray([p for p in positions if 0 < p < n], dtype=np.int64)
        at = torch.as_tensor(inner - 1, device=key.device)
        thresholds = values[at].double().cpu().numpy() if inner.size else np.zeros(0)
        cuts = (indices[at] + 1).cpu().numpy() if inner.size else np.zeros(0, dtype=np.int64)
        return cls(n, inner, thresholds, cuts)

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.thresholds.nbytes + self.cuts.nbytes

    def _mask(self, key: torch.Tensor, threshold: float, cut: int) -> torch.Tensor:
        keep = key > threshold
        if cut > 0 and np.isfinite(threshold):
            head = keep[:cut]
            head.logical_or_(key[:cut] == threshold)
        return keep

    def threshold(self, k: int, key: torch.Tensor) -> tuple:
        """(t, cut) such that the first k elements are key > t, or key == t at index < cut."""
        j = int(np.searchsorted(self.positions, k))
        if j < len(self.positions) and self.positions[j] == k:
            return float(self.thresholds[j]), int(self.cuts[j])
        found = self._memo.get(k)
        if found is not None:
            return found
        low = j - 1  # positions[low] < k < positions[j]
        inside = self._mask(key, self.thresholds[j], int(self.cuts[j]))
        inside &= ~self._mask(key, self.thresholds[low], int(self.cuts[low]))
        index = torch.nonzero(inside).reshape(-1)  # ascending flat index
        values, order = torch.sort(key[index], descending=True, stable=True)
        r = k - int(self.positions[low]) - 1
        found = (float(values[r]), int(index[order[r]]) + 1)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.pop(next(iter(self._memo)))
        self._memo[k] = found
        return found

    def first(self, k: int, key: torch.Tensor) -> torch.Tensor:
        """Flat bool mask of the first k elements of the stable order of `key`."""
        if k <= 0:
            return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
        if k >= self.numel:
            return torch.ones(key.shape, dtype=torch.bool, device=key.device)
        threshold, cut = self.threshold(k, key)
        return self._mask(key, threshold, cut)
