"""Exact match, teacher-forced: ``prompt answer <eos>`` is fed once and the item is correct iff the
argmax at every answer position and at the end-of-answer position equals the target -- exactly
the answer greedy decoding would produce, at the cost of one forward pass. Its margin is the
smallest lead of the target's logit over the best other token along the answer (positive iff
correct)."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.batching import run_batches
from evomerge.benchmarks.items import EXACT_MATCH, Item
from evomerge.benchmarks.kinds.base import AnswerKind, Scored, ScoringContext
from evomerge.benchmarks.kinds.teacher_forcing import forward_targets, teacher_forced_rows
from evomerge.benchmarks.prompts import pad_id, prompt_ids, tokenize
from evomerge.errors import EvomergeError


class ExactMatch(AnswerKind):
    name = EXACT_MATCH

    def score(self, ctx: ScoringContext, items: list[Item], records: bool) -> Scored:
        tokenizer = ctx.tokenizer
        if tokenizer.eos_token_id is None:
            raise EvomergeError("exact-match scoring needs a tokenizer with an eos token")
        prompts = prompt_ids(ctx.bench, items, tokenizer)
        delimiter = ctx.bench.prompting.delimiter
        answers = [a + [tokenizer.eos_token_id] for a in tokenize(tokenizer, [delimiter + item.answer for item in items])]
        correct = np.zeros(len(items), dtype=bool)
        margins = np.zeros(len(items), dtype=np.float64)
        predicted: list[list[int]] = [[] for _ in items]

        def step(start: int, stop: int) -> None:
            ids, mask = teacher_forced_rows(prompts[start:stop], answers[start:stop], pad_id(tokenizer), ctx.device)
            logits, targets, scored = forward_targets(ctx.model, ids, mask)
            argmax = logits.argmax(dim=-1)
            correct[start:stop] = ((argmax == targets) | ~scored).all(dim=1).cpu().numpy()
            best = logits.topk(2, dim=-1)   # the best other token without copying the logits
            other = torch.where(best.indices[..., 0] == targets, best.values[..., 1], best.values[..., 0])
            lead = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - other
            margins[start:stop] = lead.masked_fill(~scored, float("inf")).min(dim=1).values.double().cpu().numpy()
            if records:
                for row, (guess, where) in enumerate(zip(argmax.tolist(), scored.tolist())):
                    predicted[start + row] = [t for t, s in zip(guess, where) if s]
            ctx.tick(stop - start)

        run_batches(ctx.model, EXACT_MATCH, len(items), ctx.batch_size, step)
        if not records:
            return Scored(correct, margins=margins)
        rows = []
        for item, ok, guess in zip(items, correct, predicted):
            ended = guess.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in guess else len(guess)
            text = tokenizer.decode(guess[:ended], skip_special_tokens=False)
            rows.append({"id": item.id, "prompt": item.prompt, "generation": text, "extracted": text,
                         "target": item.answer, "correct": bool(ok), "scoring": "teacher-forced argmax"})
        return Scored(correct, rows, margins)
