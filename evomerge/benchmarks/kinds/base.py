"""What an item kind answers: how its items are read, how a batch is scored, what it records per item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from evomerge.benchmarks.items import Benchmark, Item
from evomerge.errors import EvomergeError


@dataclass
class RawItem:
    """One record's values for the item keys, after the column mapping and the prompt template."""

    id: str
    prompt: Any
    answer: Any
    choices: Any
    label: Any
    fields: Mapping[str, str]   # item key -> column, for error messages
    at: str                     # "benchmark 'x' (file), item 'id'"

    def column(self, key: str) -> str:
        """How an error names an item key: 'label', or 'label' (column 'answerKey') when mapped."""
        return f"'{key}' (column {self.fields[key]!r})" if key in self.fields else f"'{key}'"

    def error(self, message: str) -> EvomergeError:
        return EvomergeError(f"{self.at}: {message}")

    def text_prompt(self) -> str:
        if not isinstance(self.prompt, str):
            raise self.error(f"missing or non-string {self.column('prompt')}")
        return self.prompt

    def text_answer(self) -> str:
        answer = self.answer
        if answer is None:
            raise self.error(f"no {self.column('answer')} (exact match) or {self.column('choices')} + "
                             f"{self.column('label')} (multiple choice)")
        if isinstance(answer, (int, float, np.integer, np.floating)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or answer == "":
            raise self.error(f"{self.column('answer')} must be a non-empty string")
        return answer


@dataclass
class ScoringContext:
    """What every scorer needs besides its items."""

    model: Any
    tokenizer: Any
    bench: Benchmark
    batch_size: int
    device: Any
    tick: Callable[[int], None]


@dataclass
class Scored:
    """Per-item correctness, the per-item records (for the jsonl) when they were asked for, and
    the per-item margins where the kind has them: how far the right answer's log-likelihood lies
    above the best wrong one's (positive iff correct). The margin estimator reads a merge's skill
    from these far more precisely than from right/wrong alone."""

    correct: np.ndarray
    records: list[dict] | None = None
    margins: np.ndarray | None = None


class ItemKind:
    """One way of deciding whether a model answers an item correctly (a registry entry).

    ``option_keys`` are the benchmark-entry keys only this kind accepts; ``settings``
    checks them (errors name ``where``) and returns the kind's settings object.
    Every record has ``id``, ``prompt``, ``generation``, ``extracted``, ``target`` and ``correct``.
    """

    name: str = ""
    option_keys: tuple[str, ...] = ()
    selectable = True   # a benchmark entry's ``scoring:`` may name it (lm-eval kinds come from the task instead)

    def settings(self, options: Mapping[str, Any], where: str) -> Any:
        return None

    def settings_of(self, bench: Benchmark) -> Any:
        """The benchmark's settings for this kind: its own, else the kind's defaults."""
        return bench.settings if bench.settings is not None else self.settings({}, bench.where)

    def read_item(self, raw: RawItem) -> Item:
        raise NotImplementedError

    def check_items(self, items: list[Item], where: str) -> None:
        """Items built in Python (not read from records) fit this kind: checked before they are scored."""

    def score(self, ctx: ScoringContext, items: list[Item], records: bool) -> Scored:
        raise NotImplementedError


class AnswerKind(ItemKind):
    """Kinds whose items are a prompt and a target answer (exact match, generate)."""

    def read_item(self, raw: RawItem) -> Item:
        return Item(raw.id, raw.text_prompt(), answer=raw.text_answer())

    def check_items(self, items: list[Item], where: str) -> None:
        missing = [item.id for item in items if not item.answer]
        if missing:
            raise EvomergeError(f"{where}: {self.name} item {missing[0]!r} has no answer")
