"""An lm-eval task as an evomerge benchmark: its documents become items, lm-eval builds and judges them.

lm-eval's own classes do everything but the model: ``TaskManager`` loads the
task (a registered name or a YAML), ``build_all_requests`` writes every
document's requests (``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``,
few-shot examples drawn in document order with lm-eval's seed, delimiters,
description, chat template), the task's filter ensembles post-process the
answers and ``process_results`` gives the per-item metrics. evomerge supplies
the log-likelihoods and generations (`evomerge.benchmarks.lmeval.model`), for
any subset of the documents, and reads one metric as correct / wrong.

Requests are built once, over all documents in order (a subset alone would draw
other few-shot examples than lm-eval does); with a chat template they are built
when the tokenizer is known. The settings ``simple_evaluate`` applies to a task
are applied the same way here: its seeds while the task loads, ``num_fewshot``
(a YAML's explicit 0 is kept), the few-shot seed and generation overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evomerge.benchmarks.items import Benchmark, Item
from evomerge.benchmarks.lmeval.model import in_memory_lm, render_chat
from evomerge.benchmarks.lmeval.options import LmEvalOptions, key_at, require_lm_eval, warn_other_version
from evomerge.errors import EvomergeError

SCORED_OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood")
NOT_CORRECT_OR_WRONG = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "f1", "mcc",
                        "brier_score", "likelihood", "bleu", "chrf", "ter"}
"""Metrics that are not a per-item right / wrong answer: never the default, and refused when asked for."""


def kind_name(output_type: str) -> str:
    """The item kind (registry name) of an lm-eval output type: ``lm_eval_multiple_choice``, ..."""
    return f"lm_eval_{output_type}"


@dataclass
class DocResult:
    """One document's answers as lm-eval holds them, and its per-item metrics."""

    doc_id: int
    doc: dict
    requests: list          # lm-eval Instances, in request order (idx), with resps and filtered_resps
    metrics: dict
    correct: bool


@dataclass
class LmEvalTask:
    """A loaded lm-eval task: the benchmark's settings (its items' documents, requests, metric, filter)."""

    task: Any                       # lm_eval.api.task.Task
    options: LmEvalOptions
    where: str
    doc_ids: dict[str, int]         # item id -> document index in the task's evaluation split
    docs: dict[int, dict]
    limit: int | None
    metric: str
    filter: str
    _requests: dict = field(default_factory=dict)   # chat key -> {doc_id: [Instance, ...]}

    @property
    def output_type(self) -> str:
        return self.task.OUTPUT_TYPE

    def requests(self, tokenizer=None) -> dict[int, list]:
        """Every document's lm-eval requests (built once per chat template: they depend on the tokenizer then)."""
        chat = self.options.apply_chat_template
        if chat and tokenizer is None:
            raise EvomergeError(f"{self.where}: apply_chat_template needs the model's tokenizer to build prompts")
        key = (id(tokenizer), getattr(tokenizer, "chat_template", None)) if chat else None
        if key not in self._requests:
            self._requests[key] = self._build(tokenizer if chat else None)
        return self._requests[key]

    def _build(self, tokenizer) -> dict[int, list]:
        options = self.options
        renderer = None
        if tokenizer is not None:
            if getattr(tokenizer, "chat_template", None) is None:
                raise EvomergeError(f"{key_at(self.where, 'apply_chat_template')}: the tokenizer "
                                    f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has "
                                    "no chat template")
            renderer = functools.partial(render_chat, tokenizer)
        self.task.set_fewshot_seed(seed=options.fewshot_seed)
        try:
            with _quiet_logs():
                self.task.build_all_requests(
                    limit=self.limit, rank=0, world_size=1, system_instruction=options.system_instruction,
                    apply_chat_template=options.apply_chat_template,
                    fewshot_as_multiturn=options.fewshot_as_multiturn, chat_template=renderer,
                    tokenizer_name=str(getattr(tokenizer, "name_or_path", "")).replace("/", "__") if renderer else "")
        except EvomergeError:
            raise
        except Exception as exc:
            raise EvomergeError(f"{self.where}: lm-eval could not build the task's prompts ({_one_line(exc)})") from None
        by_doc: dict[int, list] = {}
        for instance in self.task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        for instances in by_doc.values():
            instances.sort(key=lambda inst: inst.idx)
        return by_doc

    def evaluate(self, model, tokenizer, items: list[Item], batch_size: int,
                 tick: Callable[[int], None]) -> list[DocResult]:
        """Answer the items' requests with ``model`` and judge them with the task's filters and
        ``process_results`` (the loop of ``lm_eval.evaluator.evaluate``, on these documents only)."""
        built = self.requests(tokenizer)
        doc_ids = [self.doc_ids[item.id] for item in items]
        fresh = {d: [dataclasses.replace(r, resps=[], filtered_resps={}) for r in built[d]] for d in set(doc_ids)}
        lm = in_memory_lm(model, tokenizer, batch_size * max(len(r) for r in fresh.values()))
        for start in range(0, len(doc_ids), batch_size):
            chunk = [r for d in dict.fromkeys(doc_ids[start:start + batch_size]) for r in fresh[d]]
            for request_type in dict.fromkeys(r.request_type for r in chunk):
                asked = [r for r in chunk if r.request_type == request_type]
                for request, answer in zip(asked, getattr(lm, request_type)(asked, disable_tqdm=True)):
                    request.resps.append(answer)
            tick(min(batch_size, len(doc_ids) - start))
        every = [r for d in dict.fromkeys(doc_ids) for r in fresh[d]]
        for ensemble in getattr(self.task, "_filters", []):
            ensemble.apply(every)
        results = []
        for doc_id in doc_ids:
            requests = fresh[doc_id]
            metrics = self.task.process_results(self.docs[doc_id], [r.filtered_resps[self.filter] for r in requests])
            results.append(DocResult(doc_id, self.docs[doc_id], requests, metrics, self._correct(metrics, doc_id)))
        return results

    def _correct(self, metrics: dict, doc_id: int) -> bool:
        value = metrics.get(self.metric)
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and float(value) in (0.0, 1.0):
            return float(value) == 1.0
        raise EvomergeError(f"{key_at(self.where, 'metric')}: {self.metric} of document {doc_id} is {value!r}, "
                            "not right (1) or wrong (0); choose a per-item correct/wrong metric among "
                            f"{', '.join(metrics)}")


def load_lm_eval_task(options: LmEvalOptions, name: str, where: str, tokenizer=None) -> Benchmark:
    """The benchmark of an lm-eval task: one item per document (the first ``limit``), scored by
    the kind of its output type. With ``tokenizer``, chat prompts are built (and checked) now."""
    require_lm_eval(f"{key_at(where, 'lm_eval')}: task {options.task!r}")
    warn_other_version()
    task = _load_task(options, where)
    from lm_eval.evaluator_utils import get_sample_size

    limit = get_sample_size(task, options.limit)
    docs = dict(task.doc_iterator(rank=0, limit=limit, world_size=1))
    if not docs:
        raise EvomergeError(f"{where}: lm-eval task {options.task!r} has no documents")
    metric, filter_name = _metric(task, options, where), _filter(task, options, where)
    task_name = task.task_name
    items, doc_ids = [], {}
    for doc_id, doc in docs.items():
        item = _item(task, f"{task_name}-{doc_id:04d}", doc)
        items.append(item)
        doc_ids[item.id] = doc_id
    settings = LmEvalTask(task, options, where, doc_ids, docs, limit, metric, filter_name)
    if not options.apply_chat_template or tokenizer is not None:
        settings.requests(tokenizer)
    source = f"lm_eval {options.task}"
    return Benchmark(name, items, source=source, kind=kind_name(task.OUTPUT_TYPE), settings=settings)


def lm_eval_prompts(options: LmEvalOptions, name: str, split: str) -> list[Item]:
    """Unlabelled prompts for data-informed merging from another split of the task's dataset: each
    document's ``doc_to_text`` (and choices, for multiple choice), never its target."""
    where = f"benchmark {name!r}"
    task = _load_task(options, where)
    config = task.config
    scored = config.test_split if config.test_split is not None else config.validation_split
    splits = list(getattr(task, "dataset", None) or {})
    if split == scored:
        raise EvomergeError(f"{where}: data split {split!r} is the split lm-eval scores; give another split, or "
                            "`data: self` for its prompts on purpose (the transductive setting)")
    if split not in splits:
        raise EvomergeError(f"{where}: data: lm-eval task {options.task!r} has no split {split!r}; its splits: "
                            f"{', '.join(splits) or 'none'}")
    docs = task.dataset[split]
    if config.process_docs is not None:
        docs = config.process_docs(docs)
    prompts = [_item(task, f"{task.task_name}-{split}-{index:04d}", doc) for index, doc in enumerate(docs)]
    if not prompts:
        raise EvomergeError(f"{where}: data: split {split!r} of lm-eval task {options.task!r} has no documents")
    return [Item(item.id, item.prompt, choices=item.choices) for item in prompts]


def _load_task(options: LmEvalOptions, where: str):
    """The one task ``options.task`` names, loaded under ``simple_evaluate``'s seeds, with its settings applied."""
    at = key_at(where, "lm_eval")
    manager = _task_manager(options.is_file)
    spec = str(Path(options.task).expanduser().resolve()) if options.is_file else options.task
    if not options.is_file and spec not in manager.all_tasks:
        close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
        raise EvomergeError(f"{at}: {spec!r} is not an lm-eval task name"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + " nor a task file (path/to/task.yaml)")
    try:
        with _lm_eval_seeds(), _quiet_logs():
            loaded = manager.load([spec])
    except Exception as exc:
        raise EvomergeError(f"{at}: lm-eval could not load task {options.task!r} ({_one_line(exc)})") from None
    tasks = loaded["tasks"]
    if len(tasks) != 1:
        raise EvomergeError(f"{at}: {options.task!r} is a group of {len(tasks)} tasks ({', '.join(list(tasks)[:5])}"
                            f"{', ...' if len(tasks) > 5 else ''}); name one task per benchmark")
    task = next(iter(tasks.values()))
    output_type = task.OUTPUT_TYPE
    if output_type not in SCORED_OUTPUT_TYPES:
        raise EvomergeError(f"{at}: task {task.task_name!r} has output type {output_type}, which has no per-item "
                            f"right or wrong answer; evomerge scores {', '.join(SCORED_OUTPUT_TYPES)}")
    if getattr(task, "MULTIMODAL", False) or getattr(task, "UNSAFE_CODE", False):
        raise EvomergeError(f"{at}: task {task.task_name!r} is multimodal or runs generated code; evomerge scores "
                            "text tasks only")
    if (task.get_config("repeats") or 1) > 1:
        raise EvomergeError(f"{at}: task {task.task_name!r} repeats each request; evomerge scores one greedy answer")
    if output_type == "generate_until":
        if options.gen_kwargs:
            task.set_config(key="generation_kwargs", value=dict(options.gen_kwargs), update=True)
        if (task.get_config("generation_kwargs") or {}).get("do_sample"):
            raise EvomergeError(f"{at}: task {task.task_name!r} samples its generations (do_sample: true); "
                                "evomerge scores greedy decoding only (set gen_kwargs: {do_sample: false})")
    elif options.gen_kwargs:
        raise EvomergeError(f"{key_at(where, 'gen_kwargs')}: applies to generate_until tasks; "
                            f"{task.task_name!r} is {output_type}")
    if options.num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=options.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    return task


@functools.cache
def _task_manager(files_only: bool):
    """lm-eval's task index (about 10 s for the registered tasks, so kept per process); a YAML alone needs none."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=not files_only)


def _metric(task, options: LmEvalOptions, where: str) -> str:
    """The metric read as correct / wrong: the one asked for, else the task's first correct/wrong one."""
    names = list(task.aggregation())
    if options.metric is not None:
        if options.metric not in names:
            raise EvomergeError(f"{key_at(where, 'metric')}: task {task.task_name!r} has no metric "
                                f"{options.metric!r}; its metrics: {', '.join(names)}")
        if options.metric in NOT_CORRECT_OR_WRONG:
            raise EvomergeError(f"{key_at(where, 'metric')}: {options.metric} is not a per-item right/wrong "
                                "metric (IRT estimation needs one)")
        return options.metric
    for name in names:
        if name not in NOT_CORRECT_OR_WRONG:
            return name
    raise EvomergeError(f"{key_at(where, 'lm_eval')}: task {task.task_name!r} has no per-item right/wrong metric "
                        f"(its metrics: {', '.join(names)})")


def _filter(task, options: LmEvalOptions, where: str) -> str:
    """The filter pipeline whose answers are judged: the one asked for, else the task's first."""
    names = [ensemble.name for ensemble in getattr(task, "_filters", [])] or ["none"]
    if options.filter is None:
        return names[0]
    if options.filter not in names:
        raise EvomergeError(f"{key_at(where, 'filter')}: task {task.task_name!r} has no filter {options.filter!r}; "
                            f"its filters: {', '.join(names)}")
    return options.filter


def _item(task, item_id: str, doc: dict) -> Item:
    """A document as an item: its own prompt (no few-shot examples) and its target, for records and subsets."""
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = [str(c) for c in task.doc_to_choice(doc)]
        if isinstance(text, int):   # several contexts, one continuation (winogrande): the contexts are the choices
            label, prompt = text, ""
        else:
            label, prompt = target, str(text)
        if isinstance(label, list):
            label = label[0] if label else None
        if isinstance(label, str):
            label = choices.index(label) if label in choices else None
        return Item(item_id, prompt, choices=tuple(choices),
                    label=int(label) if isinstance(label, (int, np.integer)) and 0 <= label < len(choices) else None)
    answer = target[0] if isinstance(target, list) and target else target
    return Item(item_id, str(text), answer=str(answer))


@contextlib.contextmanager
def _lm_eval_seeds():
    """``simple_evaluate``'s global seeds (random 0, numpy 1234) while a task loads: a task that shuffles
    its documents with them gets lm-eval's order. The caller's random state is restored after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(0)
    np.random.seed(1234)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet_logs():
    """lm-eval logs every step at INFO while it loads and builds; a search prints its own progress."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
