"""Batched greedy generation with the KV cache, equal to one-at-a-time greedy decoding.

Prompts are sorted by length and cut into batches of similar lengths (little
padding), left-padded so every row's next token sits in the last column, and
decoded by ``model.generate`` (KV cache, greedy) until every row has produced
a stop string or an end-of-sequence token, or ``max_new_tokens``. There is no
Python loop per item around ``generate``; batches shrink on CUDA out-of-memory
(`evomerge.batching`).

The model's own generation defaults (sampling, repetition penalty, ...) are set
aside for the call: a benchmark is decoded greedily whatever the checkpoint ships.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from evomerge.batching import run_batches
from evomerge.benchmarks.prompts import model_device, pad_id

STOP, EOS, LENGTH = "stop", "eos", "length"
"""Why a generation ended: a stop string, an end-of-sequence token, or max_new_tokens (cut off)."""


@dataclass(frozen=True)
class Generation:
    text: str       # up to (not including) the first stop string or end-of-sequence token
    finish: str     # STOP | EOS | LENGTH
    tokens: int     # new tokens the model produced for it


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the checkpoint's (chat models add an end-of-turn id)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({int(i) for i in ids if i is not None})


def finish_generation(tokenizer, new_tokens: Sequence[int], eos: Sequence[int], stop: Sequence[str],
                      max_new_tokens: int, padding: int | None = None) -> Generation:
    """Cut new tokens at the first end-of-sequence id, their text at the first stop string.

    ``padding``: the id a batch fills finished rows with (trailing ones are dropped).
    """
    tokens = list(new_tokens)
    ended = next((i for i, t in enumerate(tokens) if t in eos), None)
    if ended is not None:
        tokens = tokens[:ended]
    elif padding is not None:
        while tokens and tokens[-1] == padding:
            tokens.pop()
    text = tokenizer.decode(tokens, skip_special_tokens=False)  # stray specials must not vanish
    cuts = [at for at in (text.find(s) for s in stop) if at >= 0]
    if cuts:
        return Generation(text[: min(cuts)], STOP, len(tokens))
    if ended is not None:
        return Generation(text, EOS, len(tokens))
    # a row the batch stopped early ended on a stop string its decoded text spells differently
    return Generation(text, LENGTH if len(tokens) >= max_new_tokens else STOP, len(tokens))


@contextmanager
def greedy_defaults(model):
    """Set the checkpoint's generation defaults aside: ``generate`` fills unset options from them."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def greedy_config(tokenizer, max_new_tokens: int, eos: Sequence[int]):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=list(eos) or None, pad_token_id=pad_id(tokenizer), bos_token_id=tokenizer.bos_token_id,
    )


def stop_criteria(tokenizer, stop: Sequence[str]) -> list:
    """Stop strings as a criterion built once (it indexes the whole vocabulary) and shared by every batch."""
    if not stop:
        return []
    from transformers import StopStringCriteria

    return [StopStringCriteria(tokenizer, list(stop))]


def left_padded(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def generate_greedy(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop: Sequence[str] = (), batch_size: int = 64, stop_at_eos: bool = True,
                    tick: Callable[[int], None] | None = None) -> list[Generation]:
    """Greedy continuations of token-id ``prompts`` (same order), in length-sorted left-padded batches.

    ``stop_at_eos=False`` always produces ``max_new_tokens`` (a fixed amount of work, for timing).
    """
    device = model_device(model)
    eos = eos_ids(model, tokenizer) if stop_at_eos else []
    config = greedy_config(tokenizer, max_new_tokens, eos)
    criteria = stop_criteria(tokenizer, stop)
    pad = pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)

    def step(start: int, end: int) -> None:
        rows = order[start:end]
        ids, mask = left_padded([prompts[i] for i in rows], pad, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=criteria)
        for row, new in zip(rows, out[:, ids.shape[1]:].tolist()):
            results[row] = finish_generation(tokenizer, new, eos, stop, max_new_tokens, padding=pad)
        if tick is not None:
            tick(len(rows))

    with greedy_defaults(model):
        run_batches(model, "generate", len(prompts), batch_size, step)
    return results
