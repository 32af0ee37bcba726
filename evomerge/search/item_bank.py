"""The item bank: item parameters a study fitted, kept for the next study on the same benchmark.

A study that calibrates fits 2PL parameters for every item of each benchmark,
and cross-validates its subsets' estimators on its calibration merges. None of
that depends on the study's merge space: it describes the items. So it is kept
beside the runs (``<runs root>/.item-params/<benchmark>-<key>-<dims>d.json``, the key a
hash of the benchmark's items and scoring, `evomerge.estimate.benchmark_key`, and the
IRT model's latent dimensions),
and a later study whose benchmark has the same key (and whose space asks for the
same IRT dimensions) starts from it: its subsets
(and their cross-validated mix weights and interval scales, when it asks for
the same stage sizes and strategy) and item parameters are the stored ones, and
its calibration only scores its own endpoints on the subsets' items, for their
abilities. Each entry is a `SubsetEstimator` (docs/estimate.md) with where it came from.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, replace
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.estimate import SubsetEstimator, benchmark_key
from evomerge.files import read_json, write_bytes_atomic

BANK_DIR = ".item-params"


@dataclass
class BankEntry:
    """One benchmark's stored calibration: the estimator it fitted, and what it was fitted on."""

    estimator: SubsetEstimator
    strategy: str
    study: str
    models: int
    made: str
    path: Path

    def stages_match(self, sizes: list[int], strategy: str) -> bool:
        """Whether the stored subsets are the ones a study asking for ``sizes`` by ``strategy`` would use."""
        return self.strategy == strategy and [s.size for s in self.estimator.stages] == sizes


class ItemBank:
    """The folder of stored item parameters shared by the runs under one runs root."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def beside(cls, run_dir: str | Path) -> "ItemBank":
        """The bank of the runs root holding ``run_dir``."""
        return cls(Path(run_dir).resolve().parent / BANK_DIR)

    def path(self, name: str, bench, dims: int) -> Path:
        return self.folder / f"{name}-{benchmark_key(bench)}-{int(dims)}d.json"

    def load(self, name: str, bench, dims: int) -> BankEntry | None:
        """The stored entry for this benchmark's content and an IRT model of ``dims`` dimensions, or None."""
        path = self.path(name, bench, dims)
        if not path.exists():
            return None
        data = read_json(path, "item bank entry")
        try:
            estimator = SubsetEstimator.from_dict(data["estimator"])
            entry = BankEntry(estimator, str(data["strategy"]), str(data.get("study", "")),
                              int(data.get("models", 0)), str(data.get("made", "")), path)
        except (KeyError, TypeError, ValueError) as exc:
            raise EvomergeError(f"item bank entry {path} has a bad field: {exc} (delete it to calibrate afresh)") from exc
        if estimator.n_total != len(bench.items):
            raise EvomergeError(f"item bank entry {path} covers {estimator.n_total} items, benchmark {name!r} has "
                                f"{len(bench.items)} (delete it to calibrate afresh)")
        return entry

    def store(self, name: str, bench, estimator: SubsetEstimator, strategy: str, study: str, models: int) -> Path:
        """Keep a study's fitted estimator for later studies on the same benchmark content (without its
        margin model: that holds this study's endpoints' margins, not the items')."""
        data = {"benchmark": name, "key": benchmark_key(bench), "strategy": strategy, "study": study,
                "models": int(models), "made": datetime.datetime.now().isoformat(timespec="seconds"),
                "estimator": replace(estimator, margin_model=None).to_dict()}
        return write_bytes_atomic(self.path(name, bench, estimator.a.shape[1]), json.dumps(data).encode())
