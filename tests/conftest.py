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


@pytest.fixture(scope="session")
def zoo_answer_benches(zoo_dir, tmp_path_factory) -> dict[str, Path]:
    """task -> a jsonl of the quick zoo's multiple-choice items as exact-match items (the right choice is
    the answer), so the exact-match and generate kinds are tested on the zoo's own models and prompts."""
    import json

    from evomerge.zoo.build import write_answer_items

    folder = tmp_path_factory.mktemp("answers")
    return {bench.stem: write_answer_items(bench, folder / bench.name)
            for bench in sorted((zoo_dir / "bench").glob("*.jsonl"))
            if "choices" in json.loads(bench.read_text().splitlines()[0])}


@pytest.fixture
def one_torch_thread():
    """Tiny models merge and score fastest on one thread (no OpenMP spinning on a busy CI box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
