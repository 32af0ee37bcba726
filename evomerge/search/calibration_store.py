"""A study's calibration, stored in the study's own database so every worker scores with the same estimators.

Workers on several machines share nothing but the storage URL: the calibration
(every benchmark's full responses of the calibration models, and the fitted
subset estimators) therefore lives in a table of that database next to
Optuna's own, ``evomerge_calibration(study, key, data)``. Plain SQL through the
storage's SQLAlchemy engine works the same on SQLite and PostgreSQL (a blob
column: responses are a few kB, an estimator some hundred kB). Keys:
``inputs`` (what the calibration was made from, JSON), ``responses/<benchmark>``
(the `ResponseMatrix` ``.npz``, stored after every scored model so a worker
taking over continues), ``estimators/<benchmark>`` (JSON) and ``complete``
(written last). The run folder's ``responses/`` and ``estimators/`` are a cache of it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import sqlalchemy as sa
from optuna.study import Study

from evomerge.estimate import ResponseMatrix, SubsetEstimator
from evomerge.search.storage import database_name, rdb_engine, with_retries
from evomerge.search.workers import create_tables

_metadata = sa.MetaData()
_calibration = sa.Table(
    "evomerge_calibration", _metadata,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


def canonical(value: Any) -> Any:
    """``value`` as stored JSON reads back (sorted keys, lists for tuples): comparable with what was stored."""
    return json.loads(json.dumps(value, sort_keys=True))


class CalibrationStore:
    """The calibration of one study, in its storage's database."""

    def __init__(self, engine: sa.engine.Engine, study_name: str):
        self.engine, self.study = engine, study_name
        self.where = database_name(str(engine.url))
        with_retries(lambda: create_tables(engine, _metadata), "creating the calibration table", where=self.where)

    @classmethod
    def of(cls, study: Study, create: bool = True) -> "CalibrationStore | None":
        """The store of ``study`` (None where its storage is no database, or, with ``create=False``,
        where no worker stored a calibration in it yet: readers never create tables)."""
        engine = rdb_engine(study)
        if engine is None or not (create or sa.inspect(engine).has_table(_calibration.name)):
            return None
        return cls(engine, study.study_name)

    # ------------------------------------------------------------ blobs
    def get(self, key: str) -> bytes | None:
        def read():
            with self.engine.connect() as connection:
                row = connection.execute(sa.select(_calibration.c.data).where(
                    _calibration.c.study == self.study, _calibration.c.key == key)).first()
            return None if row is None else bytes(row[0])
        return with_retries(read, f"reading the study's calibration ({key})", where=self.where)

    def put(self, key: str, data: bytes) -> None:
        def write():
            with self.engine.begin() as connection:
                connection.execute(_calibration.delete().where(
                    _calibration.c.study == self.study, _calibration.c.key == key))
                connection.execute(_calibration.insert().values(study=self.study, key=key, data=data))
        with_retries(write, f"storing the study's calibration ({key})", where=self.where)

    def clear(self) -> None:
        def delete():
            with self.engine.begin() as connection:
                connection.execute(_calibration.delete().where(_calibration.c.study == self.study))
        with_retries(delete, "clearing the study's calibration", where=self.where)

    def get_json(self, key: str) -> Any:
        data = self.get(key)
        return None if data is None else json.loads(data.decode())

    def put_json(self, key: str, value: Any) -> None:
        self.put(key, json.dumps(value, sort_keys=True).encode())

    def get_responses(self, benchmark: str) -> ResponseMatrix | None:
        data = self.get(f"responses/{benchmark}")
        where = f"of benchmark {benchmark!r} stored in study {self.study!r}"
        return None if data is None else ResponseMatrix.from_bytes(data, where)

    def put_responses(self, benchmark: str, matrix: ResponseMatrix) -> None:
        self.put(f"responses/{benchmark}", matrix.to_bytes())

    def estimators(self, inputs: Mapping | None = None) -> dict[str, SubsetEstimator] | None:
        """The stored estimators by benchmark once the calibration is complete (and, with
        ``inputs``, made from those inputs), else None."""
        if inputs is not None and self.get_json("inputs") != canonical(inputs):
            return None
        complete = self.get_json("complete")
        if complete is None:
            return None
        return {name: SubsetEstimator.from_dict(self.get_json(f"estimators/{name}")) for name in complete}
