"""Files evomerge writes are written whole or not at all, each writer through its own temporary sibling."""

from __future__ import annotations

import threading

import pytest

from evomerge.files import atomic_write, write_json, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "records.jsonl"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_writers_sharing_a_folder_never_clobber_each_other(tmp_path):
    """Two workers of one run folder write the same file at once: each renames its own complete copy."""
    path, errors = tmp_path / "estimator.json", []

    def write(n):
        try:
            for _ in range(50):
                write_json(path, {"writer": n, "items": list(range(200))})
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(list(tmp_path.iterdir())) == 1
    assert '"items"' in path.read_text()


def test_the_temporary_keeps_the_suffix(tmp_path):
    with atomic_write(tmp_path / "fitness.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "fitness.png").read_bytes() == b"png"
