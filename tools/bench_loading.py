"""What the NaN/inf check costs while model weights stream in (`evomerge.merge.loading.warn_non_finite`).

Writes a synthetic bf16 checkpoint (Llama-like tensor shapes, --gb in size) into
runs/.cache/bench_loading/, then times, over the same tensors: loading each one
as the merge core does (safetensors memory map, copied into a resident buffer;
page cache warm, so this is the fastest a load can be and the check's share is
at its largest) and the check on each tensor as the loader runs it.

    python tools/bench_loading.py            # 1 GB, one thread
    python tools/bench_loading.py --gb 0.2   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.merge.loading import warn_non_finite  # noqa: E402


def write_checkpoint(path: Path, gigabytes: float) -> Path:
    """Layers of a hidden-2048 Llama (4 attention + 3 MLP matrices, two norms) until the size is reached."""
    from safetensors.torch import save_file

    file = path / f"model-{gigabytes:g}GB.safetensors"
    if file.is_file():
        return file
    path.mkdir(parents=True, exist_ok=True)
    hidden, inter, tensors, size, layer = 2048, 5504, {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    while size < gigabytes * 1e9:
        for name, shape in [("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("o", (hidden, hidden)), ("gate", (inter, hidden)), ("up", (inter, hidden)),
                            ("down", (hidden, inter)), ("norm1", (hidden,)), ("norm2", (hidden,))]:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            tensors[f"model.layers.{layer}.{name}.weight"] = tensor
            size += tensor.numel() * 2
        layer += 1
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors import safe_open

    file = write_checkpoint(ROOT / "runs" / ".cache" / "bench_loading", args.gb)
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        names = list(handle.keys())
    read_s, check_s, total = [], [], 0
    for _ in range(args.repeats + 1):  # the first pass warms the page cache and is not counted
        read = check = 0.0
        total = 0
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in names:
                start = time.perf_counter()
                tensor = handle.get_tensor(name)
                torch.empty_like(tensor).copy_(tensor)  # the core's copy into its flat buffer
                middle = time.perf_counter()
                warn_non_finite(tensor, name, file)
                read += middle - start
                check += time.perf_counter() - middle
                total += tensor.numel() * tensor.element_size()
        read_s.append(read)
        check_s.append(check)
    read, check = statistics.median(read_s[1:]), statistics.median(check_s[1:])
    print(f"{total / 1e9:.2f} GB bf16 in {len(names)} tensors, {args.threads} thread(s), median of {args.repeats}")
    print(f"load (warm page cache, copied): {read:.3f} s = {total / read / 1e9:.1f} GB/s")
    print(f"NaN/inf check:                  {check:.3f} s = {total / check / 1e9:.1f} GB/s "
          f"({100 * check / read:.0f}% of the load)")
    print(f"at 7B parameters in bf16 (14 GB) the check adds {14e9 / (total / check) :.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
