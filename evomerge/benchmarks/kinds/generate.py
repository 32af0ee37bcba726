"""Generate: greedy decoding (batched, KV cache) until a stop string or end of sequence, then the
final answer is extracted and compared with the target (a chain of thought is judged by its answer).

An empty generation, one cut off at ``max_new_tokens`` (its answer may be truncated) or one with no
extractable answer is a wrong answer, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from evomerge.benchmarks.answers import Comparison, Extractor, parse_comparison, parse_extractor
from evomerge.benchmarks.generation import LENGTH, generate_greedy
from evomerge.benchmarks.items import GENERATE, Item
from evomerge.benchmarks.kinds.base import AnswerKind, Scored, ScoringContext
from evomerge.benchmarks.prompts import prompt_ids
from evomerge.errors import EvomergeError

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerateSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()              # end-of-sequence always stops too
    extract: Extractor = field(default_factory=Extractor)
    compare: Comparison = field(default_factory=Comparison)


class Generate(AnswerKind):
    name = GENERATE
    option_keys = ("max_new_tokens", "stop", "extract", "compare")

    def settings(self, options: Mapping[str, Any], where: str) -> GenerateSettings:
        max_new_tokens = options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EvomergeError(f"{where}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        stop = options.get("stop", ()) or ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise EvomergeError(f"{where}: stop must be a list of non-empty strings such as ['\\n\\n', 'Question:']")
        return GenerateSettings(max_new_tokens, tuple(stop), parse_extractor(options.get("extract"), where),
                                parse_comparison(options.get("compare"), where))

    def score(self, ctx: ScoringContext, items: list[Item], records: bool) -> Scored:
        settings: GenerateSettings = self.settings_of(ctx.bench)
        prompts = prompt_ids(ctx.bench, items, ctx.tokenizer)
        generations = generate_greedy(ctx.model, ctx.tokenizer, prompts, settings.max_new_tokens, settings.stop,
                                      batch_size=ctx.batch_size, tick=ctx.tick)
        correct = np.zeros(len(items), dtype=bool)
        rows = []
        for i, (item, generation) in enumerate(zip(items, generations)):
            extracted = settings.extract(generation.text) if generation.finish != LENGTH else None
            target = settings.extract.target(item.answer)
            correct[i] = settings.compare(extracted, target)
            if records:
                rows.append({"id": item.id, "prompt": item.prompt, "generation": generation.text,
                             "extracted": extracted, "target": target, "correct": bool(correct[i]),
                             "finish": generation.finish, "new_tokens": generation.tokens})
        return Scored(correct, rows if records else None)
