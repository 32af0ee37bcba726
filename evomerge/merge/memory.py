"""Memory budgets (how many bytes the merge core may use where) and the ledger that checks them.

A budget is given in bytes or as a string ("20GiB", "512MB", "1.5TB"). The
device budget covers everything the core allocates on the merge device: the
resident model it merges into, blocks kept there, staging buffers, side data
and the merge's temporaries; what is left of the device is the scoring
headroom. Defaults: on CUDA, free device memory minus the scoring headroom;
host: available RAM minus a margin. On a CPU device both budgets draw on the
same RAM, so the device budget defaults to available RAM minus the margin and
the host budget to 0 (nothing needs staging).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from evomerge.errors import EvomergeError

GiB = 1 << 30
DEFAULT_SCORING_HEADROOM = 2 * GiB
HOST_MARGIN_FRACTION = 0.1
HOST_MARGIN_MIN = 2 * GiB

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value, where: str = "memory budget") -> Optional[int]:
    """Bytes from an int or a string like "20GiB" / "512MB" (None stays None: use the default)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise EvomergeError(f"{where}: expected a size like 20GiB or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise EvomergeError(f"{where}: a size cannot be negative, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise EvomergeError(
            f"{where}: cannot read {value!r} as a size; use bytes or a unit (KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    """Bytes in GiB / MiB with two or three significant decimals."""
    if abs(count) >= GiB:
        return f"{count / GiB:.2f} GiB"
    if abs(count) >= 1 << 20:
        return f"{count / (1 << 20):.1f} MiB"
    return f"{count / 1024:.1f} KiB"


def available_host_bytes() -> int:
    """Available RAM (MemAvailable on Linux; free physical pages elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * GiB


def free_device_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


@dataclass
class Budgets:
    """Bytes the core may account on the merge device and in host memory."""

    device: int
    host: int
    scoring_headroom: int = 0
    device_given: bool = False
    host_given: bool = False

    @classmethod
    def resolve(cls, device: torch.device, device_memory=None, host_memory=None,
                scoring_headroom=None) -> "Budgets":
        device_bytes = parse_bytes(device_memory, "device_memory")
        host_bytes = parse_bytes(host_memory, "host_memory")
        headroom = parse_bytes(scoring_headroom, "scoring_headroom")
        available = available_host_bytes()
        margin = max(HOST_MARGIN_MIN, int(available * HOST_MARGIN_FRACTION))
        if device.type == "cuda":
            if headroom is None:
                headroom = DEFAULT_SCORING_HEADROOM
            default_device = 0
            if device_bytes is None:
                if not torch.cuda.is_available():
                    raise EvomergeError(f"no CUDA device here to measure free memory on {device}: give device_memory "
                                        "(--device-memory, e.g. 24GB)")
                default_device = max(0, free_device_bytes(device) - headroom)
            default_host = max(0, available - margin)
        else:
            headroom = headroom or 0
            default_device = max(0, available - margin)
            default_host = 0
        return cls(
            device=default_device if device_bytes is None else device_bytes,
            host=default_host if host_bytes is None else host_bytes,
            scoring_headroom=headroom,
            device_given=device_bytes is not None,
            host_given=host_bytes is not None,
        )


@dataclass
class Ledger:
    """Bytes the core has accounted per tier and category, with the peak per tier."""

    current: dict = field(default_factory=dict)  # (tier, category) -> bytes
    peak: dict = field(default_factory=dict)  # tier -> bytes

    def total(self, tier: str) -> int:
        return sum(v for (t, _), v in self.current.items() if t == tier)

    def add(self, tier: str, category: str, nbytes: int) -> None:
        self.current[(tier, category)] = self.current.get((tier, category), 0) + int(nbytes)
        self.peak[tier] = max(self.peak.get(tier, 0), self.total(tier))

    def remove(self, tier: str, category: str, nbytes: int) -> None:
        self.current[(tier, category)] = self.current.get((tier, category), 0) - int(nbytes)

    def by_category(self, tier: str) -> dict:
        return {c: v for (t, c), v in self.current.items() if t == tier and v}
