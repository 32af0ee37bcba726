"""The demo zoo and the SmolLM2 family's expert adapters, built once and shipped inside the package.

A first run trains nothing, and gets the same models on every machine.

`tools/ship_zoo.py` builds the full-profile zoo (seed 0) with `make-zoo`, stores its
weights in the package (``evomerge/zoo/shipped/``: base, the three experts,
benchmarks, unlabelled data, and the manifest ``zoo.json``), and records how: the zoo
version, seed, profile, the commit and command that built it, the weights' dtype
and a SHA-256 per file. `ensure_zoo` copies it into place instead of training when
it is asked for that very zoo; `make-zoo` and `demo --zoo-seed N` still build.
`tests/test_zoo.py` checks that the shipped manifest names the code's zoo version
and that every file matches its checksum, so a recipe change that forgets to
ship again fails CI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from evomerge.errors import EvomergeError

SHIPPED_ZOO = Path(__file__).resolve().parent / "shipped"
SHIPPED_SMOL_EXPERTS = Path(__file__).resolve().parent / "smol_experts"
"""The SmolLM2 family's experts as LoRA adapters (`tools/ship_smol_experts.py`), with their own manifest."""
MANIFEST = "zoo.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def zoo_files(folder: Path) -> list[Path]:
    """Every file of a zoo but its manifest, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def shipped_manifest() -> dict | None:
    path = SHIPPED_ZOO / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_matches(version: str, profile: str, seed: int) -> bool:
    """Whether the shipped zoo's weights are the ones asked for (the code's version, that profile and seed);
    its benchmarks' size may differ (the weights do not depend on it: `build.resize_benchmarks`)."""
    manifest = shipped_manifest()
    return (manifest is not None and manifest.get("version") == version and manifest.get("profile") == profile
            and manifest.get("seed") == seed)


def verify_shipped(folder: Path = SHIPPED_ZOO) -> list[str]:
    """Files whose contents differ from the manifest's checksums, or that are missing or extra."""
    manifest = json.loads((folder / MANIFEST).read_text())
    recorded = manifest.get("shipped", {}).get("sha256", {})
    present = {p.relative_to(folder).as_posix(): p for p in zoo_files(folder)}
    wrong = [name for name in recorded if name not in present or file_digest(present[name]) != recorded[name]]
    return wrong + [name for name in present if name not in recorded]


def copy_shipped(out: Path) -> Path:
    """The shipped zoo, checked against its checksums, copied to ``out`` (a fresh folder)."""
    wrong = verify_shipped()
    if wrong:
        raise EvomergeError(f"the shipped zoo in {SHIPPED_ZOO} is damaged ({', '.join(wrong[:3])} do not match its "
                            "checksums); reinstall evomerge, or build one with `evomerge make-zoo`")
    shutil.copytree(SHIPPED_ZOO, out, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def shipped_smol_experts(version: str, seed: int, recipe: dict) -> Path | None:
    """The shipped adapters when they are the ones this version and recipe would train, checked; else None."""
    path = SHIPPED_SMOL_EXPERTS / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("version") != version or manifest.get("seed") != seed or manifest.get("recipe") != recipe:
        return None
    wrong = verify_shipped(SHIPPED_SMOL_EXPERTS)
    if wrong:
        raise EvomergeError(f"the shipped adapters in {SHIPPED_SMOL_EXPERTS} are damaged ({', '.join(wrong[:3])}); "
                            "reinstall evomerge")
    return SHIPPED_SMOL_EXPERTS
