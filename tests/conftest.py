"""Shared fixtures. ``zoo_dir`` is used by every package's tests: keep its contract stable.

The quick zoo is built once into ``runs/.cache/zoo-quick-<version>`` and reused by later
runs (and by parallel pytest processes, which wait on a file lock instead of rebuilding).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.zoo import ZOO_VERSION, ensure_zoo

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_ZOO_DIR = REPO_ROOT / "runs" / ".cache" / f"zoo-quick-{ZOO_VERSION}"


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """Path to a complete quick-profile zoo (seed 0): base/, experts/<task>/, bench/, zoo.json."""
    return ensure_zoo(QUICK_ZOO_DIR, seed=0, profile="quick", progress=False)


@pytest.fixture
def one_torch_thread():
    """Tiny models merge and score fastest on one thread (no OpenMP spinning on a busy CI box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
