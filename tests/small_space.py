"""A small search space on the quick zoo, for tests that run whole searches cheaply."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def small_space(zoo_dir: Path, path: Path, name: str = "r", items: int = 60, **sections) -> Path:
    """Two experts, two 60-item benchmarks, no calibration merges: a run that calibrates in a second."""
    tasks = json.loads((zoo_dir / "zoo.json").read_text())["tasks"][:2]
    benchmarks = []
    for task in tasks:
        lines = (zoo_dir / "bench" / f"{task}.jsonl").read_text().splitlines()[:items]
        (path.parent / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        benchmarks.append({"name": task, "path": str(path.parent / f"{task}.jsonl")})
    space = {
        "name": name,
        "models": {"base": str(zoo_dir / "base"), "experts": {t: str(zoo_dir / "experts" / t) for t in tasks}},
        "merge": {"method": "ties", "granularity": "global", "params": {"weight": [0.0, 1.2]}},
        "benchmarks": benchmarks,
        "estimator": {"method": "mean", "strategy": "random", "subset_size": 10, "calibration_merges": 0},
        "optimizer": {"name": "tpe", "trials": 3, "seed": 0},
        "device": "cpu",
    }
    for section, values in sections.items():
        space[section] = {**space.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path
