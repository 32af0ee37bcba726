"""Reading benchmarks: files, folders, datasets and hub ids; column mapping, prompt templates,
splits, presets and few-shot examples; every entry option checked before any data is read.

An entry's options are the search-space benchmark keys (docs/estimate.md):
``fields``, ``template``, ``split``, ``config``, ``scoring``, ``preset``, ``fewshot``,
``chat``, ``delimiter``, ``choices`` and the item kind's own (generate: ``max_new_tokens``,
``stop``, ``extract``, ``compare``); or ``lm_eval`` and its keys (`evomerge.benchmarks.lmeval`).
Errors name the benchmark and the option.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evomerge.benchmarks.hub import describe, is_hub_id, load_hub_dataset
from evomerge.benchmarks.items import MULTIPLE_CHOICE, Benchmark, Item, Prompting, Shot, infer_kind
from evomerge.benchmarks.kinds import KINDS, ItemKind, RawItem, get_kind, selectable_kinds
from evomerge.benchmarks.lmeval import (
    LMEVAL_KEYS,
    LmEvalOptions,
    check_lm_eval_options,
    lm_eval_prompts,
    load_lm_eval_task,
)
from evomerge.benchmarks.presets import ROW_ADAPTERS, with_preset
from evomerge.benchmarks.prompts import check_chat_template
from evomerge.errors import EvomergeError

ITEM_KEYS = ("id", "prompt", "answer", "choices", "label")
TABULAR_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
FORMAT_KEYS = ("fields", "template", "split", "config", "scoring", "preset", "fewshot", "chat", "delimiter", "choices")
FEWSHOT_KEYS = ("n", "split", "path", "seed", "column", "separator")


def option_keys() -> tuple[str, ...]:
    """Every key a benchmark entry may set besides name, path and weight."""
    return FORMAT_KEYS + tuple(k for kind in KINDS.values() for k in kind.option_keys) + LMEVAL_KEYS


@dataclass(frozen=True)
class FewShot:
    """``n`` solved examples from ``split`` of the same data or from ``path``, drawn by ``seed``."""

    n: int = 0
    split: str | None = None
    path: str | None = None
    seed: int = 0
    column: str | None = None     # the column whose text follows a shot's prompt (default: its answer)
    separator: str = "\n\n"


@dataclass(frozen=True)
class BenchmarkFormat:
    """A benchmark entry's options, checked (with its preset applied)."""

    fields: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    split: str | None = None
    config: str | None = None       # a hub dataset's configuration (``load_dataset(id, config)``)
    scoring: str | None = None      # None: inferred from the items (choices: multiple choice)
    settings: Any = None            # the kind's settings when scoring is known
    fewshot: FewShot = field(default_factory=FewShot)
    chat: bool = False
    delimiter: str = ""
    choices: tuple[str, ...] | None = None
    preset: str | None = None
    lm_eval: LmEvalOptions | None = None   # an lm-eval task: its YAML sets prompts and scoring instead


def check_format(options: Mapping[str, Any] | None, where: str) -> BenchmarkFormat:
    """Check a benchmark entry's options (no data read); ``where`` starts every error message."""
    if "lm_eval" in (options or {}):
        return BenchmarkFormat(lm_eval=check_lm_eval_options(options, where, own_keys=option_keys()))
    lm_eval_only = sorted(set(options or {}) & set(LMEVAL_KEYS))
    if lm_eval_only:
        raise EvomergeError(f"{where}: {lm_eval_only[0]} applies to lm_eval tasks only (an entry with lm_eval: "
                            "TASK or lm_eval: path/to/task.yaml)")
    options = with_preset(dict(options or {}), where)
    unknown = sorted(set(options) - set(option_keys()))
    if unknown:
        raise EvomergeError(f"{where}: unknown option {unknown[0]!r}; options are {', '.join(option_keys())}")
    fields = options.get("fields") or {}
    if not isinstance(fields, dict):
        raise EvomergeError(f"{where}: fields must map item keys to column names")
    bad_keys = sorted(set(fields) - set(ITEM_KEYS))
    if bad_keys:
        raise EvomergeError(f"{where}: fields maps unknown item key {bad_keys[0]!r}; item keys are {', '.join(ITEM_KEYS)}")
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise EvomergeError(f"{where}: fields must map item keys to column names (strings)")
    template = options.get("template")
    if template is not None and not isinstance(template, str):
        raise EvomergeError(f"{where}: template must be a string such as 'Question: {{question}} Answer:'")
    split, config = options.get("split"), options.get("config")
    if split is not None and not isinstance(split, str):
        raise EvomergeError(f"{where}: split must be a string")
    if config is not None and (not isinstance(config, str) or not config):
        raise EvomergeError(f"{where}: config must be the name of a hub dataset's configuration (e.g. main)")
    chat = options.get("chat", False)
    if not isinstance(chat, bool):
        raise EvomergeError(f"{where}: chat must be true or false")
    delimiter = options.get("delimiter", "")
    if not isinstance(delimiter, str):
        raise EvomergeError(f"{where}: delimiter must be a string (text between a prompt and its answer, e.g. ' ')")
    choices = options.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) and c for c in choices)):
        raise EvomergeError(f"{where}: choices must be a list of at least two non-empty strings (the same "
                            "answers for every item, e.g. [A, B, C, D])")
    scoring = _scoring(options, choices, where)
    kind_options = {k: v for k, v in options.items() if k not in FORMAT_KEYS}
    settings = get_kind(scoring, where).settings(kind_options, where) if scoring else None
    return BenchmarkFormat(dict(fields), template, split, config, scoring, settings,
                           _fewshot(options.get("fewshot"), where), chat, delimiter,
                           tuple(choices) if choices else None, options.get("preset"))


def _scoring(options: Mapping[str, Any], choices, where: str) -> str | None:
    """The entry's item kind: named, implied by its kind-only options or fixed choices, or None (from the data)."""
    scoring = options.get("scoring")
    if scoring is not None and not isinstance(scoring, str):
        raise EvomergeError(f"{where}: scoring must be one of {', '.join(selectable_kinds())}")
    if scoring is not None and scoring not in selectable_kinds():
        get_kind(scoring, where)
        raise EvomergeError(f"{where}: scoring {scoring!r} comes from an lm_eval task's output type; "
                            f"choose one of {', '.join(selectable_kinds())}, or name the task with lm_eval")
    owners = {name for name, kind in KINDS.items() for key in kind.option_keys if key in options}
    if scoring is None and len(owners) == 1:
        scoring = owners.pop()
    elif scoring is None and choices is not None:
        scoring = MULTIPLE_CHOICE
    for name, kind in KINDS.items():
        foreign = [key for key in kind.option_keys if key in options and name != scoring]
        if foreign:
            raise EvomergeError(f"{where}: {foreign[0]} applies to scoring: {name} only (this benchmark is "
                                f"scored {scoring or 'by exact match or multiple choice'})")
    if choices is not None and scoring != MULTIPLE_CHOICE:
        raise EvomergeError(f"{where}: choices applies to scoring: multiple_choice only")
    return scoring


def _fewshot(spec, where: str) -> FewShot:
    if spec is None:
        return FewShot()
    if not isinstance(spec, dict):
        raise EvomergeError(f"{where}: fewshot must be a mapping such as {{n: 3, split: train, seed: 0}}")
    unknown = sorted(set(spec) - set(FEWSHOT_KEYS))
    if unknown:
        raise EvomergeError(f"{where}: unknown key fewshot.{unknown[0]}; expected one of {', '.join(FEWSHOT_KEYS)}")
    n, seed = spec.get("n", 0), spec.get("seed", 0)
    for key, value in (("n", n), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EvomergeError(f"{where}: fewshot.{key} must be an integer >= 0, got {value!r}")
    for key in ("split", "path", "column", "separator"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise EvomergeError(f"{where}: fewshot.{key} must be a string")
    if n and (spec.get("split") is None) == (spec.get("path") is None):
        raise EvomergeError(f"{where}: fewshot needs exactly one of split (of the same data) or path (a file of "
                            "examples): the examples must never be the scored items")
    return FewShot(n, spec.get("split"), spec.get("path"), seed, spec.get("column"), spec.get("separator", "\n\n"))


# --------------------------------------------------------------------------- records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvomergeError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise EvomergeError(f"{path}:{line_no}: expected a JSON object per line")
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    """A ``.json`` file holding either a list of items or JSON lines."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        data = data["items"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EvomergeError(f"{path}: expected a list of item objects")
    return data


def _records_from_dataset(dataset, where: str, split: str | None = None) -> list[dict]:
    """Rows of a ``datasets.Dataset``, or of one split of a ``DatasetDict`` (``split``, else
    ``test``, else its only split)."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset.keys())
        if split is not None:
            if split not in dataset:
                raise EvomergeError(f"{where}: no split {split!r}; the dataset has {splits}")
            dataset = dataset[split]
        elif "test" in dataset:
            dataset = dataset["test"]
        elif len(splits) == 1:
            dataset = dataset[splits[0]]
        else:
            raise EvomergeError(f"{where}: dataset has splits {splits}; choose one with split: NAME")
    return [dict(row) for row in dataset]


def _records_from_files(files: list[str], where: str) -> list[dict]:
    """parquet / csv / json(l) files of one kind, read through ``datasets`` (local only)."""
    import datasets

    kinds = {TABULAR_SUFFIXES.get(Path(f).suffix, "json") for f in files}
    if len(kinds) > 1:
        raise EvomergeError(f"{where}: mixes file types {sorted(kinds)}; keep one per benchmark")
    try:
        dataset = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    except Exception as exc:  # a malformed file: one clear line, not a deep traceback
        raise EvomergeError(f"{where}: could not read {', '.join(Path(f).name for f in files)} ({exc})") from None
    return [dict(row) for row in dataset]


def _records_from_directory(path: Path, split: str | None = None) -> list[dict]:
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            return _records_from_dataset(datasets.load_from_disk(str(path)), str(path), split)
        except (FileNotFoundError, ValueError) as exc:
            raise EvomergeError(f"{path}: could not load saved dataset ({exc})") from None
    suffixes = {".jsonl", ".json", *TABULAR_SUFFIXES}
    files = sorted(str(p) for p in path.iterdir() if p.suffix in suffixes)
    if split is not None:
        files = [f for f in files if Path(f).name.startswith(split)]
    if not files:
        named = f" named {split}*" if split is not None else ""
        raise EvomergeError(f"{path}: no saved dataset and no .jsonl/.json/.parquet/.csv files{named} in this folder")
    return _records_from_files(files, str(path))


def _dataset_types() -> tuple:
    try:
        import datasets

        return (datasets.Dataset, datasets.DatasetDict)
    except ImportError:  # pragma: no cover - datasets is a dependency
        return ()


def read_records(source, split: str | None, bench_name: str, config: str | None = None) -> tuple[list[dict], str]:
    """The raw records of ``source`` (a file, a folder, a ``Dataset``, a hub dataset id) and how errors name it."""
    if isinstance(source, _dataset_types()):
        return _records_from_dataset(source, "in-memory dataset", split), "in-memory dataset"
    if is_hub_id(source):
        where = describe(str(source), config)
        dataset = load_hub_dataset(str(source), config, split, f"benchmark {bench_name!r}")
        return _records_from_dataset(dataset, where, split), where
    path = Path(os.fspath(source))
    where = str(path)
    if config is not None:
        raise EvomergeError(f"benchmark {bench_name!r}: config applies to hub dataset ids (path: openai/gsm8k), "
                            f"not to the local {path}")
    if not path.exists():
        raise EvomergeError(f"benchmark {bench_name!r}: {path} does not exist")
    if path.is_dir():
        return _records_from_directory(path, split), where
    if path.suffix in TABULAR_SUFFIXES:
        return _records_from_files([str(path)], where), where
    if path.suffix == ".json":
        return _read_json(path), where
    return _read_jsonl(path), where


# --------------------------------------------------------------------------- items


def _template_columns(template: str) -> list[str]:
    """Columns a ``str.format`` template reads (``{choices[0]}`` reads ``choices``)."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return [re.split(r"[.\[]", f, maxsplit=1)[0] for f in names]


def _check_preset_columns(fmt: BenchmarkFormat, records: list[dict], at: str) -> None:
    """A preset's columns are all in the data: one error naming the preset, not one per item."""
    if fmt.preset is None or not records:
        return
    needed = list(dict.fromkeys([*(_template_columns(fmt.template) if fmt.template else []),
                                 *(c for k, c in fmt.fields.items() if k != "id")]))
    columns = list(records[0])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise EvomergeError(f"{at}: preset {fmt.preset!r} reads columns {', '.join(needed)}; the data has no "
                            f"{', '.join(repr(c) for c in missing)} (its columns: {', '.join(map(str, columns))}); "
                            "map them with fields / template")


def _adapted(records: list[dict], fmt: BenchmarkFormat) -> list[dict]:
    """Rows as the preset expects them (MGSM's train rows lose their own labels)."""
    adapt = ROW_ADAPTERS.get(fmt.preset)
    return [adapt(r) for r in records] if adapt else records


def _raw_item(record: dict, index: int, bench_name: str, where: str, fmt: BenchmarkFormat) -> RawItem:
    """One record's item values; ``fmt.fields`` maps item keys to columns, ``fmt.template`` builds the prompt."""
    def value(key):
        return record.get(fmt.fields.get(key, key))

    raw_id = value("id")
    item_id = str(raw_id if raw_id is not None else f"{bench_name}-{index:04d}")
    at = f"benchmark {bench_name!r} ({where}), item {item_id!r}"
    if fmt.template is not None:
        try:
            prompt = fmt.template.format_map(record)
        except KeyError as exc:
            raise EvomergeError(f"{at}: template names column {exc.args[0]!r}, which the item lacks; "
                                f"columns: {', '.join(map(str, record))}") from None
        except (IndexError, ValueError, AttributeError, TypeError) as exc:
            raise EvomergeError(f"{at}: bad template ({exc})") from None
    else:
        prompt = value("prompt")
    choices = list(fmt.choices) if fmt.choices is not None else value("choices")
    return RawItem(item_id, prompt, value("answer"), choices, value("label"), fmt.fields, at)


def _kind_of(fmt: BenchmarkFormat, raws: list[RawItem], bench_name: str, where: str) -> ItemKind:
    if fmt.scoring is not None:
        return get_kind(fmt.scoring)
    return get_kind(infer_kind((raw.choices is not None for raw in raws), f"benchmark {bench_name!r} ({where})"))


def _shots(fmt: BenchmarkFormat, source, kind: ItemKind, items: list[Item], bench_name: str, where: str,
           on_disk: bool) -> tuple[Shot, ...]:
    """``fmt.fewshot.n`` solved examples, drawn by seed from a split or file, never among the scored items."""
    spec = fmt.fewshot
    if spec.n == 0:
        return ()
    at = f"benchmark {bench_name!r}: fewshot"
    if spec.path is not None:
        records, shot_where = read_records(spec.path, None, bench_name)
        records = _adapted(records, fmt)
    elif on_disk and not is_hub_id(source) and not Path(os.fspath(source)).is_dir():
        raise EvomergeError(f"{at}.split: {where} is one file, without splits; name a file of examples with fewshot.path")
    else:
        records, shot_where = read_records(source, spec.split, bench_name, fmt.config)
        records = _adapted(records, fmt)
    scored = {item.prompt for item in items}
    candidates = []
    for index, record in enumerate(records):
        item = kind.read_item(_raw_item(record, index, f"{bench_name} (few-shot)", shot_where, fmt))
        if item.prompt in scored:
            continue
        if spec.column is not None:
            answer = record.get(spec.column)
            if answer is None or answer == "":
                raise EvomergeError(f"{at}.column: example {item.id!r} of {shot_where} has no {spec.column!r} "
                                    f"(its columns: {', '.join(map(str, record))})")
            answer = str(answer)
        else:
            answer = item.answer if item.answer is not None else item.choices[item.label]
        candidates.append(Shot(item.prompt, answer))
    if len(candidates) < spec.n:
        raise EvomergeError(f"{at}.n: asks for {spec.n} examples, but {shot_where} has only {len(candidates)} "
                            "that are not scored items")
    picks = random.Random(spec.seed).sample(range(len(candidates)), spec.n)
    return tuple(candidates[i] for i in picks)


def load_benchmark(source=None, name: str | None = None, *, fields: Mapping[str, str] | None = None,
                   template: str | None = None, split: str | None = None, config: str | None = None,
                   scoring: str | None = None, preset: str | None = None, fewshot: Mapping | None = None,
                   chat: bool | None = None, delimiter: str | None = None, choices: list[str] | None = None,
                   max_new_tokens: int | None = None, stop: list[str] | None = None, extract=None, compare=None,
                   generation: Mapping | None = None, lm_eval: str | None = None, tokenizer=None,
                   **lm_eval_options) -> Benchmark:
    """Load items from a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a local ``datasets``
    folder (``save_to_disk`` output, or a folder of such files), a ``Dataset``, a Hugging Face
    hub dataset id (``openai/gsm8k``, with ``config`` and ``split``; the local cache offline),
    or, with ``lm_eval`` and no ``source``, an lm-eval task (a registered name or a task YAML).

    Items have ``prompt`` and ``answer`` (exact match, generate) or ``choices`` and
    ``label`` (multiple choice; an int, a digit or a letter). ``fields`` maps those
    keys to other column names (e.g. ``{"prompt": "question", "label": "answerKey"}``),
    ``template`` builds the prompt from columns (``"Q: {question} A:"``), ``split``
    picks a split (default ``test``, or the only one). ``preset`` (gsm8k, mgsm, arc,
    mmlu, hellaswag) sets all of that for a dataset's own layout; the other keywords
    override it. ``scoring`` (exact_match | multiple_choice | generate, default from
    the data) and the generate options (``max_new_tokens``, ``stop``, ``extract``,
    ``compare``, also accepted as one ``generation`` mapping) are those of a
    search-space entry (docs/estimate.md); so are an lm-eval task's (``num_fewshot``,
    ``apply_chat_template``, ``limit``, ``metric``, ...: ``lm_eval_options``). With
    ``tokenizer``, ``chat: true`` (``apply_chat_template``) is checked against it now.
    ``name`` defaults to the file or folder stem, or the task's name.
    """
    if lm_eval is not None:
        return _load_lm_eval(source, name, lm_eval, tokenizer, dict(
            fields=fields, template=template, split=split, config=config, scoring=scoring, preset=preset,
            fewshot=fewshot, chat=chat, delimiter=delimiter, choices=choices, max_new_tokens=max_new_tokens,
            stop=stop, extract=extract, compare=compare, **(generation or {}), **lm_eval_options))
    if source is None:
        raise EvomergeError(f"benchmark {name or '?'!r}: name its data (a file, folder, dataset or hub id) or an "
                            "lm_eval task")
    options = {key: value for key, value in dict(
        fields=fields, template=template, split=split, config=config, scoring=scoring, preset=preset,
        fewshot=fewshot, chat=chat, delimiter=delimiter, choices=choices, max_new_tokens=max_new_tokens, stop=stop,
        extract=extract, compare=compare).items() if value is not None}
    options.update(generation or {})
    options.update(lm_eval_options)
    on_disk = not isinstance(source, _dataset_types())
    bench_name = name or (Path(os.fspath(source)).name.split(".")[0] if on_disk else "dataset")
    fmt = check_format(options, f"benchmark {bench_name!r}")
    records, where = read_records(source, fmt.split, bench_name, fmt.config)
    records = _adapted(records, fmt)
    _check_preset_columns(fmt, records, f"benchmark {bench_name!r} ({where})")
    raws = [_raw_item(record, i, bench_name, where, fmt) for i, record in enumerate(records)]
    kind = _kind_of(fmt, raws, bench_name, where)
    items = [kind.read_item(raw) for raw in raws]
    if fmt.chat and tokenizer is not None:
        check_chat_template(tokenizer, bench_name)
    prompting = Prompting(_shots(fmt, source, kind, items, bench_name, where, on_disk) if items else (),
                          fmt.chat, fmt.delimiter, fmt.fewshot.separator)
    return Benchmark(bench_name, items, source=where, kind=kind.name, settings=fmt.settings, prompting=prompting)


def load_prompts(source, name: str, options: Mapping[str, Any] | None = None, split: str | None = None) -> list[Item]:
    """Unlabelled items for data statistics and coefficient learning: each record's prompt (and choices,
    for multiple choice), read with a benchmark entry's own options (fields, template, preset, choices);
    answers and labels, where the records have them, are never read. ``split`` overrides the entry's.

    For an lm-eval task (``options`` with ``lm_eval``) and no ``source``, the documents of its dataset's
    ``split`` as lm-eval writes their prompts; a file of prompts (``source``) is read with no entry options
    (a ``prompt`` column), since the task's keys do not apply to it."""
    options = dict(options or {})
    if "lm_eval" in options:
        if not source:
            return lm_eval_prompts(check_format(options, f"benchmark {name!r}").lm_eval, name, split)
        options = {}
    fmt = check_format(options, f"benchmark {name!r} data")
    records, where = read_records(source, split if split is not None else fmt.split, name,
                                  fmt.config if is_hub_id(source) else None)
    records = _adapted(records, fmt)
    items = []
    for index, record in enumerate(records):
        raw = _raw_item(record, index, f"{name} (data)", where, fmt)
        choices = raw.choices
        if isinstance(choices, dict) and isinstance(choices.get("text"), list):
            choices = choices["text"]
        items.append(Item(raw.id, raw.text_prompt(), choices=tuple(choices) if choices is not None else None))
    if not items:
        raise EvomergeError(f"benchmark {name!r}: its data {where} has no records")
    return items


def _load_lm_eval(source, name: str | None, task: str, tokenizer, others: dict) -> Benchmark:
    """An lm-eval task's documents as a benchmark (`evomerge.benchmarks.lmeval`)."""
    where = f"benchmark {name or task!r}"
    if source is not None:
        raise EvomergeError(f"{where}: names both data ({source}) and an lm_eval task ({task}); an lm-eval task "
                            "reads its own dataset")
    options = {"lm_eval": task, **{key: value for key, value in others.items() if value is not None}}
    fmt = check_format(options, where)
    bench_name = name or fmt.lm_eval.default_name
    return load_lm_eval_task(fmt.lm_eval, bench_name, f"benchmark {bench_name!r}", tokenizer)
