"""Full-benchmark accuracy of models, for `evomerge eval` and the demo's comparison table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.table import Table

from evomerge.benchmarks import Benchmark, load_benchmark, score_records, write_records
from evomerge.console import full_width_console
from evomerge.errors import EvomergeError
from evomerge.search.candidates import load_checkpoint
from evomerge.search.runs import SPACE_FILE
from evomerge.search.space import load_search_space


def _space(space: str):
    return load_search_space(Path(space) / SPACE_FILE if Path(space).is_dir() else Path(space))


def space_base(space: str) -> str:
    """The base model of a search space / run folder."""
    return _space(space).base


def benchmarks_for(paths: list[str] | None, space: str | None, whole: bool = False) -> dict[str, Benchmark]:
    """Benchmarks named on the command line, or those of a search space / run folder (``whole``: every
    item of those the space studies on a ``sample:``)."""
    if space:
        return {b.name: (dataclasses.replace(b, sample=None) if whole else b).load() for b in _space(space).benchmarks}
    benchmarks = {}
    for path in paths or []:
        bench = load_benchmark(path)
        benchmarks[bench.name] = bench
    if not benchmarks:
        raise EvomergeError("no benchmark given")
    return benchmarks


def load_model(path: str | Path, device: str | None = None, base: str | Path | None = None):
    """(model, tokenizer) from a Hugging Face folder, through from_pretrained; a LoRA adapter folder is
    merged into ``base`` (None: the local base its adapter_config.json records)."""
    path = Path(path)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise EvomergeError(f"{path} is not a Hugging Face model folder (no config.json) nor a LoRA adapter "
                            "(no adapter_config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_checkpoint(path, None, device, base)


def evaluate_models(models: dict, benchmarks: dict[str, Benchmark], batch_size: int = 128,
                    records: dict[str, Path] | None = None, base: str | Path | None = None) -> dict[str, dict[str, float]]:
    """name -> {benchmark: accuracy}; a model is a folder path or a (model, tokenizer) pair.

    ``records``: model name -> folder that receives ``<benchmark>.jsonl``, one line per item
    (prompt, generation, extracted answer, target, correct), so a user can see why an item failed.
    """
    results = {}
    for name, source in models.items():
        model, tokenizer = load_model(source, base=base) if isinstance(source, (str, Path)) else source
        folder = (records or {}).get(name)
        results[name] = {}
        for bench_name, bench in benchmarks.items():
            scored = score_records(model, tokenizer, bench, batch_size=batch_size, records=folder is not None)
            if folder is not None:
                write_records(Path(folder) / f"{bench_name}.jsonl", scored.records)
            results[name][bench_name] = float(scored.correct.mean())
    return results


def accuracy_title(benchmarks: dict[str, Benchmark]) -> str:
    """What an accuracy table measured: every item, or (a space's ``sample:``) which samples."""
    samples = [f"{name} {len(b.items)} of {b.sampled_from}" for name, b in benchmarks.items() if b.sampled_from]
    total = sum(len(b.items) for b in benchmarks.values())
    if not samples:
        return f"full-benchmark accuracy ({total} items)"
    return f"accuracy on the benchmarks' samples ({total} items; {', '.join(samples)}: `eval --whole` for every item)"


def print_accuracy_table(results: dict[str, dict[str, float]], tasks: list[str], title: str = "full-benchmark accuracy") -> None:
    table = Table(title=title)
    table.add_column("model")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for name, scores in results.items():
        values = [scores[t] for t in tasks]
        table.add_row(name, *(f"{v:.3f}" for v in values), f"{sum(values) / len(values):.3f}")
    full_width_console().print(table)
