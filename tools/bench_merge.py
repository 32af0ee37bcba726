"""Benchmark the in-memory merge core against mergekit on a ~0.3B random Llama.

Per candidate, our core reads the base and every task vector and writes the
merged weights, so "effective GB/s" = (2 + experts) * model bytes / merge time.
A large torch tensor copy on the same device gives the memory-bandwidth ceiling.

mergekit is timed three ways: the `mergekit-yaml` CLI wall time (interpreter
start, load, merge, save), in-process `run_merge` (load, merge, save), and a
merge-only estimate: run_merge minus separately timed input reads and one
model-sized safetensors write.

    python tools/bench_merge.py            # ~0.3B, bf16, 3 experts, models cached in runs/.cache/
    python tools/bench_merge.py --small    # tiny models, seconds
    python tools/bench_merge.py --size medium   # ~34M parameters: per-candidate costs beyond mergekit's start-up
    python tools/bench_merge.py --family runs/smol   # a real family: SmolLM2-135M and its experts (make-zoo --profile smol)
    python tools/bench_merge.py --small --methods sce,karcher,nearswap --mergekit-methods all

Methods that merge a fixed number of experts (nuslerp: 2; nearswap, arcee_fusion: 1) use the
first ones of the family, with a core of their own; "x mergekit" is mergekit's run_merge time over
the core's time per candidate, both measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.merge import MergeCore, Override, Recipe, recipe_to_mergekit_yaml  # noqa: E402
from evomerge.merge.core import resolve_dtype  # noqa: E402

SIZES = {
    # hidden, intermediate, layers, heads, vocab  -> ~0.30B parameters
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=18, num_attention_heads=16, vocab_size=32000),
    "medium": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, vocab_size=8000),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, vocab_size=1000),
}


def build_models(root: Path, size, dtype: torch.dtype, num_experts: int, seed: int = 0):
    """Write (or reuse) base + experts (= base + 5%-of-std noise) as safetensors; `size` names SIZES or is a config dict."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    experts = [root / f"expert{i}" for i in range(num_experts)]
    if (base / "model.safetensors").is_file() and all((e / "model.safetensors").is_file() for e in experts):
        return base, experts
    cfg = SIZES[size] if isinstance(size, str) else size
    config = LlamaConfig(num_key_value_heads=cfg["num_attention_heads"], tie_word_embeddings=False, max_position_embeddings=512, **cfg)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(base), safe_serialization=True, max_shard_size="100GB")
    del model
    tensors = load_file(str(base / "model.safetensors"))
    for i, path in enumerate(experts):
        generator = torch.Generator().manual_seed(seed + 1 + i)
        noisy = {}
        for name, tensor in tensors.items():
            noise = torch.randn(tensor.shape, generator=generator) * (tensor.float().std().clamp(min=1e-3).item() * 0.05)
            noisy[name] = (tensor.float() + noise).to(tensor.dtype)
        path.mkdir(parents=True, exist_ok=True)
        save_file(noisy, str(path / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", path / "config.json")
        del noisy
    return base, experts


def copy_bandwidth(device, numel: int, dtype=torch.float32, repeats: int = 5) -> float:
    """GB/s of dst.copy_(src) (bytes read + written), the ceiling for a memory-bound merge."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / min(times) / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def recipes(num_experts: int, num_layers: int) -> dict:
    w = [round(0.3 + 0.2 * i, 2) for i in range(num_experts)]
    per_layer = [
        Override(layers=[layer], modules=["mlp"], params={"weight": [round(0.1 * (layer % 5) + 0.2, 2)] * num_experts})
        for layer in range(0, num_layers, 2)
    ]
    return {
        "linear": Recipe("linear", {"weight": w}),
        "task_arithmetic": Recipe("task_arithmetic", {"weight": w, "lambda": 0.9}),
        "task_arithmetic per-layer": Recipe("task_arithmetic", {"weight": w}, per_layer),
        "ties": Recipe("ties", {"weight": w, "density": 0.5}),
        "dare_ties": Recipe("dare_ties", {"weight": w, "density": 0.5}),
        "breadcrumbs": Recipe("breadcrumbs", {"weight": w, "density": 0.8, "gamma": 0.02}),
        "della": Recipe("della", {"weight": w, "density": 0.5, "epsilon": 0.1}),
        "sce": Recipe("sce", {"select_topk": 0.5}),
        "karcher": Recipe("karcher", {}),
        # the experts' weights: the random family's norms are 1 + noise below bf16's resolution, so their
        # task vectors are 0 and have no direction (mergekit's multislerp with a base fails there too)
        "multislerp": Recipe("multislerp", {"weight": w, "task_vectors": False}),
        "nuslerp": Recipe("nuslerp", {"weight": [0.4, 0.6]}),
        "nearswap": Recipe("nearswap", {"t": 0.001}),
        "arcee_fusion": Recipe("arcee_fusion", {}),
        "ram": Recipe("ram", {}),
        "ramplus_tl": Recipe("ramplus_tl", {}),
    }


EXPERTS_MERGED = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}  # methods that take a fixed number of experts


def time_core(core: MergeCore, model, recipe: Recipe, repeats: int) -> tuple[float, float]:
    """(first-call seconds incl. cache building, median seconds of later calls)."""
    sync(core.device)
    start = time.perf_counter()
    core.merge_into(model, recipe, seed=0)
    sync(core.device)
    first = time.perf_counter() - start
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        core.merge_into(model, recipe, seed=seed)
        sync(core.device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def time_mergekit(recipe: Recipe, base, experts, num_layers: int, dtype_name: str, workdir: Path) -> dict:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = recipe_to_mergekit_yaml(recipe, base, experts, num_layers, dtype=dtype_name)
    config_file = workdir / "merge.yaml"
    config_file.write_text(text)
    result = {}
    cli = Path(sys.executable).parent / "mergekit-yaml"
    out = workdir / "cli_out"
    start = time.perf_counter()
    subprocess.run([str(cli), str(config_file), str(out), "--no-copy-tokenizer", "--quiet"], check=True)
    result["cli_s"] = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)

    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    out = workdir / "api_out"
    start = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options)
    result["run_merge_s"] = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)

    # mergekit 0.1.5's plan_in_memory fails (abstract Task in ReturnTensor), so
    # estimate its merge-only time as run_merge minus reading the inputs and
    # writing one model-sized safetensors file, both timed here directly.
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    loaded = [load_file(str(Path(p) / "model.safetensors")) for p in [base, *experts]]
    result["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    save_file(loaded[0], str(workdir / "save_probe.safetensors"))
    result["save_s"] = time.perf_counter() - start
    del loaded
    result["merge_only_est_s"] = max(0.0, result["run_merge_s"] - result["load_s"] - result["save_s"])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models for a quick run (--size small)")
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="random family: full ~0.3B, medium ~34M, small ~1M parameters")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda if available else cpu")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the benchmark recipes")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--mergekit-methods", default="linear,ties,task_arithmetic per-layer",
                        help='comma-separated recipes also timed with mergekit ("all": every timed one)')
    parser.add_argument("--cache", default=str(ROOT / "runs" / ".cache"))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--family", default=None,
                        help="a built family folder (its zoo.json names the base and experts) instead of random models")
    args = parser.parse_args(argv)

    dtype = resolve_dtype(args.dtype)
    start = time.perf_counter()
    if args.family:
        family = Path(args.family)
        manifest_file = family / "zoo.json"
        if not manifest_file.is_file():
            parser.error(f"{family} has no zoo.json")
        manifest = json.loads(manifest_file.read_text())
        root = family
        base = str(family / manifest["base"])
        experts = [str(family / rel) for rel in manifest["experts"].values()]
    else:
        size = "small" if args.small else args.size
        root = Path(args.cache) / f"bench_merge_{size}_{args.dtype}_{args.experts}"
        base, experts = build_models(root, size, dtype, args.experts)
    print(f"models: {root} (ready in {time.perf_counter() - start:.1f}s)")

    start = time.perf_counter()
    core = MergeCore(base, experts, device=args.device)
    load_s = time.perf_counter() - start
    model_bytes = core.numel * core.layout.element_size
    print(f"core: {core.numel / 1e6:.1f}M params, {model_bytes / 1e9:.2f} GB per model ({args.dtype}), "
          f"{core.num_experts} experts, device {core.device}, load {load_s:.1f}s, torch threads {torch.get_num_threads()}")
    bandwidth = copy_bandwidth(core.device, min(core.numel, 1 << 27))
    print(f"memory copy bandwidth (torch copy_, read+write): {bandwidth:.1f} GB/s")
    cores = {core.num_experts: (core, core.new_model()[0])}

    def core_for(num_experts: int) -> tuple:
        """(core, model) merging the first `num_experts` experts (made on first use, not timed)."""
        if num_experts not in cores:
            other = MergeCore(base, experts[:num_experts], device=args.device)
            cores[num_experts] = (other, other.new_model()[0])
        return cores[num_experts]

    all_recipes = recipes(core.num_experts, core.num_layers)
    wanted = args.methods.split(",") if args.methods else list(all_recipes)
    unknown = [name for name in wanted if name not in all_recipes]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(all_recipes)}")
    with_mergekit = wanted if args.mergekit_methods == "all" else args.mergekit_methods.split(",")
    figures = {"models": str(root), "params_M": core.numel / 1e6, "dtype": args.dtype, "experts": core.num_experts,
               "copy_GBps": bandwidth, "core_load_s": load_s, "methods": {}}
    print(f"\n{'method':28s} {'first s':>8s} {'merge s':>8s} {'eff GB/s':>9s}   mergekit s: cli / run_merge / "
          "merge-only est. (x mergekit: run_merge / merge s)")
    for name in wanted:
        recipe = all_recipes[name]
        merged = EXPERTS_MERGED.get(name, core.num_experts)
        name_core, model = core_for(merged)
        first, median = time_core(name_core, model, recipe, args.repeats)
        moved = (2 + merged) * model_bytes
        row = {"experts": merged, "first_s": first, "merge_s": median, "effective_GBps": moved / median / 1e9}
        line = f"{name:28s} {first:8.3f} {median:8.3f} {row['effective_GBps']:9.2f}"
        if not args.no_mergekit and name in with_mergekit:
            with tempfile.TemporaryDirectory() as tmp:
                mk = time_mergekit(recipe, base, experts[:merged], core.num_layers, args.dtype, Path(tmp))
            row["mergekit"] = mk
            row["x_mergekit"] = mk["run_merge_s"] / median
            line += (f"   {mk['cli_s']:.1f} / {mk['run_merge_s']:.1f} / {mk['merge_only_est_s']:.1f}"
                     f" (x{row['x_mergekit']:.1f})")
        figures["methods"][name] = row
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
