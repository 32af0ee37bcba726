"""Exact "the k largest (or smallest) magnitudes" selections in mergekit's own order, cached two ways.

TIES keeps the k = max(1, int(density * n)) largest |delta| of a tensor;
breadcrumbs keeps the window [n_bot, n_bot + target_n) of the ascending order.
Which of several *equal* magnitudes fall inside k is decided by the sort, and
mergekit 0.1.5 sorts without `stable`: `torch.argsort(w, descending=True)`
(TIES) and `torch.sort(w).indices` (breadcrumbs), w = |delta| as float32 on
CPU (as it is on other devices). On CPU torch's unstable kernel leaves equal
values in an order no rule predicts (a chaotic function of the whole tensor),
but it is a deterministic function of w, and w is fixed per tensor and
expert: the same call on the same tensor and device, made once
(`mergekit_order`), gives mergekit's order for every k and every candidate.
Both caches are built from that one call:

* `RankOrder`: the int32 rank of every element (4 bytes per element). Any k
  costs one comparison. Kept only where the memory plan has room.
* `ThresholdOrder`: for k on a fixed grid (every k a density, or for
  breadcrumbs a density and gamma, on the 0.001 grid gives), the k-th key t
  and which of the elements equal to t are among the first k:
  - all or none: the whole tie group is inside k, or t == 0 (a zero kept or
    dropped contributes the same bits);
  - an index cut: those below a flat index (always so for a stable order,
    e.g. torch's CUDA sort, and for most groups of two or three in float32);
  - a code per tied element (one byte for up to 255 grid positions in the
    group), in flat order: the grid step from which mergekit's order keeps
    it. Codes are per-element side data (bf16 on CPU: about a byte per
    element); beyond `FREE_CODE_BYTES` per table they are kept only where
    the plan has room, and without them such a k is answered by repeating
    mergekit's sort.
  A few KB per tensor without codes. A k off the grid (a recipe not made by
  the search) is found from the data: its value by sorting only the elements
  between the two neighbouring grid thresholds; the tied elements kept by an
  index cut when the order is stable, else by repeating mergekit's sort.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

DESCENDING = "desc"  # the k largest magnitudes first (TIES)
ASCENDING = "asc"  # the k smallest first (breadcrumbs)
_MEMO_LIMIT = 256
FREE_CODE_BYTES = 64 << 10  # tie codes up to this size are part of their table (float32: a few bytes)
_CUT = -1  # group value of a position answered by an index cut (all: cut = n, none: cut = 0)
_RESORT = -2  # group value of a position whose codes did not fit: repeat mergekit's sort


def order_key(task_vector: torch.Tensor) -> torch.Tensor:
    """|task vector|, flat: the tensor mergekit sorts (converted to float32 on CPU, as mergekit does)."""
    w = task_vector.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    return w


def mergekit_order(key: torch.Tensor, direction: str) -> torch.Tensor:
    """Indices of `key` in mergekit 0.1.5's order: its own sort call, so its own order of equal values."""
    if direction == DESCENDING:
        return torch.argsort(key, descending=True)  # mergekit.sparsify.magnitude
    return torch.sort(key, descending=False).indices  # mergekit.sparsify.magnitude_outliers


def ranks_from_order(order: torch.Tensor) -> torch.Tensor:
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    ranks = torch.empty(order.shape, dtype=dtype, device=order.device)
    ranks[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return ranks


def _mask_of(order: torch.Tensor, low: int, high: int) -> torch.Tensor:
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    mask[order[low:high]] = True
    return mask


def grid_values(step: float = 0.001) -> list:
    """The values j * step, j = 1..1/step, as `Param.snap` writes them (and a mergekit YAML reads them)."""
    count = int(round(1 / step))
    decimals = len(f"{step:.10f}".rstrip("0").split(".")[1])
    return [round(j * step, decimals) for j in range(1, count + 1)]


@lru_cache(maxsize=64)
def grid_positions(numel: int, step: float = 0.001) -> tuple:
    """k = max(1, int(d * n)) for every density d on the grid, as mergekit computes it (TIES)."""
    positions = {max(1, int(d * numel)) for d in grid_values(step)}
    return tuple(sorted(p for p in positions if p <= numel))


@lru_cache(maxsize=64)
def window_positions(numel: int, step: float = 0.001) -> tuple:
    """Both ends of breadcrumbs' window for every density and gamma on the grid.

    mergekit: target_n = int(d * n), n_top = int(g * n), n_bot = max(0, n - target_n - n_top), kept
    ranks [n_bot, n_bot + target_n) of the ascending order; so the ends are n - n_top - target_n,
    n - n_top and (when n_bot is 0) target_n.
    """
    values = grid_values(step)
    targets = np.unique(np.asarray([int(d * numel) for d in values], dtype=np.int64))
    tops = np.unique(np.asarray([0] + [int(g * numel) for g in values if g < 1], dtype=np.int64))
    bottoms = np.subtract.outer(numel - tops, targets).reshape(-1)
    positions = np.unique(np.concatenate([bottoms[bottoms > 0], numel - tops, targets]))
    return tuple(int(p) for p in positions if 0 < p < numel)


class RankOrder:
    """Rank of every element in mergekit's order; `first(k)` is one comparison."""

    needs_key = False

    def __init__(self, ranks: torch.Tensor):
        self.ranks = ranks

    @classmethod
    def build(cls, task_vector: torch.Tensor, direction: str) -> "RankOrder":
        return cls(ranks_from_order(mergekit_order(order_key(task_vector), direction)))

    @property
    def nbytes(self) -> int:
        return self.ranks.numel() * self.ranks.element_size()

    def first(self, k: int, key: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.ranks < k

    def window(self, low: int, high: int, key: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements of rank low..high-1."""
        keep = self.ranks < high
        if low > 0:
            keep &= self.ranks >= low
        return keep


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges starts[i] .. starts[i] + lengths[i] - 1."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


class ThresholdOrder:
    """Per grid position: the k-th key and which tied elements are kept (see the module docstring)."""

    needs_key = True

    def __init__(self, numel: int, direction: str, positions: np.ndarray, thresholds: np.ndarray,
                 cuts: np.ndarray, groups: np.ndarray, limits: np.ndarray, stable: bool,
                 codes: Optional[torch.Tensor] = None, code_starts: Optional[np.ndarray] = None):
        self.numel = numel
        self.direction = direction
        before, after = (np.inf, -np.inf) if direction == DESCENDING else (-np.inf, np.inf)
        # Sentinels: nothing (k = 0) and everything (k = n).
        self.positions = np.concatenate([[0], positions, [numel]]).astype(np.int64)
        self.thresholds = np.concatenate([[before], thresholds, [after]]).astype(np.float64)
        self.cuts = np.concatenate([[0], cuts, [numel]]).astype(np.int64)
        self.groups = np.concatenate([[_CUT], groups, [_CUT]]).astype(np.int32)
        self.limits = np.concatenate([[0], limits, [0]]).astype(np.int32)
        self.stable = stable  # every run of equal nonzero keys is in ascending flat index
        self.codes = codes  # tie codes of all coded groups, concatenated (on the key's device)
        self.code_starts = code_starts  # group g's codes are codes[code_starts[g]:code_starts[g + 1]]
        self._memo: dict = {}

    @classmethod
    def build(cls, task_vector: torch.Tensor, direction: str, positions: Sequence[int]) -> "ThresholdOrder":
        key = order_key(task_vector)
        n = key.numel()
        inner = np.asarray(sorted(p for p in positions if 0 < p < n), dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        if not inner.size:
            return cls(n, direction, empty, np.zeros(0), empty, empty, empty, True)
        indices = mergekit_order(key, direction)
        values = key[indices]
        stable = _ties_by_index(values, indices)
        rising = values if direction == ASCENDING else values.neg()
        at = torch.as_tensor(inner - 1, device=key.device)
        probe = rising[at]
        starts = torch.searchsorted(rising, probe).cpu().numpy()  # the k-th key's tie group: [start, end)
        ends = torch.searchsorted(rising, probe, right=True).cpu().numpy()
        del rising, probe
        thresholds = values[at].double().cpu().numpy()
        cuts = np.where(ends == inner, n, 0).astype(np.int64)  # the whole group inside k, or (t == 0) none
        groups = np.full(inner.size, _CUT, dtype=np.int32)
        limits = np.zeros(inner.size, dtype=np.int32)
        split = (inner < ends) & (thresholds != 0)
        codes = code_starts = None
        if split.any():
            if stable:  # ties in flat order: those up to the k-th element's index
                cuts[split] = (indices[at[torch.as_tensor(split, device=key.device)]] + 1).cpu().numpy()
            else:
                codes, code_starts = _split_groups(indices, n, inner, starts, ends, split, cuts, groups, limits)
        return cls(n, direction, inner, thresholds, cuts, groups, limits, stable, codes, code_starts)

    @property
    def code_bytes(self) -> int:
        return 0 if self.codes is None else self.codes.numel() * self.codes.element_size()

    @property
    def nbytes(self) -> int:
        arrays = (self.positions, self.thresholds, self.cuts, self.groups, self.limits)
        return sum(a.nbytes for a in arrays) + self.code_bytes

    def drop_codes(self) -> None:
        """Forget the tie codes (no room for them): their positions repeat mergekit's sort instead."""
        self.groups[self.groups >= 0] = _RESORT
        self.codes = self.code_starts = None

    # ------------------------------------------------------------------ per candidate
    def _before(self, key: torch.Tensor, threshold: float) -> torch.Tensor:
        return key > threshold if self.direction == DESCENDING else key < threshold

    def _entry(self, k: int, key: torch.Tensor) -> tuple:
        """(threshold, cut, group, limit) of the first k elements (0 < k < n)."""
        j = int(np.searchsorted(self.positions, k))
        if self.positions[j] == k:
            return float(self.thresholds[j]), int(self.cuts[j]), int(self.groups[j]), int(self.limits[j])
        found = self._memo.get(k)
        if found is None:
            found = self._off_grid(k, j, key)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.pop(next(iter(self._memo)))
            self._memo[k] = found
        return found

    def _off_grid(self, k: int, j: int, key: torch.Tensor) -> tuple:
        """The entry of a k between grid positions j-1 and j, from the elements between their thresholds."""
        t_low, t_high = float(self.thresholds[j - 1]), float(self.thresholds[j])
        descending = self.direction == DESCENDING
        above = int(self._before(key, t_low).sum())
        lo, hi = (t_high, t_low) if descending else (t_low, t_high)
        window = key[(key >= lo) & (key <= hi)]
        values = torch.sort(window, descending=descending).values
        threshold = float(values[k - 1 - above])
        start = above + int(self._before(window, threshold).sum())
        end = start + int((window == threshold).sum())
        if end == k:
            return threshold, self.numel, _CUT, 0
        if threshold == 0:
            return threshold, 0, _CUT, 0
        if self.stable:
            tied = torch.nonzero(key == threshold).reshape(-1)  # ascending flat index
            return threshold, int(tied[k - start - 1]) + 1, _CUT, 0
        return threshold, 0, _RESORT, 0

    def _mask(self, key: torch.Tensor, threshold: float, cut: int, group: int, limit: int) -> torch.Tensor:
        if group >= 0:
            keep = self._before(key, threshold)
            codes = self.codes[int(self.code_starts[group]) : int(self.code_starts[group + 1])]
            keep.masked_scatter_(key == threshold, codes < limit)
            return keep
        if cut >= self.numel:
            return key >= threshold if self.direction == DESCENDING else key <= threshold
        keep = self._before(key, threshold)
        if cut > 0:
            head = keep[:cut]
            head.logical_or_(key[:cut] == threshold)
        return keep

    def first(self, k: int, key: torch.Tensor) -> torch.Tensor:
        """Flat bool mask of the first k elements of mergekit's order of `key`."""
        if k <= 0:
            return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
        if k >= self.numel:
            return torch.ones(key.shape, dtype=torch.bool, device=key.device)
        entry = self._entry(k, key)
        if entry[2] == _RESORT:
            return _mask_of(mergekit_order(key, self.direction), 0, k)
        return self._mask(key, *entry)

    def window(self, low: int, high: int, key: torch.Tensor) -> torch.Tensor:
        """Elements of rank low..high-1 (one sort at most when mergekit's has to be repeated)."""
        if high <= low:
            return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
        inner = [k for k in (low, high) if 0 < k < self.numel]
        if any(self._entry(k, key)[2] == _RESORT for k in inner):
            return _mask_of(mergekit_order(key, self.direction), max(0, low), high)
        keep = self.first(high, key)
        if low > 0:
            keep &= ~self.first(low, key)
        return keep


def _ties_by_index(values: torch.Tensor, indices: torch.Tensor) -> bool:
    """True if every run of equal nonzero values lists its elements in ascending flat index."""
    if values.numel() < 2:
        return True
    same = values[1:] == values[:-1]
    same &= values[1:] != 0
    same &= indices[1:] < indices[:-1]
    return not bool(same.any())


def _split_groups(indices, n, inner, starts, ends, split, cuts, groups, limits):
    """Cuts or codes for the grid positions that split a tie group (an unstable order); fills
    cuts / groups / limits in place and returns (codes, code_starts) or (None, None).

    Group G holds the elements of ranks start..end-1 (equal keys); a position k inside it keeps
    mergekit's first k - start of them. That is an index cut when those all have lower flat indices
    than the rest; otherwise the whole group gets codes.
    """
    device = indices.device
    group_starts, first = np.unique(starts[split], return_index=True)
    group_ends = ends[split][first]
    lengths = group_ends - group_starts
    member_at = torch.as_tensor(_ranges(group_starts, lengths), device=device)  # ranks of all members
    members = indices[member_at]  # flat indices, group after group, each in mergekit's order
    del member_at
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.as_tensor(lengths, device=device))
    shifted = segment * n + members  # per-group scans over one array: groups never mix
    prefix_max = torch.cummax(shifted, 0).values - segment * n
    suffix_min = torch.cummin(shifted.flip(0), 0).values.flip(0) - segment * n
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    where = np.nonzero(split)[0]
    group_of = np.searchsorted(group_starts, starts[where])
    at = torch.as_tensor(offsets[group_of] + inner[where] - starts[where], device=device)  # first member not kept
    last_kept = prefix_max[at - 1]
    cut_ok = (last_kept < suffix_min[at]).cpu().numpy()
    del prefix_max, suffix_min
    coded = np.zeros(len(lengths), dtype=bool)
    coded[group_of[~cut_ok]] = True
    plain = ~coded[group_of]
    cuts[where[plain]] = (last_kept.cpu().numpy() + 1)[plain]
    if not coded.any():
        return None, None
    # Codes: for each member of a coded group, in flat order, the number of the group's positions
    # that do not keep it yet; position number i (from 0) of the group keeps codes < i + 1.
    coded_where = where[~plain]
    coded_group = group_of[~plain]
    position_rank = torch.as_tensor(offsets[coded_group] + inner[coded_where] - starts[coded_where], device=device)
    keep_member = torch.as_tensor(np.repeat(coded, lengths), device=device)
    rank = torch.arange(len(members), device=device)[keep_member]  # member's offset in the array
    sub_segment = segment[keep_member]
    first_position = torch.searchsorted(position_rank, torch.as_tensor(offsets[:-1], device=device))
    code = torch.searchsorted(position_rank, rank, right=True) - first_position[sub_segment]
    flat = torch.argsort(shifted[keep_member])  # each group's members in flat order (distinct keys)
    code = code[flat]
    positions_per_group = np.bincount(coded_group, minlength=len(lengths))
    widest = int(positions_per_group.max())
    dtype = torch.uint8 if widest < 256 else torch.int16 if widest < 2**15 else torch.int32
    code = code.to(dtype)
    coded_ids = np.cumsum(coded) - 1  # group id among coded groups
    code_starts = np.concatenate([[0], np.cumsum(lengths[coded])]).astype(np.int64)
    groups[coded_where] = coded_ids[coded_group]
    # position number within its group: positions are ascending, so count the earlier ones
    order_in_group = np.arange(len(coded_where)) - np.searchsorted(coded_group, coded_group)
    limits[coded_where] = order_in_group + 1
    return code, code_starts
