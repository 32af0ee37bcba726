"""Multiple choice: the choice whose tokens have the highest summed log-likelihood after the prompt."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.batching import run_batches
from evomerge.benchmarks.items import MULTIPLE_CHOICE, Item
from evomerge.benchmarks.kinds.base import ItemKind, RawItem, Scored, ScoringContext
from evomerge.benchmarks.kinds.teacher_forcing import forward_targets, teacher_forced_rows
from evomerge.benchmarks.prompts import pad_id, prompt_ids, tokenize
from evomerge.errors import EvomergeError


def label_index(label, choice_labels=None):
    """An int label, a label among the dataset's own choice labels (ARC: "A".."E" or "1".."5"),
    or a digit / letter label ("2", "C") as many datasets store it."""
    if isinstance(label, str):
        text = label.strip()
        if choice_labels is not None and text in choice_labels:
            return list(choice_labels).index(text)
        if text.isdigit():
            return int(text)
        if len(text) == 1 and "A" <= text.upper() <= "Z":
            return ord(text.upper()) - ord("A")
    return label


class MultipleChoice(ItemKind):
    name = MULTIPLE_CHOICE

    def read_item(self, raw: RawItem) -> Item:
        prompt = raw.text_prompt()
        choices, choice_labels = raw.choices, None
        if isinstance(choices, dict) and isinstance(choices.get("text"), list):
            choices, choice_labels = choices["text"], choices.get("label")  # {"text": [...], "label": [...]} as in ARC
        if choices is None:
            raise raw.error(f"no {raw.column('choices')}")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise raw.error(f"{raw.column('choices')} must be a list of at least two strings")
        if raw.label is None:
            raise raw.error(f"multiple-choice item has no {raw.column('label')}")
        index = label_index(raw.label, choice_labels)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < len(choices):
            raise raw.error(f"{raw.column('label')} {raw.label!r} is not an index into its {len(choices)} choices")
        if any(c == "" for c in choices):
            raise raw.error(f"empty string among {raw.column('choices')}")
        return Item(raw.id, prompt, choices=tuple(choices), label=int(index))

    def check_items(self, items: list[Item], where: str) -> None:
        bad = [item.id for item in items if item.choices is None or item.label is None]
        if bad:
            raise EvomergeError(f"{where}: multiple-choice item {bad[0]!r} has no choices and label")

    def score(self, ctx: ScoringContext, items: list[Item], records: bool) -> Scored:
        tokenizer, delimiter = ctx.tokenizer, ctx.bench.prompting.delimiter
        owners = [i for i, item in enumerate(items) for _ in item.choices]
        prompts_by_item = prompt_ids(ctx.bench, items, tokenizer)
        prompts = [prompts_by_item[i] for i in owners]
        choices = tokenize(tokenizer, [delimiter + c for item in items for c in item.choices])
        for row, tokens in enumerate(choices):
            if not tokens:
                raise EvomergeError(f"item {items[owners[row]].id!r}: a choice tokenizes to nothing")
        loglik = np.zeros(len(owners), dtype=np.float64)
        rows_per_batch = max(1, ctx.batch_size * len(owners) // max(1, len(items)))

        def step(start: int, stop: int) -> None:
            ids, mask = teacher_forced_rows(prompts[start:stop], choices[start:stop], pad_id(tokenizer), ctx.device)
            logits, targets, scored = forward_targets(ctx.model, ids, mask)
            token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            loglik[start:stop] = (token_logp * scored).sum(dim=1).double().cpu().numpy()
            ctx.tick(len(set(owners[start:stop])))

        run_batches(ctx.model, MULTIPLE_CHOICE, len(owners), rows_per_batch, step)
        correct = np.zeros(len(items), dtype=bool)
        chosen = np.zeros(len(items), dtype=int)
        margins = np.zeros(len(items), dtype=np.float64)
        offset = 0
        for i, item in enumerate(items):
            n = len(item.choices)
            scores = loglik[offset : offset + n]
            chosen[i] = int(np.argmax(scores))
            correct[i] = chosen[i] == item.label
            margins[i] = scores[item.label] - np.delete(scores, item.label).max()
            offset += n
        if not records:
            return Scored(correct, margins=margins)
        rows, offset = [], 0
        for item, ok, pick in zip(items, correct, chosen):
            n = len(item.choices)
            rows.append({"id": item.id, "prompt": item.prompt, "generation": item.choices[pick], "extracted": int(pick),
                         "target": item.label, "correct": bool(ok), "choices": list(item.choices),
                         "loglik": [round(float(v), 4) for v in loglik[offset : offset + n]]})
            offset += n
        return Scored(correct, rows, margins)
