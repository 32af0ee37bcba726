"""Scoring a model on a benchmark's items: per-item correctness, and per-item records on request.

Every kind runs batched on the model's device under ``torch.inference_mode()``,
with batches that shrink on CUDA out-of-memory (`evomerge.batching`); the
model is put in eval mode and its previous mode restored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from rich.progress import Progress

from evomerge.benchmarks.generation import eos_ids, finish_generation, greedy_config, greedy_defaults
from evomerge.benchmarks.items import Benchmark, Item
from evomerge.benchmarks.kinds import Scored, ScoringContext, get_kind
from evomerge.benchmarks.prompts import model_device, prefix_ids, tokenize
from evomerge.errors import EvomergeError
from evomerge.files import write_text_atomic


def _chosen(bench: Benchmark, indices: Iterable[int] | None) -> list[Item]:
    if indices is None:
        return list(bench.items)
    index_list = [int(i) for i in indices]
    bad = [i for i in index_list if not 0 <= i < len(bench.items)]
    if bad:
        raise EvomergeError(f"benchmark {bench.name!r} has {len(bench.items)} items; bad indices {bad[:5]}")
    return [bench.items[i] for i in index_list]


def score_records(model, tokenizer, bench: Benchmark, indices: Iterable[int] | None = None, batch_size: int = 64,
                  progress: bool = False, records: bool = True) -> Scored:
    """Per-item correctness (bool array aligned with ``indices``, default all items) and, with
    ``records``, one dict per item for the jsonl (prompt, generation, extracted, target, correct, ...)."""
    chosen = _chosen(bench, indices)
    if not chosen:
        return Scored(np.zeros(0, dtype=bool), [] if records else None)
    if batch_size < 1:
        raise EvomergeError(f"batch_size must be at least 1, got {batch_size}")
    kind = get_kind(bench.kind)
    kind.check_items(chosen, f"benchmark {bench.name!r} ({bench.source or 'in memory'})")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _maybe_progress(progress, len(chosen), bench.name) as tick:
            context = ScoringContext(model, tokenizer, bench, batch_size, model_device(model), tick)
            return kind.score(context, chosen, records)
    finally:
        model.train(was_training)


def score_items(model, tokenizer, bench: Benchmark, indices: Iterable[int] | None = None,
                batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Per-item correctness (bool array aligned with ``indices``, default all items)."""
    return score_records(model, tokenizer, bench, indices, batch_size, progress, records=False).correct


def accuracy(model, tokenizer, bench: Benchmark, batch_size: int = 64) -> float:
    """Fraction of items correct (convenience over :func:`score_items`)."""
    return float(score_items(model, tokenizer, bench, batch_size=batch_size).mean())


def write_records(path: str | Path, records: list[dict]) -> Path:
    """One JSON object per item, written through a temporary sibling (never a torn file)."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    try:
        return write_text_atomic(path, text)
    except OSError as exc:
        raise EvomergeError(f"cannot write per-item answers to {path} ({exc.strerror or exc})") from None


class _maybe_progress:
    """A transient rich bar over items when asked for and drawn on a terminal (outside one rich would
    leave blank lines in the log); otherwise a no-op ``tick``."""

    def __init__(self, enabled: bool, total: int, name: str):
        self.bar = Progress(transient=True) if enabled else None
        if self.bar is not None and not self.bar.console.is_terminal:
            self.bar = None
        self.total, self.name = total, name

    def __enter__(self):
        if self.bar is None:
            return lambda n: None
        self.bar.__enter__()
        task = self.bar.add_task(f"scoring {self.name}", total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """One prompt's greedy continuation by a plain ``model.generate`` (tokenized as the scorers do),
    stopping at eos: the reference the batched scorers are checked against, and for demos."""
    ids = torch.tensor([prefix_ids(tokenizer) + tokenize(tokenizer, [prompt])[0]], device=model_device(model))
    eos = eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), greedy_defaults(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=greedy_config(tokenizer, max_new_tokens, eos))
    finally:
        model.train(was_training)
    return finish_generation(tokenizer, out[0, ids.shape[1]:].tolist(), eos, (), max_new_tokens).text
