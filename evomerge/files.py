"""Files evomerge writes (run-folder state, records, reports, exports): atomic, and every refusal one line.

Run-folder state (estimators, subsets, responses) is re-read on resume, so a
crash mid-write must never leave a torn file, and a damaged one must say which
file it is. Every such file is written through `atomic_write`: into a temporary
sibling unique to this process and thread (workers sharing a folder never
clobber each other's), renamed into place once complete.

When the machine refuses a write (the disk is full, the folder read-only or not
ours), `writing(path)` turns the library's error (an OSError, safetensors' own,
SQLite's "database or disk is full") into one `MachineError` naming the path,
the cause and, where known, how much more space it needs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from evomerge.errors import EvomergeError, MachineError

_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
#: How libraries that hide the OSError word the same causes (safetensors, SQLite, PostgreSQL).
_TEXT_CAUSES = (
    ("no space left on device", "no space left on device"),
    ("database or disk is full", "no space left on device"),
    ("could not extend file", "no space left on device"),
    ("disk quota exceeded", "disk quota exceeded"),
    ("read-only file system", "read-only file system"),
    ("attempt to write a readonly database", "read-only file system"),
    ("read-only transaction", "the database is read-only"),
    ("readonly database", "read-only file system"),
    ("permission denied", "permission denied"),
)


def refusal(error: BaseException) -> str | None:
    """Why the machine refused a write, if ``error`` (or what caused it) says it did: "no space left
    on device", "read-only file system", "permission denied", ...; None for any other error."""
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _ERRNO_CAUSES:
            return _ERRNO_CAUSES[seen.errno]
        text = str(seen).lower()
        for sign, cause in _TEXT_CAUSES:
            if sign in text:
                return cause
        seen = seen.__cause__ or seen.__context__
    return None


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds ``path`` (or would: its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def unwritable(folder: str | Path) -> str | None:
    """Why nothing can be created in ``folder`` (or its nearest existing ancestor): "read-only file
    system", "permission denied"; None when it is writable. For libraries whose error would not say
    (SQLite's "unable to open database file")."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return "read-only file system"
    if not os.access(path, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def megabytes(size: float) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 1e10 else f"{size / 1e9:,.1f} GB"


def machine_error(cause: str, path: str | Path, needs: int | None = None) -> MachineError:
    """One line: "no space left on device: runs/demo/study.db (needs about 3.2 MB more, 0.1 MB free)"."""
    detail = ""
    if cause in ("no space left on device", "disk quota exceeded"):
        free = free_bytes(path)
        detail = (f" (needs about {megabytes(max(needs - free, 0))} more, {megabytes(free)} free)" if needs
                  else f" ({megabytes(free)} free)")
    return MachineError(f"{cause}: {path}{detail}")


@contextmanager
def writing(path: str | Path, needs: int | None = None) -> Iterator[None]:
    """Within: a write the machine refuses ends as one `MachineError` naming ``path`` (``needs``:
    the bytes the whole write takes, when known, for "needs about N MB more")."""
    try:
        yield
    except MachineError:
        raise
    except Exception as error:
        cause = refusal(error)
        if cause is None:
            raise
        raise machine_error(cause, path, needs) from error


def check_free_space(path: str | Path, needs: int, what: str) -> None:
    """Refuse early, with the numbers, a write of ``needs`` bytes the filesystem of ``path`` cannot hold."""
    free = free_bytes(path)
    if needs > free:
        raise MachineError(f"no space left on device for {what}: {path} needs about {megabytes(needs)}, "
                           f"{megabytes(free)} free (needs about {megabytes(needs - free)} more)")


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
    tmp = temporary_sibling(path, ".tmp" + path.suffix)
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
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
