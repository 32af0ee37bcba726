"""JSON files in the run folder: written atomically, read with a one-line error.

Run-folder state (estimators, subsets) is re-read on resume, so a crash mid-write
must never leave a torn file, and a damaged one must say which file it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def read_json(path: str | Path, what: str) -> Any:
    """Parsed contents of ``path``; ``what`` names the file in the error ("estimator file")."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"cannot read {what} {path}: {exc}") from exc
