"""Item kinds, one module each, behind one registry (`KINDS`, `get_kind`).

| module | kind | correct when |
|---|---|---|
| `exact_match.py` | exact_match | greedy decoding reproduces the answer (one teacher-forced pass) |
| `multiple_choice.py` | multiple_choice | the labelled choice has the highest log-likelihood |
| `generate.py` | generate | the answer extracted from a greedy generation equals the target |
| `lm_eval.py` | lm_eval_multiple_choice, lm_eval_generate_until, lm_eval_loglikelihood | the lm-eval task's own per-item metric (acc, acc_norm, exact_match, ...) |

`base.py` holds the `ItemKind` interface (read an item from a record, score a
batch, per-item records); `teacher_forcing.py` the one-forward-pass core of
the first two. A new kind is one `ItemKind` subclass passed to `register`.
"""

from __future__ import annotations

from evomerge.benchmarks.kinds.base import ItemKind, RawItem, Scored, ScoringContext
from evomerge.benchmarks.kinds.exact_match import ExactMatch
from evomerge.benchmarks.kinds.generate import Generate, GenerateSettings
from evomerge.benchmarks.kinds.lm_eval import LmEvalGenerateUntil, LmEvalLoglikelihood, LmEvalMultipleChoice
from evomerge.benchmarks.kinds.multiple_choice import MultipleChoice
from evomerge.errors import EvomergeError

KINDS: dict[str, ItemKind] = {}


def register(kind: ItemKind) -> ItemKind:
    if kind.name in KINDS:
        raise ValueError(f"item kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def selectable_kinds() -> list[str]:
    """The kinds a benchmark entry's ``scoring:`` may name (an lm-eval task's kind is its output type's)."""
    return [name for name, kind in KINDS.items() if kind.selectable]


def get_kind(name: str, where: str = "benchmark") -> ItemKind:
    kind = KINDS.get(name)
    if kind is None:
        raise EvomergeError(f"{where}: scoring {name!r} is unknown; choose one of {', '.join(selectable_kinds())}")
    return kind


for _kind in (ExactMatch(), MultipleChoice(), Generate(), LmEvalMultipleChoice(), LmEvalGenerateUntil(),
              LmEvalLoglikelihood()):
    register(_kind)

__all__ = ["KINDS", "ItemKind", "RawItem", "Scored", "ScoringContext", "GenerateSettings", "get_kind", "register",
           "selectable_kinds"]
