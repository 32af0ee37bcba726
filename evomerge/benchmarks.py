"""Benchmark items and per-item scoring of a causal LM.

Scores are per item (correct / wrong) because the IRT estimator needs the full
responses matrix, not just accuracies. Scoring is one batched forward pass per
batch of items, so a search can evaluate hundreds of candidates quickly:

* exact match is teacher-forced: ``<bos> prompt answer <eos>`` is fed once and the
  item is correct iff the argmax at every answer position and at the end-of-answer
  position equals the target -- exactly the answer greedy decoding would produce;
* multiple choice picks the choice with the highest summed log-likelihood of its
  tokens after the prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from evomerge.batching import run_batches
from evomerge.errors import EvomergeError

EXACT_MATCH = "exact_match"
MULTIPLE_CHOICE = "multiple_choice"


@dataclass(frozen=True)
class Item:
    """One benchmark question: ``answer`` for exact match, or ``choices`` + ``label``."""

    id: str
    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None

    @property
    def kind(self) -> str:
        return MULTIPLE_CHOICE if self.choices is not None else EXACT_MATCH


@dataclass
class Benchmark:
    """A named list of items that all share one format (``kind``)."""

    name: str
    items: list[Item]
    source: str = ""
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise EvomergeError(f"benchmark {self.name!r} ({self.source or 'in memory'}) has no items")
        kinds = {item.kind for item in self.items}
        if len(kinds) > 1:
            raise EvomergeError(
                f"benchmark {self.name!r} ({self.source or 'in memory'}) mixes exact-match and "
                f"multiple-choice items; split it into one benchmark per format"
            )
        self.kind = kinds.pop()

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- loading


ITEM_KEYS = ("id", "prompt", "answer", "choices", "label")
TABULAR_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


def check_item_format(fields: Mapping[str, str] | None, template: str | None, where: str) -> dict[str, str]:
    """A benchmark's column mapping and prompt template, checked before any data is read."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(ITEM_KEYS))
    if unknown:
        raise EvomergeError(f"{where}: fields maps unknown item key {unknown[0]!r}; item keys are {', '.join(ITEM_KEYS)}")
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise EvomergeError(f"{where}: fields must map item keys to column names (strings)")
    if template is not None and not isinstance(template, str):
        raise EvomergeError(f"{where}: template must be a string such as 'Question: {{question}} Answer:'")
    return fields


def _label_index(label):
    """An int label, or a digit / letter label ("2", "C") as many datasets store it."""
    if isinstance(label, str):
        text = label.strip()
        if text.isdigit():
            return int(text)
        if len(text) == 1 and "A" <= text.upper() <= "Z":
            return ord(text.upper()) - ord("A")
    return label


def _column(key: str, fields: Mapping[str, str]) -> str:
    """How an error names an item key: 'label', or 'label' (column 'answerKey') when mapped."""
    return f"'{key}' (column {fields[key]!r})" if key in fields else f"'{key}'"


def _item_from_record(record: dict, index: int, bench_name: str, where: str,
                      fields: Mapping[str, str], template: str | None) -> Item:
    """Validate one raw record; errors name the benchmark, the item and the bad key.

    ``fields`` maps item keys to the dataset's column names; ``template`` builds
    the prompt from the record's columns (``str.format`` syntax).
    """
    def value(key):
        return record.get(fields.get(key, key))

    raw_id = value("id")
    item_id = str(raw_id if raw_id is not None else f"{bench_name}-{index:04d}")
    at = f"benchmark {bench_name!r} ({where}), item {item_id!r}"
    if template is not None:
        try:
            prompt = template.format_map(record)
        except KeyError as exc:
            raise EvomergeError(f"{at}: template names column {exc.args[0]!r}, which the item lacks; "
                                f"columns: {', '.join(map(str, record))}") from None
        except (IndexError, ValueError) as exc:
            raise EvomergeError(f"{at}: bad template ({exc})") from None
    else:
        prompt = value("prompt")
    if not isinstance(prompt, str):
        raise EvomergeError(f"{at}: missing or non-string {_column('prompt', fields)}")
    choices = value("choices")
    # A mapped label may live in a column called "answer" (MMLU): then there is no exact-match answer.
    answer = value("answer") if fields.get("label") != fields.get("answer", "answer") else None
    label = value("label")
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):
        choices = choices["text"]  # {"text": [...], "label": ["A", ...]} as in ARC
    if choices is not None:
        if answer is not None:
            raise EvomergeError(f"{at}: has both 'answer' and 'choices'; use one format per item")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvomergeError(f"{at}: {_column('choices', fields)} must be a list of at least two strings")
        if label is None:
            raise EvomergeError(f"{at}: multiple-choice item has no {_column('label', fields)}")
        label_index = _label_index(label)
        if (isinstance(label_index, bool) or not isinstance(label_index, (int, np.integer))
                or not 0 <= int(label_index) < len(choices)):
            raise EvomergeError(f"{at}: {_column('label', fields)} {label!r} is not an index into its "
                                f"{len(choices)} choices")
        if any(c == "" for c in choices):
            raise EvomergeError(f"{at}: empty string among {_column('choices', fields)}")
        return Item(item_id, prompt, choices=tuple(choices), label=int(label_index))
    if answer is None:
        raise EvomergeError(f"{at}: no {_column('answer', fields)} (exact match) or "
                            f"{_column('choices', fields)} + {_column('label', fields)} (multiple choice)")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or answer == "":
        raise EvomergeError(f"{at}: {_column('answer', fields)} must be a non-empty string")
    return Item(item_id, prompt, answer=answer)


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


def load_benchmark(source, name: str | None = None, *, fields: Mapping[str, str] | None = None,
                   template: str | None = None, split: str | None = None) -> Benchmark:
    """Load items from a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a local ``datasets``
    folder (``save_to_disk`` output, or a folder of such files), or a ``Dataset``.

    Items have ``prompt`` and ``answer`` (exact match) or ``choices`` and ``label``
    (multiple choice; an int, a digit or a letter). ``fields`` maps those keys to
    other column names (e.g. ``{"prompt": "question", "label": "answerKey"}``),
    ``template`` builds the prompt from columns (``"Q: {question} A:"``) and
    ``split`` picks a split (default ``test``, or the only one). ``name``
    defaults to the file or folder stem. No hub access: local data only.
    """
    try:
        import datasets

        dataset_types: tuple = (datasets.Dataset, datasets.DatasetDict)
    except ImportError:  # pragma: no cover - datasets is a dependency
        dataset_types = ()
    in_memory = bool(dataset_types) and isinstance(source, dataset_types)
    path = None if in_memory else Path(os.fspath(source))
    bench_name = name or ("dataset" if in_memory else path.name.split(".")[0])
    where = "in-memory dataset" if in_memory else str(path)
    fields = check_item_format(fields, template, f"benchmark {bench_name!r}")
    if in_memory:
        records = _records_from_dataset(source, where, split)
    elif not path.exists():
        raise EvomergeError(f"benchmark {bench_name!r}: {path} does not exist")
    elif path.is_dir():
        records = _records_from_directory(path, split)
    elif path.suffix in TABULAR_SUFFIXES:
        records = _records_from_files([str(path)], where)
    elif path.suffix == ".json":
        records = _read_json(path)
    else:
        records = _read_jsonl(path)
    items = [_item_from_record(record, i, bench_name, where, fields, template) for i, record in enumerate(records)]
    return Benchmark(bench_name, items, source=where)


# --------------------------------------------------------------------------- scoring


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model always has parameters
        return torch.device("cpu")


def _prefix_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return token_id
    return 0  # pragma: no cover


def _teacher_forced_rows(prompts: list[list[int]], continuations: list[list[int]], prefix: list[int],
                         pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prefix + prompt + continuation`` ids and the mask of continuation positions.

    Right padding with a causal model needs no attention mask: pads only follow the tokens scored.
    """
    rows = [prefix + p + c for p, c in zip(prompts, continuations)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = row
        mask[i, len(prefix) + len(prompt) : len(row)] = True
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def _forward_targets(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each position, the targets there, and which targets count."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return logits, ids[:, 1:], mask[:, 1:]


def _score_exact_match(model, tokenizer, items: list[Item], batch_size: int, device, tick) -> np.ndarray:
    if tokenizer.eos_token_id is None:
        raise EvomergeError("exact-match scoring needs a tokenizer with an eos token")
    prompts = _tokenize(tokenizer, [item.prompt for item in items])
    answers = [a + [tokenizer.eos_token_id] for a in _tokenize(tokenizer, [item.answer for item in items])]
    prefix, pad_id = _prefix_ids(tokenizer), _pad_id(tokenizer)
    correct = np.zeros(len(items), dtype=bool)

    def step(start: int, stop: int) -> None:
        ids, mask = _teacher_forced_rows(prompts[start:stop], answers[start:stop], prefix, pad_id, device)
        logits, targets, scored = _forward_targets(model, ids, mask)
        hits = (logits.argmax(dim=-1) == targets) | ~scored
        correct[start:stop] = hits.all(dim=1).cpu().numpy()
        tick(stop - start)

    run_batches(model, EXACT_MATCH, len(items), batch_size, step)
    return correct


def _score_multiple_choice(model, tokenizer, items: list[Item], batch_size: int, device, tick) -> np.ndarray:
    owners = [i for i, item in enumerate(items) for _ in item.choices]
    prompts_by_item = _tokenize(tokenizer, [item.prompt for item in items])
    prompts = [prompts_by_item[i] for i in owners]
    choices = _tokenize(tokenizer, [c for item in items for c in item.choices])
    for row, tokens in enumerate(choices):
        if not tokens:
            raise EvomergeError(f"item {items[owners[row]].id!r}: a choice tokenizes to nothing")
    prefix, pad_id = _prefix_ids(tokenizer), _pad_id(tokenizer)
    loglik = np.zeros(len(owners), dtype=np.float64)
    rows_per_batch = max(1, batch_size * len(owners) // max(1, len(items)))

    def step(start: int, stop: int) -> None:
        ids, mask = _teacher_forced_rows(prompts[start:stop], choices[start:stop], prefix, pad_id, device)
        logits, targets, scored = _forward_targets(model, ids, mask)
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loglik[start:stop] = (token_logp * scored).sum(dim=1).double().cpu().numpy()
        tick(len(set(owners[start:stop])))

    run_batches(model, MULTIPLE_CHOICE, len(owners), rows_per_batch, step)
    correct = np.zeros(len(items), dtype=bool)
    offset = 0
    for i, item in enumerate(items):
        n = len(item.choices)
        correct[i] = int(np.argmax(loglik[offset : offset + n])) == item.label
        offset += n
    return correct


def score_items(model, tokenizer, bench: Benchmark, indices: Iterable[int] | None = None,
                batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Per-item correctness (bool array aligned with ``indices``, default all items).

    Runs batched on the model's device under ``torch.inference_mode()``; the model is
    put in eval mode (and its previous mode restored).
    """
    if indices is None:
        chosen = list(bench.items)
    else:
        index_list = [int(i) for i in indices]
        bad = [i for i in index_list if not 0 <= i < len(bench.items)]
        if bad:
            raise EvomergeError(f"benchmark {bench.name!r} has {len(bench.items)} items; bad indices {bad[:5]}")
        chosen = [bench.items[i] for i in index_list]
    if not chosen:
        return np.zeros(0, dtype=bool)
    if batch_size < 1:
        raise EvomergeError(f"batch_size must be at least 1, got {batch_size}")
    device = _model_device(model)
    scorer = _score_exact_match if bench.kind == EXACT_MATCH else _score_multiple_choice
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _maybe_progress(progress, len(chosen), bench.name) as tick:
            return scorer(model, tokenizer, chosen, batch_size, device, tick)
    finally:
        model.train(was_training)


class _maybe_progress:
    """A rich bar over items when asked for; otherwise a no-op ``tick``."""

    def __init__(self, enabled: bool, total: int, name: str):
        self.enabled, self.total, self.name = enabled, total, name

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(f"scoring {self.name}", total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def accuracy(model, tokenizer, bench: Benchmark, batch_size: int = 64) -> float:
    """Fraction of items correct (convenience over :func:`score_items`)."""
    return float(score_items(model, tokenizer, bench, batch_size=batch_size).mean())


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy continuation of ``prompt`` (tokenized as the scorers do), stopping at eos.

    Used to check that teacher-forced exact match equals real decoding, and for demos.
    """
    device = _model_device(model)
    ids = torch.tensor([_prefix_ids(tokenizer) + _tokenize(tokenizer, [prompt])[0]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
            )
    finally:
        model.train(was_training)
    new_tokens = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new_tokens, skip_special_tokens=False)  # stray specials must not vanish
