"""Batches that shrink when the GPU runs out of memory, so a trial never fails for that.

The merge core keeps its own memory within its budget; what is left of the
device is the scoring headroom, and a long prompt or a large vocabulary can
still exceed it. `run_batches` then halves the batch, retries the same items
and remembers the size on the model, so later trials start at a size that
fits instead of paying the failure again.
"""

from __future__ import annotations

from typing import Callable

import torch

from evomerge.errors import EvomergeError

_LIMIT_ATTR = "_evomerge_batch_limit"


def batch_limit(model, key: str, batch_size: int) -> int:
    """The batch size to start `key` batches with on `model`: the asked one, or a smaller one that fit."""
    return max(1, min(batch_size, getattr(model, _LIMIT_ATTR, {}).get(key, batch_size)))


def run_batches(model, key: str, total: int, batch_size: int, step: Callable[[int, int], None]) -> None:
    """Call `step(start, stop)` over [0, total) in batches of at most `batch_size` rows.

    On CUDA out-of-memory the failed batch is retried at half the size (down to
    one row) and the size that works is kept on the model under `key` (the kind
    of batch: rows of different scorers cost different memory) for later calls.
    """
    size = batch_limit(model, key, batch_size)
    start = 0
    while start < total:
        stop = min(total, start + size)
        try:
            step(start, stop)
        except torch.OutOfMemoryError:
            if size == 1:
                raise EvomergeError(
                    "scoring ran out of GPU memory with a batch of one item; leave more headroom "
                    "(a smaller --device-memory for the merge core, or memory.scoring_headroom)"
                ) from None
            size = max(1, size // 2)
            limits = getattr(model, _LIMIT_ATTR, {})
            limits[key] = size
            setattr(model, _LIMIT_ATTR, limits)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
