"""Files evomerge writes (run-folder state, records, reports): atomic, and read back with a one-line error.

Run-folder state (estimators, subsets, responses) is re-read on resume, so a
crash mid-write must never leave a torn file, and a damaged one must say which
file it is. Every such file is written through `atomic_write`: into a temporary
sibling unique to this process and thread (workers sharing a folder never
clobber each other's), renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from evomerge.errors import EvomergeError


def temporary_sibling(path: str | Path, suffix: str = ".tmp") -> Path:
    """A sibling of ``path`` to write before an atomic rename, unique to this process and thread:
    workers racing on one run folder each rename their own complete file into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{suffix}")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling to write ``path``'s contents into; renamed onto ``path`` when the
    block ends, removed when it fails. The sibling keeps ``path``'s suffix (writers that pick a
    format by suffix, like matplotlib, still see it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, ".tmp" + path.suffix)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and an atomic rename."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename."""
    return write_text_atomic(path, json.dumps(data, indent=1))


def read_json(path: str | Path, what: str) -> Any:
    """Parsed contents of ``path``; ``what`` names the file in the error ("estimator file")."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"cannot read {what} {path}: {exc}") from exc
