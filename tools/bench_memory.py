"""Benchmark the memory-tiered merge core: merges that stream 0%, 50% and 100% of the task vectors.

Families: random Llama-shaped models of about 0.25B, 0.5B and 1B parameters,
3 experts each, bfloat16, cached under runs/.cache/bench_memory_<size>/. For
each family and budget (the largest device budget whose plan streams at
least the given share of the task vectors; the base stays on the device; the
streamed blocks live in host memory, or on disk for the last row) a fresh
process loads the core and reports:

* merge s: per-candidate time of `merge_into`, the best of the repeats (first
  s: the first one, which also prepares side data such as threshold tables);
* moved: bytes copied into device staging per candidate, and "walk s" /
  "walk GB/s": the same blocks staged with no merge at all, i.e. what the
  staging pipeline alone achieves, against the copy bandwidth measured in the
  same process ("copy GB/s": one 256 MB bf16 copy_ from host memory to the
  device, bytes counted once); walks and copies alternate, best of each;
* peak accounted device bytes against the budget, and the process's peak RSS.

Then, without weights (configs only), the plans for Llama-2 7B, 13B and 70B
with 3 experts on a 24 GB GPU with 64 GB of host RAM and on an 80 GB GPU with
256 GB, with the projected transfer time per candidate.

    python tools/bench_memory.py                      # all families (needs ~14 GB free RAM for 1B)
    python tools/bench_memory.py --families 0.25B --repeats 2
    python tools/bench_memory.py --plans-only
    python tools/bench_memory.py --markdown runs/bench_memory.json   # the docs tables from saved figures
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_merge import build_models, sync  # noqa: E402

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.merge import MergeCore, Recipe, get_method  # noqa: E402
from evomerge.merge.layout import Layout  # noqa: E402
from evomerge.merge.loading import open_model  # noqa: E402
from evomerge.merge.memory import GiB, Budgets, available_host_bytes  # noqa: E402
from evomerge.merge.planner import DISK, HOST, STAGING_SLOTS, plan_memory, workspace_bytes  # noqa: E402

EXPERTS = 3
FAMILIES = {  # hidden, intermediate, layers, heads, vocab
    "0.25B": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=16, vocab_size=32000),
    "0.5B": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=16, vocab_size=32000),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000),
}
# (label, share of the task vectors streamed, tier they stream from)
BUDGETS = [("0%", 0.0, HOST), ("50%", 0.5, HOST), ("100%", 1.0, HOST), ("100% disk", 1.0, DISK)]
LLAMA2 = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}
MACHINES = {"24 GB GPU, 64 GB host": (24e9, 64e9), "80 GB GPU, 256 GB host": (80e9, 256e9)}
SCORING_HEADROOM = 2 * GiB
HOST_MARGIN = 0.1
H2D_BANDWIDTH, DISK_BANDWIDTH = 25e9, 3e9
RECIPES = {
    "task_arithmetic": Recipe("task_arithmetic", {"weight": [0.5, 0.7, 0.9], "lambda": 0.9}),
    "ties": Recipe("ties", {"weight": [0.5, 0.7, 0.9], "density": 0.5}),
}


def family_paths(size: str, cache: Path):
    return build_models(cache / f"bench_memory_{size}", FAMILIES[size], torch.bfloat16, EXPERTS)


def tv_share_streamed(plan, model_bytes: int) -> float:
    """Share of the task vectors' bytes a plan streams per candidate (the base's excluded)."""
    base = plan.bytes_on(HOST, "base") + plan.bytes_on(DISK, "base")
    return (plan.streamed_bytes() - base) / (EXPERTS * model_bytes)


def budgets_for(base, share: float, tier: str, device: torch.device) -> tuple[int, int]:
    """(device, host) bytes whose plan keeps the base on the device and streams `share` of the task vectors.

    The largest device budget that still streams at least `share`, found by bisection on the
    planner itself (as a core created without `methods` plans it).
    """
    layout = Layout.from_files(open_model(base))
    model = layout.numel * layout.element_size
    fixed = model + layout.passthrough_bytes + workspace_bytes(layout, EXPERTS, (), 1 << 24)
    high = fixed + (1 + EXPERTS) * model + (64 << 20)
    if share == 0:
        return high, 0
    host = int(1.05 * (1 + EXPERTS) * model) if tier == HOST else 0
    low = fixed + STAGING_SLOTS * (1 + EXPERTS) * layout.largest_block * layout.element_size

    def streams(budget: int) -> float:
        plan = plan_memory(layout, EXPERTS, Budgets(device=budget, host=host), pinned=device.type == "cuda")
        return tv_share_streamed(plan, model)

    for _ in range(40):
        middle = (low + high) // 2
        low, high = (middle, high) if streams(middle) >= share - 1e-9 else (low, middle)
    return low, host


def measure(size: str, label: str, methods: list, repeats: int, cache: Path) -> dict:
    """One family at one budget, in this (fresh) process."""
    share, tier = next((s, t) for lab, s, t in BUDGETS if lab == label)
    base, experts = family_paths(size, cache)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_memory, host_memory = budgets_for(base, share, tier, device)
    start = time.perf_counter()
    core = MergeCore(base, experts, device=device, device_memory=device_memory, host_memory=host_memory,
                     cache_orderings=False)
    load_s = time.perf_counter() - start
    model, _ = core.new_model()
    model_bytes = core.numel * core.layout.element_size
    result = {"family": size, "budget": label, "device": str(core.device), "params_M": core.numel / 1e6,
              "load_s": load_s, "device_memory": device_memory, "host_memory": host_memory,
              "tv_share_streamed": tv_share_streamed(core.plan, model_bytes),
              "load_average_start": os.getloadavg()[0], "methods": {}}
    for name in methods:
        times = []
        for seed in range(repeats + 1):
            sync(core.device)
            start = time.perf_counter()
            core.merge_into(model, RECIPES[name], seed=seed)
            sync(core.device)
            times.append(time.perf_counter() - start)
        # best of the repeats: on a shared machine the least disturbed run is the closest to the cost itself
        result["methods"][name] = {"first_s": times[0], "merge_s": min(times[1:]),
                                   "median_s": statistics.median(times[1:]), "times_s": times}
    moved = core.memory_report()["bytes_moved_per_candidate"]
    copies, walks = [], []
    for _ in range(max(3, repeats)):  # interleaved, so both see the same load; best of each
        copies.append(host_copy_bandwidth(core.device))
        start = time.perf_counter()
        for _block, _data in core.stager.walk(core.layout.blocks):
            pass
        sync(core.device)
        walks.append(time.perf_counter() - start)
    walk_s = min(walks)
    report = core.memory_report()
    result.update(moved_bytes=moved, walk_s=walk_s, walk_GBps=moved / walk_s / 1e9 if moved else None,
                  copy_GBps=max(copies), copies_GBps=copies, walks_s=walks,
                  peak_device_bytes=report["peak_device_bytes"], peak_host_bytes=report["peak_host_bytes"],
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  load_average_end=os.getloadavg()[0])
    core.close()
    return result


def paired(size: str, rounds: int, cache: Path) -> dict:
    """One family with three cores in one process (0%, 100% from host, 100% from disk), merges alternated.

    On a shared machine the load drifts between processes; alternating the three cores
    round by round compares them under the same load (per-round ratios, median).
    """
    base, experts = family_paths(size, cache)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores, models = {}, {}
    for label in ("0%", "100%", "100% disk"):
        share, tier = next((s, t) for lab, s, t in BUDGETS if lab == label)
        device_memory, host_memory = budgets_for(base, share, tier, device)
        cores[label] = MergeCore(base, experts, device=device, device_memory=device_memory,
                                 host_memory=host_memory, cache_orderings=False)
        models[label], _ = cores[label].new_model()
    recipe = RECIPES["task_arithmetic"]
    times = {label: [] for label in cores}
    for seed in range(rounds + 1):
        for label, core in cores.items():
            sync(device)
            start = time.perf_counter()
            core.merge_into(models[label], recipe, seed=seed)
            sync(device)
            times[label].append(time.perf_counter() - start)
    result = {"family": size, "rounds": rounds, "method": "task_arithmetic", "times_s": times,
              "moved_bytes": {label: core.memory_report()["bytes_moved_per_candidate"] for label, core in cores.items()},
              "best_s": {label: min(t[1:]) for label, t in times.items()},
              "ratio_to_resident": {label: statistics.median(a / b for a, b in zip(t[1:], times["0%"][1:]))
                                    for label, t in times.items()},
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "load_average": os.getloadavg()[0]}
    for core in cores.values():
        core.close()
    return result


def host_copy_bandwidth(device: torch.device, numel: int = 1 << 27) -> float:
    """Bytes per second (counted once) of one large copy_ from host memory (pinned on CUDA) to the device.

    The ceiling for streaming from the host tier; the disk tier is bounded by it too once
    the files are in the page cache.
    """
    dst = torch.empty(numel, dtype=torch.bfloat16, device=device)
    src = torch.empty(numel, dtype=torch.bfloat16, pin_memory=device.type == "cuda").fill_(1)
    times = []
    for _ in range(4):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return numel * 2 / min(times[1:]) / 1e9


def plans() -> list:
    rows = []
    ties = [get_method("ties")]
    for name, config in LLAMA2.items():
        layout = Layout.from_config({"model_type": "llama", "tie_word_embeddings": False, **config})
        for machine, (gpu, host) in MACHINES.items():
            budgets = Budgets(device=int(gpu - SCORING_HEADROOM), host=int(host * (1 - HOST_MARGIN)))
            row = {"model": name, "machine": machine, "params_B": layout.numel / 1e9}
            try:
                plan = plan_memory(layout, EXPERTS, budgets, methods=ties, pinned=True)
            except EvomergeError as error:
                row["refused"] = str(error)
            else:
                row.update(plan.summary(), transfer_s=plan.transfer_seconds(H2D_BANDWIDTH, DISK_BANDWIDTH))
            rows.append(row)
    return rows


def gb(count) -> str:
    return f"{count / 1e9:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--ties-families", default="0.25B", help="families that also run TIES (slow on CPU)")
    parser.add_argument("--budgets", default=",".join(label for label, _s, _t in BUDGETS),
                        help="which budget rows to measure (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plans-only", action="store_true")
    parser.add_argument("--cache", default=str(ROOT / "runs" / ".cache"))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--markdown", metavar="JSON", nargs="+",
                        help="print the docs/merge.md tables of figures saved by --json (several runs: their rows in order)")
    parser.add_argument("--paired", metavar="FAMILY",
                        help="0%%, 100%% host and 100%% disk cores of one family in one process, merges alternated")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    if args.markdown:
        runs = [json.loads(Path(path).read_text()) for path in args.markdown]
        print("\n\n".join(markdown(figures, plans=i == len(runs) - 1) for i, figures in enumerate(runs)))
        return
    if args.paired:
        row = paired(args.paired, max(3, args.repeats), cache)
        print(json.dumps(row))
        print(f"{row['family']} paired, task_arithmetic, {row['rounds']} rounds: " + ", ".join(
            f"{label}: best {row['best_s'][label]:.2f} s, {row['ratio_to_resident'][label]:.2f} x resident "
            f"(moved {gb(row['moved_bytes'][label])} GB)" for label in row["best_s"]))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "command": " ".join(
                ["python tools/bench_memory.py", *sys.argv[1:]]), "paired": row}, indent=2))
        return
    if args.one:
        methods = [m for m in args.methods.split(",") if m != "ties" or args.one[0] in args.ties_families.split(",")]
        print(json.dumps(measure(args.one[0], args.one[1], methods, args.repeats, cache)))
        return
    figures = {"machine": machine(), "command": " ".join(["python tools/bench_memory.py", *sys.argv[1:]]),
               "merges": [], "plans": plans()}
    if not args.plans_only:
        for size in args.families.split(","):
            family_paths(size, cache)  # built once, outside the measured processes
            need = (2 + 2 * EXPERTS) * family_bytes(size)
            if available_host_bytes() < need:
                print(f"skipping {size}: {available_host_bytes() / 1e9:.1f} GB available, {need / 1e9:.1f} GB needed")
                continue
            for label in args.budgets.split(","):
                command = [sys.executable, __file__, "--one", size, label, "--methods", args.methods,
                           "--ties-families", args.ties_families, "--repeats", str(args.repeats), "--cache", args.cache]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                figures["merges"].append(row)
                print_merge_row(row, flush=True)
                if args.json:  # kept as it grows: a long run cut short still has its rows
                    Path(args.json).write_text(json.dumps(figures, indent=2))
    print_plans(figures["plans"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def machine() -> dict:
    """Where and when the figures were measured."""
    import datetime
    import platform

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def family_bytes(size: str) -> int:
    """Bytes of one bf16 model of the family (from its config; no weights needed)."""
    layout = Layout.from_config({"model_type": "llama", "num_key_value_heads": FAMILIES[size]["num_attention_heads"],
                                 "tie_word_embeddings": False, **FAMILIES[size]})
    return layout.numel * layout.element_size


def print_merge_row(row: dict, flush: bool = False) -> None:
    for name, m in row["methods"].items():
        walk = (f"{row['walk_s']:.2f} s, {row['walk_GBps']:.1f} GB/s = {100 * row['walk_GBps'] / row['copy_GBps']:.0f}% of copy"
                if row["walk_GBps"] else "-")
        print(f"{row['family']:>5} {row['budget']:>9} streams {100 * row['tv_share_streamed']:3.0f}% | {name:15s} "
              f"first {m['first_s']:6.2f} s merge {m['merge_s']:6.2f} s | moved {gb(row['moved_bytes'])} GB, "
              f"walk {walk}, copy {row['copy_GBps']:.1f} GB/s | device {gb(row['peak_device_bytes'])} of "
              f"{gb(row['device_memory'])} GB, host {gb(row['peak_host_bytes'])} GB, RSS {gb(row['peak_rss_bytes'])} GB",
              flush=flush)


def print_plans(rows: list) -> None:
    print(f"\nplans, 3 experts, bf16, TIES; budgets: GPU minus {SCORING_HEADROOM / GiB:.0f} GiB scoring headroom, "
          f"host minus {100 * HOST_MARGIN:.0f}%; transfer at {H2D_BANDWIDTH / 1e9:g} GB/s host->device, "
          f"{DISK_BANDWIDTH / 1e9:g} GB/s disk")
    for row in rows:
        head = f"{row['model']:>4} ({row['params_B']:.2f}B) on {row['machine']}:"
        if "refused" in row:
            print(f"{head} refused: {row['refused']}")
            continue
        print(f"{head} device {gb(row['planned_device_bytes'])} GB (resident {gb(row['resident_model_bytes'])}, "
              f"blocks {gb(row['device_blocks_bytes'])}, staging {gb(row['staging_bytes'])}, workspace "
              f"{gb(row['workspace_bytes'])}), host {gb(row['planned_host_bytes'])} GB, disk "
              f"{gb(row['disk_blocks_bytes'])} GB; streamed {gb(row['streamed_bytes_per_candidate'])} GB/candidate, "
              f"projected transfer {row['transfer_s']:.2f} s/candidate")


def markdown(figures: dict, plans: bool = True) -> str:
    """The merge and plan tables of docs/merge.md ("Memory benchmark") from saved figures.

    effective GB/s = bytes moved / merge time; "staging alone" walks the same blocks
    with no merge; both are given as a share of the copy bandwidth measured in the
    same process, and the merge time also against the same family's 0% row.
    """
    lines = []
    if "machine" in figures:
        m = figures["machine"]
        lines += [f"`{figures.get('command', 'python tools/bench_memory.py')}`: measured {m['date']} on "
                  f"{m['cpus']} CPU(s) ({m['cpu']}), GPU: {m['gpu'] or 'none'}, torch {m['torch']} "
                  f"({m['torch_threads']} threads).", ""]
    if "paired" in figures:
        row = figures["paired"]
        lines += [
            f"| {row['family']}, {row['method']}, {row['rounds']} rounds alternated in one process | merge s / candidate "
            "(best) | x resident (median of per-round ratios) | moved GB | effective GB/s |",
            "|---|---|---|---|---|",
        ]
        for label, best in row["best_s"].items():
            moved = row["moved_bytes"][label]
            lines.append(f"| {label} | {best:.2f} | {row['ratio_to_resident'][label]:.2f} | {gb(moved)} "
                         f"| {f'{moved / best / 1e9:.2f}' if moved else '-'} |")
        lines.append(f"\nPeak RSS of the process holding the three cores: {gb(row['peak_rss_bytes'])} GB; load average "
                     f"{row['load_average']:.1f}.")
        return "\n".join(lines)
    lines += [
        "| family | budget (task vectors streamed) | method | merge s / candidate (first) | x 0% row | moved GB "
        "| effective GB/s (% of copy) | staging alone GB/s (% of copy) | copy GB/s | peak accounted device GB / budget "
        "| peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    resident = {(r["family"], m): v["merge_s"] for r in figures["merges"] if r["budget"] == "0%"
                for m, v in r["methods"].items()}
    for row in figures["merges"]:
        copy = row["copy_GBps"]
        for name, m in row["methods"].items():
            moved = row["moved_bytes"]
            effective = f"{moved / m['merge_s'] / 1e9:.2f} ({100 * moved / m['merge_s'] / 1e9 / copy:.0f}%)" if moved else "-"
            walk = f"{row['walk_GBps']:.2f} ({100 * row['walk_GBps'] / copy:.0f}%)" if row["walk_GBps"] else "-"
            ratio = m["merge_s"] / resident[(row["family"], name)] if (row["family"], name) in resident else None
            lines.append(
                f"| {row['family']} ({row['params_M']:.0f}M) | {row['budget']} ({100 * row['tv_share_streamed']:.0f}%) "
                f"| {name} | {m['merge_s']:.2f} ({m['first_s']:.2f}) | {'-' if ratio is None else f'{ratio:.2f}'} "
                f"| {gb(moved)} | {effective} | {walk} | {copy:.1f} | {gb(row['peak_device_bytes'])} / "
                f"{gb(row['device_memory'])} | {gb(row['peak_rss_bytes'])} |"
            )
    if not plans:
        return "\n".join(lines)
    lines += [
        "",
        "| model | machine | device GB planned / budget | host GB | disk GB | streamed GB / candidate "
        "| projected transfer s / candidate |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in figures["plans"]:
        head = f"| {row['model']} ({row['params_B']:.2f}B) | {row['machine']} |"
        if "refused" in row:
            lines.append(f"{head} refused: {row['refused'].split(': ', 1)[1].split('; ')[0]} | | | | |")
            continue
        lines.append(
            f"{head} {gb(row['planned_device_bytes'])} / {gb(row['device_budget_bytes'])} (resident "
            f"{gb(row['resident_model_bytes'])}, blocks {gb(row['device_blocks_bytes'])}, staging "
            f"{gb(row['staging_bytes'])}, workspace {gb(row['workspace_bytes'])}) | {gb(row['planned_host_bytes'])} "
            f"| {gb(row['disk_blocks_bytes'])} | {gb(row['streamed_bytes_per_candidate'])} | {row['transfer_s']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
