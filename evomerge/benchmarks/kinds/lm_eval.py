"""Items of an lm-eval task, one kind per output type: lm-eval builds the requests and judges the answers.

| kind | lm-eval output type | correct when (default metric) |
|---|---|---|
| `lm_eval_multiple_choice` | multiple_choice | ``acc``: the gold choice has the highest log-likelihood (``acc_norm``: per character) |
| `lm_eval_generate_until` | generate_until | ``exact_match`` (or the task's first metric) of the filtered greedy generation |
| `lm_eval_loglikelihood` | loglikelihood | ``acc``: greedy decoding reproduces the target (lm-eval's ``is_greedy``) |

The benchmark's settings are its `LmEvalTask` (`evomerge.benchmarks.lmeval`);
a ``scoring:`` key cannot name these kinds: the task's output type does.
"""

from __future__ import annotations

import numpy as np

from evomerge.benchmarks.items import Item
from evomerge.benchmarks.kinds.base import ItemKind, RawItem, Scored, ScoringContext
from evomerge.benchmarks.lmeval.tasks import DocResult, LmEvalTask, kind_name
from evomerge.errors import EvomergeError


class LmEvalKind(ItemKind):
    """Scores the documents of an lm-eval task; subclasses say what a record shows of the answer."""

    output_type = ""
    selectable = False

    def read_item(self, raw: RawItem) -> Item:
        raise raw.error("items of an lm_eval benchmark come from its task, not from records")

    def score(self, ctx: ScoringContext, items: list[Item], records: bool) -> Scored:
        task = ctx.bench.settings
        if not isinstance(task, LmEvalTask):
            raise EvomergeError(f"{ctx.bench.where}: {self.name} items need the lm-eval task they came from "
                                "(load the benchmark with lm_eval: TASK)")
        unknown = [item.id for item in items if item.id not in task.doc_ids]
        if unknown:
            raise EvomergeError(f"{ctx.bench.where}: item {unknown[0]!r} is not a document of lm-eval task "
                                f"{task.options.task!r}")
        results = task.evaluate(ctx.model, ctx.tokenizer, items, ctx.batch_size, ctx.tick)
        correct = np.array([result.correct for result in results], dtype=bool)
        if not records:
            return Scored(correct)
        rows = []
        for item, result in zip(items, results):
            row = {"id": item.id, "prompt": item.prompt, **self.answer(item, result, task),
                   "correct": bool(result.correct), "doc_id": result.doc_id, "metric": task.metric,
                   "metrics": {k: _jsonable(v) for k, v in result.metrics.items()}}
            rows.append(row)
        return Scored(correct, rows)

    def answer(self, item: Item, result: DocResult, task: LmEvalTask) -> dict:
        """``generation``, ``extracted``, ``target`` and what else the output type knows."""
        raise NotImplementedError


class LmEvalMultipleChoice(LmEvalKind):
    output_type = "multiple_choice"
    name = kind_name(output_type)

    def answer(self, item: Item, result: DocResult, task: LmEvalTask) -> dict:
        loglik = np.array([float(request.resps[0][0]) for request in result.requests])
        choices = list(item.choices or ())
        scores = loglik[: len(choices)]
        if task.metric == "acc_norm":
            scores = scores / np.array([float(len(c)) for c in choices])
        elif task.metric == "acc_bytes":
            scores = scores / np.array([float(len(c.encode("utf-8"))) for c in choices])
        pick = int(np.argmax(scores)) if len(scores) else None
        return {"generation": choices[pick] if pick is not None else None, "extracted": pick, "target": item.label,
                "choices": choices, "loglik": [round(v, 4) for v in loglik.tolist()]}


class LmEvalGenerateUntil(LmEvalKind):
    output_type = "generate_until"
    name = kind_name(output_type)

    def answer(self, item: Item, result: DocResult, task: LmEvalTask) -> dict:
        request = result.requests[0]
        return {"generation": request.resps[0], "extracted": _jsonable(request.filtered_resps[task.filter]),
                "target": _jsonable(task.task.doc_to_target(result.doc)), "filter": task.filter}


class LmEvalLoglikelihood(LmEvalKind):
    output_type = "loglikelihood"
    name = kind_name(output_type)

    def answer(self, item: Item, result: DocResult, task: LmEvalTask) -> dict:
        loglik, greedy = result.requests[0].resps[0]
        return {"generation": item.answer if greedy else None, "extracted": bool(greedy), "target": item.answer,
                "loglik": round(float(loglik), 4)}


def _jsonable(value):
    """Per-item metric values as JSON: numbers as floats, strings kept, anything else as text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return str(value)
