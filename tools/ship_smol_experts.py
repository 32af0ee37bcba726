"""Ship the SmolLM2 family's experts (LoRA adapters) inside the package: evomerge/zoo/smol_experts/.

    python tools/ship_smol_experts.py --from runs/smol      # after `evomerge make-zoo --profile smol --train-experts`

The adapters (a few MB each, bfloat16 factors) are copied with a manifest naming the family's version, seed,
recipe, the first/last fine-tuning loss, the commit and command that trained them and a SHA-256 per file
(`evomerge.zoo.shipped.shipped_smol_experts` checks it; `evomerge make-zoo --profile smol` then converts the
GGUF and copies them instead of training).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.zoo.shipped import MANIFEST, SHIPPED_SMOL_EXPERTS, file_digest, zoo_files  # noqa: E402
from evomerge.zoo.smol import SMOL_TASKS, smol_is_complete  # noqa: E402
from ship_zoo import commit  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="runs/smol")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not smol_is_complete(source):
        raise SystemExit(f"{source} is not a finished smol family of this version: evomerge make-zoo --profile smol")
    family = json.loads((source / "zoo.json").read_text())
    built_at = commit()  # before the copy, which is an uncommitted change to evomerge/zoo
    shutil.rmtree(SHIPPED_SMOL_EXPERTS, ignore_errors=True)
    for task in SMOL_TASKS:
        shutil.copytree(source / "experts" / task, SHIPPED_SMOL_EXPERTS / task)
    manifest = {key: family[key] for key in ("version", "seed", "recipe", "first_last_loss", "seconds")}
    manifest["shipped"] = {"commit": built_at,
                           "command": f"evomerge make-zoo --profile smol --train-experts --out {source}",
                           "sha256": {p.relative_to(SHIPPED_SMOL_EXPERTS).as_posix(): file_digest(p)
                                      for p in zoo_files(SHIPPED_SMOL_EXPERTS)}}
    (SHIPPED_SMOL_EXPERTS / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in zoo_files(SHIPPED_SMOL_EXPERTS))
    print(f"shipped {len(SMOL_TASKS)} adapters, {size / 1e6:.1f} MB, in {SHIPPED_SMOL_EXPERTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
