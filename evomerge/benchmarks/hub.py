"""Datasets named by their Hugging Face hub id (``openai/gsm8k``), read through ``datasets.load_dataset``.

A benchmark ``path`` that is no local file or folder but reads like a hub id is
loaded as every HF user expects: from the hub when it is reachable, and offline
(``HF_HUB_OFFLINE=1``, or no network) from the local caches: the Arrow cache an
earlier ``load_dataset`` wrote (``HF_DATASETS_CACHE``; `datasets` falls back to
it by itself), else a snapshot ``huggingface_hub`` downloaded into the hub cache
(``hf download --repo-type dataset ID``, ``HF_HUB_CACHE``), which `datasets`
does not look at offline. Anything else is one error naming the id.
"""

from __future__ import annotations

import re
from pathlib import Path

from evomerge.errors import EvomergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".yaml", ".yml"}


def is_hub_id(path) -> bool:
    """``path`` names no local file or folder and reads like ``namespace/name`` (or ``name``); a missing
    ``bench.jsonl`` stays a missing file."""
    text = str(path)
    return (bool(_HUB_ID.match(text)) and Path(text).suffix.lower() not in _LOCAL_SUFFIXES
            and not Path(text).expanduser().exists())


def describe(hub_id: str, config: str | None) -> str:
    """How errors and records name a hub dataset: ``openai/gsm8k`` or ``openai/gsm8k, config main``."""
    return hub_id if config is None else f"{hub_id}, config {config}"


def load_hub_dataset(hub_id: str, config: str | None, split: str | None, where: str):
    """``load_dataset(hub_id, config, split=split)``, online or from a local cache (module docstring)."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # datasets raises many types; each becomes one line below
        first = exc
    snapshot = _cached_snapshot(hub_id)
    if snapshot is not None:
        try:
            return datasets.load_dataset(snapshot, config, split=split)
        except Exception as exc:
            first = exc
    reason = _one_line(first)
    if _unreachable(first) and snapshot is None:
        raise EvomergeError(
            f"{where}: dataset {hub_id!r} is no local file or folder, and neither reachable on the Hugging Face "
            f"hub nor in the local caches ({datasets.config.HF_DATASETS_CACHE}, {_hub_cache()}); load it once "
            f"online, or name a local file ({reason})") from None
    raise EvomergeError(f"{where}: could not load hub dataset {describe(hub_id, config)!r}"
                        f"{f', split {split!r}' if split else ''}: {reason}") from None


def _cached_snapshot(hub_id: str) -> str | None:
    """The folder of a hub-cache snapshot of the dataset, when one was downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed id: no snapshot
        return None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _unreachable(exc: Exception) -> bool:
    """The hub could not be asked (offline, no network) or does not know the id: "neither reachable nor cached"."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "DatasetNotFoundError", "FileNotFoundError", "OfflineModeIsEnabled"})


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
