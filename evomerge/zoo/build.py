"""Build the zoo folder (base, experts, benchmark items, manifest), or reuse a complete one.

Layout (see docs/DESIGN.md)::

    <out>/base/  <out>/experts/<task>/  <out>/bench/<task>.jsonl  <out>/zoo.json
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.zoo.profiles import PROFILES
from evomerge.zoo.tasks import TASKS, TaskSampler, make_bench_items
from evomerge.zoo.training import _Progress, train_base, train_expert

ZOO_VERSION = "3"
"""Bump when the zoo recipe changes, so cached zoos (tests, demo) are rebuilt."""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _save(model, tokenizer, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    directory.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # our own bar is enough; keep logs clean
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)



def build_zoo(out_dir: str | os.PathLike, seed: int = 0, profile: str = "full", progress: bool = True) -> Path:
    """Train base + experts and write the zoo layout of docs/DESIGN.md; returns the zoo folder.

    Deterministic: the same seed and profile give bitwise-identical weights and items.
    """
    if profile not in PROFILES:
        raise EvomergeError(f"unknown zoo profile {profile!r}; choose one of {sorted(PROFILES)}")
    settings = PROFILES[profile]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cpu_started = time.process_time()

    sampler = TaskSampler(seed)
    bench = {task: make_bench_items(task, sampler, settings.bench_items, seed) for task in TASKS}
    sampler.exclude = {item["prompt"] for items in bench.values() for item in items}
    for task, items in bench.items():
        _write_jsonl(out / "bench" / f"{task}.jsonl", items)

    total = settings.base_steps + settings.expert_steps * len(TASKS)
    with _Progress(progress, total) as bar:
        base, tokenizer = train_base(settings, seed, sampler.exclude, on_step=bar.phase("base"))
        _save(base, tokenizer, out / "base")
        for task in TASKS:
            expert = train_expert(base, tokenizer, task, sampler, settings, seed, on_step=bar.phase(f"expert {task}"))
            _save(expert, tokenizer, out / "experts" / task)

    manifest = {
        "version": ZOO_VERSION,
        "seed": seed,
        "profile": profile,
        "settings": asdict(settings),
        "tasks": list(TASKS),
        "base": "base",
        "experts": {task: f"experts/{task}" for task in TASKS},
        "bench": {task: f"bench/{task}.jsonl" for task in TASKS},
        "build_seconds": round(time.time() - started, 1),
        "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completion
    return out


def zoo_is_complete(zoo_dir: str | os.PathLike, profile: str | None = None, seed: int | None = None) -> bool:
    """True when ``zoo_dir`` holds a finished zoo of the current version (and profile/seed if given)."""
    manifest_path = Path(zoo_dir) / "zoo.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    return (
        manifest.get("version") == ZOO_VERSION
        and (profile is None or manifest.get("profile") == profile)
        and (seed is None or manifest.get("seed") == seed)
    )


def ensure_zoo(out_dir: str | os.PathLike, seed: int = 0, profile: str = "full", progress: bool = True) -> Path:
    """Build the zoo unless a complete one is already there; safe when several processes race.

    A file lock serialises builders, and the zoo is built in a temporary sibling folder
    and renamed into place, so readers never see a half-written zoo.
    """
    out = Path(out_dir)
    if zoo_is_complete(out, profile, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if zoo_is_complete(out, profile, seed):
            return out
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        build_zoo(staging, seed=seed, profile=profile, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    return out


def load_zoo_manifest(zoo_dir: str | os.PathLike) -> dict:
    """The parsed ``zoo.json``, with a clear error when the folder is not a zoo."""
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise EvomergeError(f"{zoo_dir} is not a model zoo: {path} is missing (build one with tools/make_zoo.py)")
    return json.loads(path.read_text())

