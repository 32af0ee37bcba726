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
from evomerge.files import writing
from evomerge.zoo.profiles import PROFILES
from evomerge.zoo.shipped import copy_shipped, file_digest, shipped_matches
from evomerge.zoo.tasks import (BENCH_TASKS, BENCHMARK_OPTIONS, MAX_BENCH_ITEMS, TASKS, TaskSampler, make_bench_items,
                                 make_data_items)
from evomerge.zoo.training import _Progress, train_base, train_expert

ZOO_VERSION = "5"
DATA_ITEMS = 256
"""Unlabelled prompts per task in ``data/`` (data statistics and coefficient learning read a sample of them)."""
"""Bump when the zoo recipe changes, so cached zoos (tests, demo) are rebuilt."""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_answer_items(choices_jsonl: Path, out: Path) -> Path:
    """A benchmark's multiple-choice items rewritten as exact-match ones, the right choice as the answer,
    into ``out``: the same prompts checked or generated (the tests of those item kinds,
    ``tools/bench_scoring.py``)."""
    rows = [json.loads(line) for line in Path(choices_jsonl).read_text().splitlines()]
    _write_jsonl(Path(out), [{"id": r["id"], "prompt": r["prompt"], "answer": r["choices"][r["label"]]} for r in rows])
    return Path(out)


def _save(model, tokenizer, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    directory.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # our own bar is enough; keep logs clean
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)



def build_zoo(out_dir: str | os.PathLike, seed: int = 0, profile: str = "full", progress: bool = True,
              bench_items: int | None = None) -> Path:
    """Train base + experts and write the zoo layout of docs/DESIGN.md; returns the zoo folder.

    Deterministic: the same seed and profile give bitwise-identical weights and items.
    ``bench_items`` (default: the profile's) items per benchmark, at most ``MAX_BENCH_ITEMS``;
    the weights do not depend on it, and a smaller benchmark is the start of a larger one.
    """
    if profile not in PROFILES:
        raise EvomergeError(f"unknown zoo profile {profile!r}; choose one of {sorted(PROFILES)}")
    settings = PROFILES[profile]
    n_items = _checked_bench_items(settings.bench_items if bench_items is None else bench_items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cpu_started = time.process_time()

    sampler = TaskSampler(seed)
    held_out = _write_benchmarks(out, sampler, seed, n_items)
    sampler.exclude = {item["prompt"] for items in held_out.values() for item in items}
    write_zoo_data(out, seed)

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
        "bench_items": n_items,
        "tasks": list(TASKS),
        "composite_tasks": [t for t in BENCH_TASKS if t not in TASKS],
        "base": "base",
        "experts": {task: f"experts/{task}" for task in TASKS},
        "bench": {task: f"bench/{task}.jsonl" for task in BENCH_TASKS},
        "data": {task: f"data/{task}.jsonl" for task in BENCH_TASKS},
        "benchmarks": {task: BENCHMARK_OPTIONS.get(task, {}) for task in BENCH_TASKS},
        "build_seconds": round(time.time() - started, 1),
        "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completion
    return out


def _checked_bench_items(n_items: int) -> int:
    if not 1 <= n_items <= MAX_BENCH_ITEMS:
        raise EvomergeError(f"bench_items must be between 1 and {MAX_BENCH_ITEMS}, got {n_items}")
    return n_items


def _write_benchmarks(out: Path, sampler: TaskSampler, seed: int, n_items: int) -> dict[str, list]:
    """``bench/<task>.jsonl``: the first ``n_items`` of every task's ``MAX_BENCH_ITEMS`` held-out items, drawn
    first from a fresh sampler (so a smaller benchmark is the start of a larger one); returns them all,
    which training must never see."""
    held_out = {task: make_bench_items(task, sampler, MAX_BENCH_ITEMS, seed) for task in BENCH_TASKS}
    for task, items in held_out.items():
        _write_jsonl(out / "bench" / f"{task}.jsonl", items[:n_items])
    return held_out


def resize_benchmarks(zoo_dir: str | os.PathLike, bench_items: int) -> None:
    """The zoo's benchmarks rewritten with ``bench_items`` items each, as `build_zoo` writes them (the weights
    do not depend on it, and a smaller benchmark is the start of a larger one): the shipped zoo's weights
    serve a 5,000-item build without training anything."""
    _checked_bench_items(bench_items)
    out = Path(zoo_dir)
    manifest = json.loads((out / "zoo.json").read_text())
    if manifest["bench_items"] == bench_items:
        return
    _write_benchmarks(out, TaskSampler(manifest["seed"]), manifest["seed"], bench_items)
    manifest["bench_items"] = bench_items
    manifest.get("shipped", {}).get("sha256", {}).update(
        {f"bench/{task}.jsonl": file_digest(out / "bench" / f"{task}.jsonl") for task in BENCH_TASKS})
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")


def write_zoo_data(zoo_dir: str | os.PathLike, seed: int) -> None:
    """``data/<task>.jsonl``: unlabelled prompts of every task, none a benchmark prompt (drawn after the
    benchmarks, apart from training: the weights do not depend on them). A zoo built before they existed
    gets them here, without training anything."""
    out = Path(zoo_dir)
    sampler = TaskSampler(seed)
    for task in BENCH_TASKS:
        path = out / "data" / f"{task}.jsonl"
        if path.is_file():
            continue
        bench = {item["prompt"] for item in make_bench_items(task, sampler, MAX_BENCH_ITEMS, seed)}
        with writing(path):
            _write_jsonl(path, make_data_items(task, sampler, DATA_ITEMS, seed, bench))


def zoo_is_complete(zoo_dir: str | os.PathLike, profile: str | None = None, seed: int | None = None,
                    bench_items: int | None = None) -> bool:
    """True when ``zoo_dir`` holds a finished zoo of the current version (and profile/seed/benchmark size if given)."""
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
        and (bench_items is None or manifest.get("bench_items") == bench_items)
    )


def ensure_zoo(out_dir: str | os.PathLike, seed: int = 0, profile: str = "full", progress: bool = True,
               bench_items: int | None = None, shipped: bool = True) -> Path:
    """Build the zoo unless a complete one is already there; safe when several processes race.

    With ``shipped`` the zoo the package ships (`evomerge.zoo.shipped`) is copied instead
    of trained when it is the zoo asked for (this version, profile and seed).
    A file lock serialises builders, and the zoo is built in a temporary sibling folder
    and renamed into place, so readers never see a half-written zoo.
    """
    out = Path(out_dir)
    if zoo_is_complete(out, profile, seed, bench_items):
        write_zoo_data(out, seed)
        return out
    with writing(out):  # a full disk or a read-only folder: one line naming the zoo, no half-built folder left
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if zoo_is_complete(out, profile, seed, bench_items):
                write_zoo_data(out, seed)
                return out
            staging = out.parent / f".{out.name}.building-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                if shipped and shipped_matches(ZOO_VERSION, profile, seed):
                    copy_shipped(staging)
                    if bench_items is not None:
                        resize_benchmarks(staging, bench_items)
                else:
                    build_zoo(staging, seed=seed, profile=profile, progress=progress, bench_items=bench_items)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
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

