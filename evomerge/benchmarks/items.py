"""Benchmark records: an item, how its prompt is dressed (few-shot, chat), a benchmark.

Scores are per item (correct / wrong) because the IRT estimator needs the full
responses matrix, not just accuracies; what "correct" means is the benchmark's
item kind (`evomerge.benchmarks.kinds`).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from evomerge.console import warn
from evomerge.errors import EvomergeError

EXACT_MATCH = "exact_match"
MULTIPLE_CHOICE = "multiple_choice"
GENERATE = "generate"


@dataclass(frozen=True)
class Item:
    """One benchmark question: ``answer`` (exact match, generate), or ``choices`` + ``label``."""

    id: str
    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None


def infer_kind(has_choices: Iterable[bool], where: str) -> str:
    """The item kind a benchmark's items imply when it names none: multiple choice when they have
    choices, else exact match (the only place a kind is inferred)."""
    kinds = {MULTIPLE_CHOICE if choices else EXACT_MATCH for choices in has_choices}
    if len(kinds) > 1:
        raise EvomergeError(f"{where} mixes exact-match and multiple-choice items; "
                            "split it into one benchmark per format")
    return kinds.pop() if kinds else EXACT_MATCH


@dataclass(frozen=True)
class Shot:
    """A solved example shown before every question (few-shot)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Prompting:
    """What surrounds an item's own prompt when a model sees it.

    ``delimiter`` goes between a prompt and its answer: before every exact-match
    answer and every choice when they are scored, and inside few-shot examples;
    ``separator`` ends each few-shot example. With ``chat`` the examples and the
    question become user / assistant turns of the tokenizer's chat template.
    """

    shots: tuple[Shot, ...] = ()
    chat: bool = False
    delimiter: str = ""
    separator: str = "\n\n"


@dataclass
class Benchmark:
    """A named list of items that all share one item kind.

    ``kind`` is inferred from the items when not given (`infer_kind`); ``settings``
    are the kind's own (generate: max_new_tokens, stop strings, extractor,
    comparison), the kind's defaults when None (`evomerge.benchmarks.kinds`).
    """

    name: str
    items: list[Item]
    source: str = ""
    kind: str | None = None
    settings: Any = None
    prompting: Prompting = field(default_factory=Prompting)
    sampled_from: int | None = None   # a sample (`sampled`): how many items the whole benchmark has

    def __post_init__(self) -> None:
        if not self.items:
            raise EvomergeError(f"{self.where} has no items")
        if self.kind is None:
            self.kind = infer_kind((item.choices is not None for item in self.items), self.where)
        _warn_duplicate_ids(self.items, self.where)

    @property
    def where(self) -> str:
        """How an error names the benchmark: "benchmark 'arith' (runs/zoo/bench/arith.jsonl)"."""
        return f"benchmark {self.name!r} ({self.source or 'in memory'})"

    def __len__(self) -> int:
        return len(self.items)

    def sampled(self, n: int, seed: int = 0) -> "Benchmark":
        """A seeded uniform random ``n`` of its items, in their order (all of them when it has no more).

        A large benchmark studied on a sample costs a search what a benchmark of ``n`` items
        costs; its accuracies estimate the whole benchmark's, off by the sample's own error.
        """
        if n >= len(self.items):
            return self
        keep = sample_indices(len(self.items), n, seed)
        return dataclasses.replace(self, items=[self.items[i] for i in keep], sampled_from=len(self.items),
                                   source=f"{self.source}, a random {n} of its {len(self.items)} items (seed {seed})")


def sample_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """The positions of a benchmark sample (`Benchmark.sampled`): a seeded uniform ``n`` of ``total``, sorted."""
    return sorted(random.Random(seed).sample(range(total), min(n, total)))


def _warn_duplicate_ids(items: list[Item], where: str) -> None:
    """Responses and subsets are kept per item id: a repeated id usually means a file read twice."""
    repeated = {item_id: n for item_id, n in Counter(item.id for item in items).items() if n > 1}
    if repeated:
        first, count = next(iter(repeated.items()))
        warn(f"{where}: {len(repeated)} item id(s) appear more than once (first: {first!r}, {count} times); "
             "duplicated items weigh more in its accuracy")
