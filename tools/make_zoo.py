#!/usr/bin/env python
"""Build the tiny model zoo (base + experts + benchmark items) on CPU.

Usage: python tools/make_zoo.py --out runs/zoo --seed 0 [--quick] [--bench-items 5000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.zoo import build_zoo, load_zoo_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/zoo", help="zoo folder to write (default runs/zoo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (default 0)")
    parser.add_argument("--quick", action="store_true", help="small, fast profile (used by tests)")
    parser.add_argument("--bench-items", type=int, default=None, help="items per benchmark (default: the profile's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = build_zoo(args.out, seed=args.seed, profile="quick" if args.quick else "full",
                        progress=not args.no_progress, bench_items=args.bench_items)
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = load_zoo_manifest(out)
    print(f"zoo written to {out} ({manifest['profile']} profile, seed {manifest['seed']}): "
          f"tasks {', '.join(manifest['tasks'])}; {manifest['build_seconds']} s wall, "
          f"{manifest['build_cpu_seconds']} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
