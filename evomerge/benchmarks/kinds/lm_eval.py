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
        margins = self.margins(items, results, task)
        if not records:
            return Scored(correct, margins=margins)
        rows = []
        for item, result in zip(items, results):
            row = {"id": item.id, "prompt": item.prompt, **self.answer(item, result, task),
                   "correct": bool(result.correct), "doc_id": result.doc_id, "metric": task.metric,
                   "metrics": {k: _jsonable(v) for k, v in result.metrics.items()}}
            rows.append(row)
        return Scored(correct, rows, margins)

    def answer(self, item: Item, result: DocResult, task: LmEvalTask) -> dict:
        """``generation``, ``extracted``, ``target`` and what else the output type knows."""
        raise NotImplementedError

    def margins(self, items: list[Item], results: list[DocResult], task: LmEvalTask) -> np.ndarray | None:
        """Per-item margins where the output type and metric have them (`Scored.margins`), else None."""
        return None


class LmEvalMultipleChoice(LmEvalKind):
    output_type = "multiple_choice"
    name = kind_name(output_type)

    RANKED_METRICS = ("acc", "acc_norm", "acc_bytes")
    """Metrics that pick the choice of highest (normalised) log-likelihood, so a margin says how far it was."""

    def answer(self, item: Item, result: DocResult, task: LmEvalTask) -> dict:
        loglik, scores = _choice_scores(item, result, task.metric)
        choices = list(item.choices or ())
        pick = int(np.argmax(scores)) if len(scores) else None
        return {"generation": choices[pick] if pick is not None else None, "extracted": pick, "target": item.label,
                "choices": choices, "loglik": [round(v, 4) for v in loglik.tolist()]}

    def margins(self, items: list[Item], results: list[DocResult], task: LmEvalTask) -> np.ndarray | None:
        """The gold choice's score minus the best other's under the task's metric; NaN where that does not
        decide the item as lm-eval did (several golds, ties)."""
        if task.metric not in self.RANKED_METRICS:
            return None
        margins = np.full(len(items), np.nan)
        for i, (item, result) in enumerate(zip(items, results)):
            _, scores = _choice_scores(item, result, task.metric)
            gold = item.label
            one_gold = isinstance(gold, (int, np.integer)) and not isinstance(gold, bool)
            if one_gold and len(scores) > 1 and 0 <= gold < len(scores):
                margin = float(scores[gold] - np.delete(scores, gold).max())
                if (margin > 0) == bool(result.correct):
                    margins[i] = margin
        return margins


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


def _choice_scores(item: Item, result: DocResult, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The choices' log-likelihoods and the scores ``metric`` ranks them by (per character, per byte)."""
    loglik = np.array([float(request.resps[0][0]) for request in result.requests])
    choices = list(item.choices or ())
    scores = loglik[: len(choices)]
    if metric == "acc_norm":
        scores = scores / np.array([float(len(c)) for c in choices])
    elif metric == "acc_bytes":
        scores = scores / np.array([float(len(c.encode("utf-8"))) for c in choices])
    return loglik, scores


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
