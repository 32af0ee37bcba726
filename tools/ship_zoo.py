"""Ship the demo zoo inside the package: build it with `evomerge make-zoo`, store it in evomerge/zoo/shipped/.

    python tools/ship_zoo.py                              # build (seed 0, full profile), ship in bfloat16
    python tools/ship_zoo.py --from runs/zoo --dtype float32

The weights are stored in ``--dtype`` (the demo's figures with each: docs/search.md, "The shipped zoo");
the manifest records the zoo version, seed, profile, the commit and the command that built it, the dtype
and a SHA-256 per file (`evomerge.zoo.shipped`; tests/test_zoo.py checks them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.zoo.build import load_zoo_manifest, zoo_is_complete  # noqa: E402
from evomerge.zoo.shipped import MANIFEST, SHIPPED_ZOO, file_digest, zoo_files  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def cast_weights(folder: Path, dtype: torch.dtype) -> None:
    """Every safetensors file and config of ``folder`` in ``dtype`` (floating tensors only)."""
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, str(path), metadata)
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if "torch_dtype" in data or "dtype" in data:
            data["torch_dtype" if "torch_dtype" in data else "dtype"] = str(dtype).removeprefix("torch.")
            config.write_text(json.dumps(data, indent=2) + "\n")


def commit() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    # the recipe's code, not the shipped files a previous run left
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "evomerge/zoo",
                            ":!evomerge/zoo/shipped", ":!evomerge/zoo/smol_experts"], capture_output=True,
                           text=True).stdout.strip()
    return result.stdout.strip() + (" (with uncommitted changes to evomerge/zoo)" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", help="a finished full-profile seed-0 zoo (default: build one)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        command = "evomerge make-zoo --out ZOO --seed 0 --profile full"
        if args.source:
            source = Path(args.source)
            if not zoo_is_complete(source, profile="full", seed=0):
                raise SystemExit(f"{source} is not a finished full-profile seed-0 zoo of this version")
        else:
            source = Path(scratch) / "zoo"
            subprocess.run([sys.executable, "-m", "evomerge.cli", *command.replace("ZOO", str(source)).split()[1:]],
                           check=True, cwd=ROOT)
        staging = Path(scratch) / "shipped"
        shutil.copytree(source, staging)
        cast_weights(staging, DTYPES[args.dtype])
        manifest = load_zoo_manifest(staging)
        if args.source:
            command = (f"python tools/ship_zoo.py --from {args.source} --dtype {args.dtype} "
                       f"({args.source}: built by evomerge's build_zoo, seed 0, full profile, as `evomerge make-zoo` does)")
        manifest["shipped"] = {
            "commit": commit(), "command": command, "dtype": args.dtype,
            "sha256": {p.relative_to(staging).as_posix(): file_digest(p) for p in zoo_files(staging)},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(SHIPPED_ZOO, ignore_errors=True)
        shutil.copytree(staging, SHIPPED_ZOO)
    size = sum(p.stat().st_size for p in zoo_files(SHIPPED_ZOO))
    print(f"shipped {len(manifest['shipped']['sha256'])} files, {size / 1e6:.1f} MB ({args.dtype}) in {SHIPPED_ZOO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
