"""What the model reads: an item's prompt with its few-shot examples and chat template, as token ids.

Every item kind tokenizes through here, so a prompt is the same text whether it
is scored teacher-forced, by choice likelihoods or by generation. Without
few-shot examples or a chat template the ids are ``<bos> + prompt`` exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from evomerge.benchmarks.items import Benchmark, Item
from evomerge.errors import EvomergeError


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model always has parameters
        return torch.device("cpu")


def prefix_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return token_id
    return 0  # pragma: no cover


def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def check_chat_template(tokenizer, bench_name: str) -> None:
    """``chat: true`` needs a tokenizer that has a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise EvomergeError(f"benchmark {bench_name!r}: chat: true, but the tokenizer "
                            f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) "
                            "has no chat template; remove chat or use a chat model's tokenizer")


def prompt_texts(bench: Benchmark, items: Sequence[Item], tokenizer) -> list[str]:
    """Each item's full prompt text: few-shot examples, then its own prompt, in the chat template if asked."""
    prompting = bench.prompting
    if prompting.chat:
        check_chat_template(tokenizer, bench.name)
        turns = []
        for shot in prompting.shots:
            turns += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.answer}]
        return [tokenizer.apply_chat_template(turns + [{"role": "user", "content": item.prompt}],
                                              tokenize=False, add_generation_prompt=True) for item in items]
    context = "".join(shot.prompt + prompting.delimiter + shot.answer + prompting.separator for shot in prompting.shots)
    return [context + item.prompt for item in items]


def prompt_ids(bench: Benchmark, items: Sequence[Item], tokenizer) -> list[list[int]]:
    """Token ids of each item's full prompt, with ``<bos>`` unless the chat template already wrote it."""
    texts = prompt_texts(bench, items, tokenizer)
    prefix = prefix_ids(tokenizer)
    bos = tokenizer.bos_token
    return [(prefix if not (bench.prompting.chat and bos and text.startswith(bos)) else []) + ids
            for text, ids in zip(texts, tokenize(tokenizer, texts))]
