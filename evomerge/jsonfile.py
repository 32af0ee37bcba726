"""JSON (and other small text) files in the run folder: written atomically, read with a one-line error.

Run-folder state (estimators, subsets) is re-read on resume, so a crash mid-write
must never leave a torn file, and a damaged one must say which file it is.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def temporary_sibling(path: str | Path, suffix: str = ".tmp") -> Path:
    """A sibling of ``path`` to write before an atomic rename, unique to this process and thread:
    workers racing on one run folder each rename their own complete file into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{suffix}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename."""
    return write_text_atomic(path, json.dumps(data, indent=1))


def read_json(path: str | Path, what: str) -> Any:
    """Parsed contents of ``path``; ``what`` names the file in the error ("estimator file")."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"cannot read {what} {path}: {exc}") from exc
