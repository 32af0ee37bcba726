"""Per-item correctness of models on a benchmark (models x items), stored in the run folder.

The IRT fit, the subset extraction and the error check all start from this
matrix; it is saved as ``.npz`` (bool matrix + model names + item ids) so a
resumed study never re-scores the endpoint models. Scoring itself (log-likelihood
multiple choice or greedy exact match, batched) is ``evomerge.benchmarks.score_records``.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from evomerge.benchmarks import score_records
from evomerge.errors import EvomergeError
from evomerge.files import write_bytes_atomic


@dataclasses.dataclass
class ResponseMatrix:
    """``correct[i, j]`` is True iff model ``model_names[i]`` got item ``item_ids[j]`` right.

    ``observed[i, j]`` says whether model i was scored on item j at all (None: every
    model on every item). Calibration scores its random merges on a sample of the
    items only; an unobserved answer is stored as False and never read as one.
    ``margins[i, j]``: model i's log-likelihood margin on item j where its benchmark's
    kind gives one (`Scored.margins`), NaN where unknown; None when no model has any.
    """

    correct: np.ndarray
    model_names: list[str]
    item_ids: list[str]
    benchmark: str = ""
    observed: np.ndarray | None = None
    margins: np.ndarray | None = None

    def __post_init__(self):
        self.correct = np.asarray(self.correct)
        if self.correct.ndim == 1 and len(self.model_names) <= 1:
            self.correct = self.correct.reshape(len(self.model_names), -1)
        if self.correct.dtype != bool:
            self.correct = as_correctness(self.correct, "response matrix")
        self.model_names = [str(m) for m in self.model_names]
        self.item_ids = [str(i) for i in self.item_ids]
        rows, cols = self.correct.shape
        if rows != len(self.model_names) or cols != len(self.item_ids):
            raise EvomergeError(
                f"response matrix is {rows} x {cols} but has {len(self.model_names)} model names "
                f"and {len(self.item_ids)} item ids")
        if len(set(self.model_names)) != rows:
            raise EvomergeError(f"response matrix has duplicate model names: {self.model_names}")
        if self.observed is not None:
            self.observed = np.asarray(self.observed, dtype=bool).reshape(rows, cols)
            if self.observed.all():
                self.observed = None
            else:
                self.correct = self.correct & self.observed
        if self.margins is not None:
            self.margins = np.asarray(self.margins, dtype=np.float64).reshape(rows, cols).copy()
            if self.observed is not None:
                self.margins[~self.observed] = np.nan
            if np.isnan(self.margins).all():
                self.margins = None

    @classmethod
    def empty(cls, item_ids: list[str], benchmark: str = "") -> "ResponseMatrix":
        return cls(np.zeros((0, len(item_ids)), dtype=bool), [], list(item_ids), benchmark)

    @property
    def n_items(self) -> int:
        return self.correct.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """``observed`` as a full bool matrix (all True when every answer is known)."""
        return np.ones(self.correct.shape, dtype=bool) if self.observed is None else self.observed

    def row(self, name: str) -> np.ndarray:
        try:
            return self.correct[self.model_names.index(name)]
        except ValueError:
            raise EvomergeError(f"model {name!r} has no stored responses; known: {self.model_names}") from None

    def observed_row(self, name: str) -> np.ndarray:
        """Which items ``name`` was scored on."""
        self.row(name)
        return self.mask[self.model_names.index(name)]

    def complete(self, name: str) -> bool:
        """Whether ``name`` was scored on every item."""
        return bool(self.observed_row(name).all())

    def rows(self, names: Iterable[str]) -> np.ndarray:
        return np.stack([self.row(n) for n in names]) if names else np.zeros((0, self.n_items), bool)

    def margin_row(self, name: str) -> np.ndarray:
        """``name``'s margins (NaN where unknown)."""
        self.row(name)
        if self.margins is None:
            return np.full(self.n_items, np.nan)
        return self.margins[self.model_names.index(name)]

    def margin_rows(self, names: Iterable[str]) -> np.ndarray | None:
        """The margins of ``names`` (None when this matrix has none)."""
        names = list(names)
        if self.margins is None or not names:
            return None
        return np.stack([self.margin_row(n) for n in names])

    def subset(self, names: Iterable[str]) -> "ResponseMatrix":
        """The rows of ``names``, in that order, observed masks and margins kept."""
        names = list(names)
        observed = np.stack([self.observed_row(n) for n in names]) if names else None
        return ResponseMatrix(self.rows(names), names, self.item_ids, self.benchmark, observed,
                              self.margin_rows(names))

    def accuracy(self) -> dict[str, float]:
        """Each model's accuracy on the items it was scored on."""
        return {m: float(r[o].mean()) if o.any() else float("nan")
                for m, r, o in zip(self.model_names, self.correct, self.mask)}

    def with_model(self, name: str, correct: np.ndarray, observed: np.ndarray | None = None,
                   margins: np.ndarray | None = None) -> "ResponseMatrix":
        """A copy with ``name``'s row added (or replaced); ``observed``: the items it was scored on (all if None);
        ``margins``: its margins on every item (NaN where unknown; None: none)."""
        row = as_correctness(correct, f"responses of {name!r}").ravel()
        if row.shape[0] != self.n_items:
            raise EvomergeError(f"responses of {name!r} cover {row.shape[0]} items, benchmark has {self.n_items}")
        seen = np.ones(self.n_items, dtype=bool) if observed is None else np.asarray(observed, dtype=bool).ravel()
        if seen.shape[0] != self.n_items:
            raise EvomergeError(f"observed items of {name!r} cover {seen.shape[0]} items, benchmark has {self.n_items}")
        names = [m for m in self.model_names if m != name]
        kept = self.rows(names) if names else np.zeros((0, self.n_items), bool)
        masks = np.stack([self.observed_row(n) for n in names]) if names else np.zeros((0, self.n_items), bool)
        margin_row = np.full(self.n_items, np.nan) if margins is None else np.asarray(margins, np.float64).ravel()
        if margin_row.shape[0] != self.n_items:
            raise EvomergeError(f"margins of {name!r} cover {margin_row.shape[0]} items, benchmark has {self.n_items}")
        kept_margins = self.margin_rows(names)
        if kept_margins is None:
            kept_margins = np.full((len(names), self.n_items), np.nan)
        return ResponseMatrix(np.vstack([kept, row[None]]), names + [name], self.item_ids, self.benchmark,
                              np.vstack([masks, seen[None]]), np.vstack([kept_margins, margin_row[None]]))

    def with_answers(self, name: str, indices: Iterable[int], correct: Iterable[bool],
                     margins: Iterable[float] | None = None) -> "ResponseMatrix":
        """A copy where ``name`` (added if new) also answered the items at ``indices`` (with these margins)."""
        indices = np.asarray(list(indices), dtype=np.int64)
        if name in self.model_names:
            row, seen = self.row(name).copy(), self.observed_row(name).copy()
            margin_row = self.margin_row(name).copy()
        else:
            row, seen = np.zeros(self.n_items, dtype=bool), np.zeros(self.n_items, dtype=bool)
            margin_row = np.full(self.n_items, np.nan)
        row[indices] = as_correctness(np.asarray(list(correct)), f"answers of {name!r}")
        seen[indices] = True
        margin_row[indices] = np.nan if margins is None else np.asarray(list(margins), dtype=np.float64)
        return self.with_model(name, row, seen, margin_row)

    def to_bytes(self) -> bytes:
        """The matrix as a compressed ``.npz`` (the run folder's file, the study's stored blob)."""
        buffer = io.BytesIO()
        arrays = dict(correct=self.correct, model_names=np.array(self.model_names, dtype=str),
                      item_ids=np.array(self.item_ids, dtype=str), benchmark=np.array(self.benchmark))
        if self.observed is not None:
            arrays["observed"] = self.observed
        if self.margins is not None:
            arrays["margins"] = self.margins.astype(np.float32)
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "ResponseMatrix":
        """The matrix of a ``.npz`` made by `to_bytes`; ``where`` names its origin in the error."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                observed = arrays["observed"].astype(bool) if "observed" in arrays.files else None
                margins = arrays["margins"].astype(np.float64) if "margins" in arrays.files else None
                return cls(arrays["correct"].astype(bool), list(arrays["model_names"]),
                           list(arrays["item_ids"]), str(arrays["benchmark"]), observed, margins)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise EvomergeError(f"cannot read responses {where}: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically: a crash mid-write never leaves a torn file."""
        return write_bytes_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "ResponseMatrix":
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise EvomergeError(f"cannot read responses file {path}: {exc}") from exc
        return cls.from_bytes(data, f"file {path}")


def as_correctness(values: Any, what: str = "answers") -> np.ndarray:
    """Coerce 0/1 or bool values to a bool array; NaN or other values are an error."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise EvomergeError(f"{what} must be booleans or 0/1 numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise EvomergeError(f"{what} contain NaN (missing answers)")
    if not np.isin(arr, (0, 1)).all():
        raise EvomergeError(f"{what} must be 0/1 (wrong/correct), got other values")
    return arr.astype(bool)


def responses_path(run_dir: str | Path, benchmark: str) -> Path:
    """Where a run folder keeps the responses of one benchmark."""
    return Path(run_dir) / "responses" / f"{benchmark}.npz"


def benchmark_item_ids(bench: Any) -> list[str]:
    """Item ids of a ``Benchmark`` (falls back to positions when items have no id)."""
    for attr in ("item_ids", "ids"):
        ids = getattr(bench, attr, None)
        if ids is not None and not callable(ids):
            return [str(i) for i in ids]
    items = getattr(bench, "items", None)
    if items is None:
        raise EvomergeError(f"benchmark {getattr(bench, 'name', bench)!r} has no items")
    return [str(_field(it, "id", i)) for i, it in enumerate(items)]


def _field(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, dict):
        return item.get(key, default)
    return getattr(item, key, default)


def check_labels(bench: Any) -> None:
    """Every item must carry its answer; scoring unlabeled items would silently count as wrong."""
    items = getattr(bench, "items", None)
    if items is None:
        return
    name = getattr(bench, "name", "benchmark")
    if len(items) == 0:
        raise EvomergeError(f"benchmark {name!r} has no items")
    for i, item in enumerate(items):
        answer, choices, label = _field(item, "answer"), _field(item, "choices"), _field(item, "label")
        has_exact = answer is not None and str(answer) != ""
        has_choice = choices is not None and label is not None
        if not (has_exact or has_choice):
            raise EvomergeError(
                f"benchmark {name!r} item {_field(item, 'id', i)!r} has no label "
                "(needs 'answer' or 'choices' + 'label')")


def score_model(model: Any, tokenizer: Any, bench: Any, indices: np.ndarray | None = None,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """Correctness of one model on ``bench`` (or the ``indices`` items), as a bool vector, and its
    margins where the benchmark's kind gives them (else None)."""
    check_labels(bench)
    scored = score_records(model, tokenizer, bench, indices=indices, batch_size=batch_size, records=False)
    return as_correctness(scored.correct, "scored answers"), scored.margins


def collect_responses(
    named_models: Iterable[tuple[str, Any, Any]],
    bench: Any,
    *,
    path: str | Path | None = None,
    batch_size: int = 64,
) -> ResponseMatrix:
    """Score each ``(name, model, tokenizer)`` on the full benchmark into a ResponseMatrix.

    ``named_models`` may be a generator so models are loaded one at a time. With
    ``path`` the matrix is loaded first (models already there are skipped -- a
    generator should check ``ResponseMatrix.load(path).model_names`` to avoid
    loading them) and saved after every model, so an interrupted run resumes.
    """
    item_ids = benchmark_item_ids(bench)
    name = str(getattr(bench, "name", "") or "")
    matrix = ResponseMatrix.empty(item_ids, name)
    if path is not None and Path(path).exists():
        matrix = ResponseMatrix.load(path)
        if matrix.item_ids != item_ids:
            raise EvomergeError(f"stored responses {path} are for different items than benchmark {name!r}")
    for model_name, model, tokenizer in named_models:
        if model_name in matrix.model_names:
            continue
        correct, margins = score_model(model, tokenizer, bench, batch_size=batch_size)
        matrix = matrix.with_model(model_name, correct, margins=margins)
        if path is not None:
            matrix.save(path)
    return matrix
