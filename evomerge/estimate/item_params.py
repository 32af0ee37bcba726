"""Item parameters of a benchmark, fitted once and reused: a file format, and the key of a benchmark's content.

A study fits 2PL item parameters (``a``: discrimination per latent dimension,
``b``: difficulty) from calibration models scored on the benchmark. Those
parameters describe the items, not the study: a later study on the same
benchmark can reuse them and skip most of its calibration (`evomerge.search`
keeps an item bank keyed by `benchmark_key`), and parameters fitted elsewhere on
many models (tinyBenchmarks publishes them for its benchmarks) can come from a
file. Accepted files (``.json`` or ``.npz``; never pickles, which run code when read):

* ``A``: discrimination, ``items x dims`` (evomerge's layout, logit ``a . theta - b``),
  or ``1 x dims x items`` (tinyBenchmarks' layout, whose ``item_curve`` sums
  ``a_d theta_d - b`` over the dimensions: ``b`` counts once per dimension, so
  evomerge uses ``dims * B``);
* ``B``: difficulty, ``items`` (with a 2-D ``A``) or ``1 x 1 x items`` (with a 3-D one);
* ``item_ids`` (optional): the benchmark's item ids in the file's order; the
  parameters are then matched to the benchmark by id (every benchmark item needs
  one), else the file must cover the benchmark's items in order;
* ``anchor_points`` and ``anchor_weights`` (optional; tinyBenchmarks' names
  ``seen_examples`` / ``examples_weights`` also accepted): item indices (in the
  file's order) and the share of the benchmark each stands for, used as the
  first stage's subset when the space asks for that many items;
* ``anchor_weight`` (optional; ``optimal_lambda`` accepted): gp-IRT's weight on
  the anchor estimate, used until cross-validation can fit one;
* ``source``, ``models`` (optional): where the parameters come from, and how many models fitted them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.estimate.extract import Subset
from evomerge.files import write_bytes_atomic

FORMAT = "evomerge-item-params"
_ALIASES = {"anchor_points": ("seen_examples",), "anchor_weights": ("examples_weights",),
            "anchor_weight": ("optimal_lambda",)}


@dataclasses.dataclass
class ItemParams:
    """2PL parameters of every item of one benchmark, in the benchmark's order."""

    a: np.ndarray                      # items x dims
    b: np.ndarray                      # items
    item_ids: list[str] | None = None
    anchor_points: np.ndarray | None = None
    anchor_weights: np.ndarray | None = None
    anchor_weight: float | None = None
    source: str = ""
    models: int | None = None

    def __post_init__(self):
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64)
        where = self.source or "item parameters"
        if self.a.ndim != 2 or self.b.shape != (self.a.shape[0],) or self.a.shape[0] == 0:
            raise EvomergeError(f"{where}: A must be items x dims and B one difficulty per item, "
                                f"got A {self.a.shape}, B {self.b.shape}")
        if not (np.all(np.isfinite(self.a)) and np.all(np.isfinite(self.b))):
            raise EvomergeError(f"{where}: A and B must be finite numbers")
        if self.item_ids is not None:
            self.item_ids = [str(i) for i in self.item_ids]
            if len(self.item_ids) != self.n_items or len(set(self.item_ids)) != self.n_items:
                raise EvomergeError(f"{where}: item_ids must name each of its {self.n_items} items once")
        if (self.anchor_points is None) != (self.anchor_weights is None):
            raise EvomergeError(f"{where}: anchor_points and anchor_weights come together")
        if self.anchor_points is not None:
            self.anchor_points = np.asarray(self.anchor_points, dtype=np.int64).ravel()
            self.anchor_weights = np.asarray(self.anchor_weights, dtype=np.float64).ravel()
            points = self.anchor_points
            if (len(points) != len(self.anchor_weights) or len(points) == 0 or len(set(points.tolist())) != len(points)
                    or points.min() < 0 or points.max() >= self.n_items or np.any(self.anchor_weights < 0)):
                raise EvomergeError(f"{where}: anchor_points must be distinct item indices below {self.n_items}, "
                                    "with one non-negative weight each")
        if self.anchor_weight is not None and not 0.0 <= float(self.anchor_weight) <= 1.0:
            raise EvomergeError(f"{where}: anchor_weight must lie in [0, 1], got {self.anchor_weight}")

    @property
    def n_items(self) -> int:
        return int(self.a.shape[0])

    @property
    def dims(self) -> int:
        return int(self.a.shape[1])

    def for_items(self, item_ids: Sequence[str], benchmark: str) -> "ItemParams":
        """These parameters in the order of a benchmark's items (by id when the file names them)."""
        where = self.source or "item parameters"
        item_ids = [str(i) for i in item_ids]
        if self.item_ids is None:
            if self.n_items != len(item_ids):
                raise EvomergeError(f"{where} cover {self.n_items} items, benchmark {benchmark!r} has "
                                    f"{len(item_ids)} (add item_ids to match them by id)")
            return dataclasses.replace(self, item_ids=item_ids)
        position = {item: i for i, item in enumerate(self.item_ids)}
        missing = [i for i in item_ids if i not in position]
        if missing:
            raise EvomergeError(f"{where} have no parameters for {len(missing)} items of benchmark {benchmark!r} "
                                f"(first: {missing[0]!r})")
        order = np.array([position[i] for i in item_ids], dtype=np.int64)
        anchors = weights = None
        if self.anchor_points is not None:
            new_position = {int(old): new for new, old in enumerate(order)}
            kept = [k for k, p in enumerate(self.anchor_points) if int(p) in new_position]
            if len(kept) == len(self.anchor_points):
                anchors = np.array([new_position[int(self.anchor_points[k])] for k in kept], dtype=np.int64)
                weights = self.anchor_weights
        return dataclasses.replace(self, a=self.a[order], b=self.b[order], item_ids=item_ids,
                                   anchor_points=anchors, anchor_weights=weights)

    def first_stage(self, size: int) -> Subset | None:
        """The file's anchors as a first stage of ``size`` items (None unless it has exactly that many)."""
        if self.anchor_points is None or len(self.anchor_points) != size:
            return None
        order = np.argsort(self.anchor_points)
        weights = self.anchor_weights[order]
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(size, 1.0 / size)
        return Subset(indices=self.anchor_points[order], weights=weights, strategy="file", seed=0,
                      n_total=self.n_items)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        data = {"format": FORMAT, "A": self.a.tolist(), "B": self.b.tolist(), "item_ids": self.item_ids,
                "source": self.source, "models": self.models}
        if self.anchor_points is not None:
            data["anchor_points"] = self.anchor_points.tolist()
            data["anchor_weights"] = self.anchor_weights.tolist()
        if self.anchor_weight is not None:
            data["anchor_weight"] = float(self.anchor_weight)
        return data

    def save(self, path: str | Path) -> Path:
        """Write the JSON layout atomically (the item bank's files)."""
        return write_bytes_atomic(path, json.dumps(self.to_dict()).encode())

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> "ItemParams":
        if not hasattr(data, "keys") or "A" not in data or "B" not in data:
            raise EvomergeError(f"{where} is no item-parameter file: it needs arrays A and B "
                                "(docs/estimate.md, 'Item parameters from a file')")

        def field(name):
            for key in (name, *_ALIASES.get(name, ())):
                if key in data:
                    return data[key]
            return None

        try:
            a, b = np.asarray(data["A"], dtype=np.float64), np.asarray(data["B"], dtype=np.float64)
            if a.ndim == 3:  # tinyBenchmarks: A (1, dims, items), B (1, 1, items); logit sum_d (a_d theta_d - b)
                if a.shape[0] != 1 or b.shape != (1, 1, a.shape[2]):
                    raise EvomergeError(f"{where}: a 3-D A must be 1 x dims x items with B 1 x 1 x items, "
                                        f"got A {a.shape}, B {b.shape}")
                a, b = a[0].T, a.shape[1] * b[0, 0]
            ids = field("item_ids")
            anchor_weight = field("anchor_weight")
            models = field("models")
            return cls(a=a, b=b, item_ids=None if ids is None else [str(i) for i in np.asarray(ids).tolist()],
                       anchor_points=field("anchor_points"), anchor_weights=field("anchor_weights"),
                       anchor_weight=None if anchor_weight is None else float(np.asarray(anchor_weight)),
                       source=str(np.asarray(field("source"))) if field("source") is not None else where,
                       models=None if models is None else int(np.asarray(models)))
        except (TypeError, ValueError) as exc:
            raise EvomergeError(f"{where}: bad item parameters: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> "ItemParams":
        """Read a ``.json`` or ``.npz`` file of the documented layout."""
        path = Path(path)
        where = f"item-parameter file {path}"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise EvomergeError(f"cannot read {where}: {exc}") from exc
        if path.suffix == ".npz":
            try:
                with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
                    data = {key: arrays[key] for key in arrays.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise EvomergeError(f"cannot read {where}: {exc}") from exc
        elif path.suffix == ".json":
            try:
                data = json.loads(raw.decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise EvomergeError(f"cannot read {where}: {exc}") from exc
        else:
            raise EvomergeError(f"{where} must be .json or .npz (a pickle would run code when read: convert it, "
                                "docs/estimate.md)")
        params = cls.from_mapping(data, where)
        if params.source == where:
            params.source = str(path)
        return params


def benchmark_key(bench: Any) -> str:
    """A hash of what a benchmark asks and how it is scored: its items (ids, prompts, answers,
    choices, labels), item kind, kind settings and prompting (few-shot examples, chat, delimiter).

    Two studies whose benchmarks share this key ask the same questions the same way, so
    item parameters fitted by one describe the other's items (a renamed file or a moved
    folder keeps its key; a changed item, template or scoring option changes it).
    """
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return repr(value)

    content = {"kind": getattr(bench, "kind", None), "settings": plain(getattr(bench, "settings", None)),
               "prompting": plain(getattr(bench, "prompting", None)),
               "items": [plain(item) for item in getattr(bench, "items", [])]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
