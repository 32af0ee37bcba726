"""Race evomerge against mergekit-evolve: same family, same tasks, same number of evaluated candidates.

Issue 25, item 4. One run on this machine, one side after the other:

1. The family's benchmark files (a zoo's or the SmolLM2 family's ``bench/*.jsonl``, scored as its
   manifest says) are written as lm-eval custom tasks over the local files (``OUT/tasks/*.yaml``:
   ``multiple_choice`` -> acc, ``generate`` -> ``generate_until`` + the answer's regex + exact_match,
   ``exact_match`` -> ``loglikelihood`` of answer + eos, acc = greedy).
2. mergekit-evolve (mergekit 0.1.5, ``mergekit/scripts/evolve.py``, HF backend on the CPU) runs a
   config over them (``OUT/evolve.yml``: base + experts, ``--method``, ``layer_granularity``, ``limit``
   documents per task per candidate), with the interpreter of a separate venv that has its extra
   dependencies (``--mke-python``; ray, cma, lm_eval) through tools/peers/mke_driver.py, which starts
   Ray with a logical GPU and times each candidate; tools/peers/sitecustomize.py holds the shims it
   needs here (each with the error it answers). Its CMA-ES population and ``--max-fevals`` are chosen
   so that it evaluates exactly ``--candidates`` candidates (cma's fmin2 runs whole populations past
   ``maxfevals``, then evaluates the final mean: k populations of P + 1).
3. evomerge searches the same genome (``to_search_space`` of that config: the same merge method,
   layer groups, weight ranges, normalize) over the same tasks with ``trials`` = the candidates
   mergekit-evolve evaluated: ``{lm_eval: task.yaml}`` benchmarks where this evomerge has them
   (``--evomerge-benchmarks auto``), else its native benchmarks over the same jsonl items, scored as
   the family's manifest says; ``subset_size`` = ``limit`` items per benchmark per candidate
   (mergekit-evolve scores the first ``limit`` documents, evomerge estimates every item's accuracy
   from its own subset), its calibration and baselines as a converted config gets them by default.
   Its winner is exported (``evomerge export``, no validation: no candidate beyond the budget).
4. Both best candidates (mergekit-evolve's ``final_model``, evomerge's export), and with
   ``--references`` the base and each expert, are measured the same way on every document:
   ``lm_eval.simple_evaluate`` (HF backend, float32, CPU) over the task YAMLs, and ``evomerge eval``
   over the native benchmarks (``--native-eval``, on by default).

Times are wall clock from launching each side's command: to the end of the candidate that ends up
best (its search's pick: mergekit-evolve's best fitness, evomerge's winner), the whole run, and per
candidate (median of each candidate's start-to-end). Load averages are printed at start and end.

    python tools/bench_peers.py --family runs/.cache/zoo-quick-bench --candidates 10 --out runs/bench-peers-quick
    python tools/bench_peers.py --family runs/zoo --candidates 10 --out runs/bench-peers-zoo
    python tools/bench_peers.py --family runs/smol --method ties --layer-granularity 15 --limit 15 \
        --candidates 10 --out runs/bench-peers-smol

mergekit-evolve's venv (once; a separate venv that reuses this one's torch, lm_eval and mergekit
through a .pth file, so nothing is installed into .venv and no CUDA torch is pulled):

    python3 -m venv /work/venv-mke
    echo "$PWD/.venv/lib/python3.11/site-packages" > /work/venv-mke/lib/python3.11/site-packages/main-venv.pth
    /work/venv-mke/bin/pip install ray==2.60.0     # cma, pandas, lm_eval, mergekit come from .venv
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml

PEERS = ROOT / "tools" / "peers"
KINDS = ("multiple_choice", "generate", "exact_match")
SUPPORTED_OPTIONS = {"delimiter", "scoring", "max_new_tokens", "stop", "extract", "compare"}


# ---------------------------------------------------------------- the family and its tasks

def read_family(folder: Path) -> dict:
    """Base, experts (folders; LoRA adapters flagged) and tasks (bench file, kind, options) from a zoo.json."""
    manifest = json.loads((folder / "zoo.json").read_text())
    experts = {}
    for name, rel in manifest["experts"].items():
        path = (folder / rel).resolve()
        experts[name] = {"path": path, "lora": (path / "adapter_config.json").is_file()}
    tasks = {}
    for name, rel in manifest["bench"].items():
        options = dict(manifest.get("benchmarks", {}).get(name, {}))
        unknown = set(options) - SUPPORTED_OPTIONS
        if unknown:
            raise SystemExit(f"{folder}: task {name}: options {sorted(unknown)} are not written as lm-eval tasks here")
        path = (folder / rel).resolve()
        first = json.loads(path.read_text().splitlines()[0])
        kind = options.get("scoring") or manifest.get("scoring", {}).get(name) or (
            "multiple_choice" if "choices" in first else "exact_match")
        if kind not in KINDS:
            raise SystemExit(f"{folder}: task {name}: scoring {kind!r} is not one of {KINDS}")
        tasks[name] = {"path": path, "kind": kind, "options": options}
    return {"folder": folder.resolve(), "base": (folder / manifest["base"]).resolve(), "experts": experts,
            "tasks": tasks}


def special_texts(base: Path) -> tuple[str, str]:
    """(bos prefix, eos text) of the family's tokenizer. evomerge reads ``<bos> + prompt``; lm-eval's HF
    backend adds a bos only where the tokenizer itself does (the zoo's; not SmolLM2's), so where it does not,
    the bos text opens every prompt (lm-eval then adds none: its prompt already starts with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return ("" if bos is None or adds_bos else bos), tokenizer.eos_token


def answer_regex(options: dict) -> str:
    """The lm-eval regex filter standing for evomerge's ``extract`` (one capture group)."""
    extract = options.get("extract") or "whole"
    numeric = options.get("compare") == "numeric"
    value = r"(-?[0-9][0-9,]*)" if numeric else r"([^\n]*\S)"
    if isinstance(extract, dict) and set(extract) == {"after"}:
        return re.escape(extract["after"]) + r"[ \t]*" + value
    if extract == "last_number":
        return r"(-?[0-9][0-9,.]*)"
    if extract == "whole":
        return r"^\s*([\s\S]*\S)"
    raise SystemExit(f"extract {extract!r} is not written as an lm-eval filter here")


def task_yaml(name: str, task: dict, eos: str, bos: str = "") -> tuple[dict, str]:
    """An lm-eval custom task over the task's jsonl, and the metric mergekit-evolve reads (``metric,filter``)."""
    options, kind = task["options"], task["kind"]
    delimiter = options.get("delimiter", "")
    body = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(task["path"])}}, "test_split": "test",
            "doc_to_text": bos + "{{prompt}}", "target_delimiter": delimiter}
    if kind == "multiple_choice":
        body.update(output_type="multiple_choice", doc_to_choice="{{choices}}", doc_to_target="label",
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
        return body, "acc,none"
    if kind == "exact_match":   # evomerge: teacher-forced argmax of answer + eos == lm-eval's is_greedy
        # lm-eval 0.4.13 puts no target_delimiter before a loglikelihood continuation: the delimiter goes in it
        body.update(output_type="loglikelihood", doc_to_target=delimiter + "{{answer}}" + eos, target_delimiter="",
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
        return body, "acc,none"
    body.update(output_type="generate_until", doc_to_target="{{answer}}",
                generation_kwargs={"until": list(options.get("stop") or [eos]),
                                   "max_gen_toks": int(options.get("max_new_tokens", 256)), "do_sample": False},
                filter_list=[{"name": "answer", "filter": [
                    {"function": "regex", "regex_pattern": answer_regex(options), "group_select": -1},
                    {"function": "take_first"}]}],
                metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    return body, "exact_match,answer"


def write_tasks(family: dict, out: Path, prefix: str) -> dict[str, dict]:
    """OUT/tasks/<prefix>_<task>.yaml per task: name -> {yaml, metric, task}."""
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = special_texts(family["base"])
    written = {}
    for task_name, task in family["tasks"].items():
        name = f"{prefix}_{task_name}"
        body, metric = task_yaml(name, task, eos, bos)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
        written[name] = {"yaml": path, "metric": metric, "task": task_name}
    return written


# ---------------------------------------------------------------- the two configs

def num_layers(base: Path) -> int:
    return int(json.loads((base / "config.json").read_text())["num_hidden_layers"])


def evolve_config(family: dict, tasks: dict, args) -> dict:
    """mergekit-evolve's config: LoRA experts as ``base+adapter`` (mergekit merges them when resharding)."""
    base = str(family["base"])
    models = [f"{base}+{e['path']}" if e["lora"] else str(e["path"]) for e in family["experts"].values()]
    return {
        "genome": {"models": models, "base_model": base, "merge_method": args.method,
                   "layer_granularity": args.layer_granularity,
                   "normalize": args.method in ("ties", "dare_ties", "linear"),   # mergekit-evolve's default, written out
                   "allow_negative_weights": False},
        "tasks": [{"name": name, "metric": t["metric"]} for name, t in tasks.items()],
        "limit": args.limit,
        "apply_chat_template": False,   # the families' prompts are plain text (no chat template in the zoo)
        "fewshot_as_multiturn": False,
    }


def lm_eval_benchmarks_available() -> bool:
    """Whether this evomerge reads ``{lm_eval: task}`` benchmarks (issue 25 item 1)."""
    return importlib.util.find_spec("evomerge.benchmarks.lmeval") is not None


def evomerge_space(family: dict, tasks: dict, config: dict, trials: int, args, use_lm_eval: bool) -> dict:
    """evomerge's space: the genome as ``to_search_space`` maps mergekit-evolve's, the family's own expert
    folders (LoRA adapters read as such), the same tasks (lm-eval, or native over the same items)."""
    from evomerge.search.evolve_config import to_search_space

    space = to_search_space(config, "peers", "evolve.yml")
    space["models"] = {"base": str(family["base"]),
                       "experts": {name: str(e["path"]) for name, e in family["experts"].items()}}
    benchmarks = []
    for entry, (name, t) in zip(space["benchmarks"], tasks.items()):
        if use_lm_eval:
            entry = {k: v for k, v in entry.items() if k != "limit"}   # the subset is the estimator's, below
            entry.update(name=name, lm_eval=str(t["yaml"]))
        else:
            task = family["tasks"][t["task"]]
            entry = {"name": name, "path": str(task["path"]), "weight": entry["weight"], **task["options"]}
            if task["kind"] == "generate":
                entry["scoring"] = "generate"
        benchmarks.append(entry)
    space["benchmarks"] = benchmarks
    space["estimator"] = {"subset_size": args.limit}
    space["optimizer"] = {**space["optimizer"], "trials": trials, "seed": args.seed}
    if args.evomerge_calibration_merges is not None:
        space["estimator"]["calibration_merges"] = args.evomerge_calibration_merges
    if args.no_evomerge_baselines:
        space["optimizer"]["baselines"] = False
    space["device"] = "cpu"
    return space


# ---------------------------------------------------------------- mergekit-evolve's budget

def cma_plan(candidates: int, dim: int) -> tuple[int, int]:
    """(popsize, maxfevals) under which cma.fmin2 (as mergekit-evolve calls it) evaluates exactly
    ``candidates`` points; found by running fmin2 on a dummy objective (the count does not depend on it)."""
    import cma
    import numpy as np

    default = 4 + int(3 * math.log(dim))
    sizes = sorted(range(2, candidates), key=lambda p: (p != default, abs(p - default)))
    for popsize in sizes:
        if (candidates - 1) % popsize:
            continue
        for maxfevals in range(1, candidates + 1):
            count = [0]

            def objective(xs, count=count):
                count[0] += len(xs)
                return [float(np.sum(np.square(x))) for x in xs]

            cma.fmin2(None, parallel_objective=objective, x0=np.full(dim, 0.3), sigma0=1 / 6,
                      options={"maxfevals": maxfevals, "popsize": popsize, "seed": 1, "verbose": -9,
                               "verb_log": 0, "verb_disp": 0})
            if count[0] == candidates:
                return popsize, maxfevals
            if count[0] > candidates:
                break
    raise SystemExit(f"no CMA-ES population makes mergekit-evolve evaluate exactly {candidates} candidates "
                     "(it evaluates k populations of P, then their mean: k*P + 1); try another --candidates")


def genome_dim(family: dict, args) -> int:
    groups = num_layers(family["base"]) // args.layer_granularity if args.layer_granularity else 1
    params = 2 if args.method in ("ties", "dare_ties") else 1
    return groups * len(family["experts"]) * params


# ---------------------------------------------------------------- running the sides

def child_env(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled", RAY_DEDUP_LOGS="0")
    return env


def evomerge_command(*arguments: str) -> list[str]:
    """evomerge's CLI from this checkout (run with cwd=ROOT), not whatever an editable install points at."""
    return [sys.executable, "-c", "import sys; from evomerge.cli import main; sys.exit(main())", *arguments]


def evomerge_env(args) -> dict:
    env = child_env(args)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_logged(command: list[str], log: Path, env: dict, cwd: Path = ROOT) -> tuple[float, float, int]:
    """Run ``command`` to ``log``; (launch unix time, wall seconds, exit code)."""
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        launched = time.time()
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return launched, time.time() - launched, code


def run_mergekit_evolve(out: Path, args, popsize: int, maxfevals: int) -> dict:
    storage = out / "mke"
    shutil.rmtree(storage, ignore_errors=True)
    log = out / "mke-candidates.jsonl"
    log.unlink(missing_ok=True)
    command = [args.mke_python, str(PEERS / "mke_driver.py"), "--log", str(log), "--ray-cpus", "1",
               "--cma-seed", str(args.seed + 1),   # cma reads seed 0 as "from the clock"
               "--", str(out / "evolve.yml"), "--storage-path", str(storage), "--max-fevals", str(maxfevals),
               "--force-population-size", str(popsize), "--no-merge-cuda",
               "--in-memory" if args.mke_mode == "in-memory" else "--no-in-memory",
               "--task-search-path", str(out / "tasks"), "--random-seed", str(args.seed),
               "--batch-size", str(args.batch_size)]
    env = child_env(args)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PEERS), env.get("PYTHONPATH", "")) if p)
    launched, wall, code = run_logged(command, out / "mke.log", env, cwd=out)   # cma writes outcmaes/ there
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if code != 0 or not rows:
        tail = "\n".join((out / "mke.log").read_text().splitlines()[-15:])
        raise SystemExit(f"mergekit-evolve failed (exit {code}); {out / 'mke.log'} ends:\n{tail}")
    scored = [r for r in rows if r["score"] is not None]
    best = max(scored, key=lambda r: (r["score"], -r["candidate"]))   # cma keeps the first of equal fitness
    return {"command": command, "launched": launched, "wall_s": wall, "candidates": len(rows),
            "best_candidate": best["candidate"], "best_fitness": best["score"] / len(args.task_names),
            "to_best_s": best["end_unix"] - launched,
            "setup_s": rows[0]["start_unix"] - launched,
            "per_candidate_s": [r["end_unix"] - r["start_unix"] for r in rows],
            "model": storage / "final_model"}


def run_evomerge(out: Path, args, trials: int) -> dict:
    from evomerge.search.records import Ranking
    from evomerge.search.runs import load_run_space, open_existing_study

    run = out / "evomerge"
    shutil.rmtree(run, ignore_errors=True)
    bank = out / ".item-params"   # evomerge's item bank beside the run: a later study reuses its calibration
    if not args.keep_item_bank:
        shutil.rmtree(bank, ignore_errors=True)
    banked = bank.is_dir() and any(bank.iterdir())
    command = evomerge_command("search", str(out / "space.yaml"), "--run-dir", str(run), "--no-progress")
    launched, wall, code = run_logged(command, out / "evomerge.log", evomerge_env(args))
    if code != 0:
        tail = "\n".join((out / "evomerge.log").read_text().splitlines()[-15:])
        raise SystemExit(f"evomerge search failed (exit {code}); {out / 'evomerge.log'} ends:\n{tail}")
    export = out / "evomerge-export"
    export_cmd = evomerge_command("export", str(run), "--out", str(export), "--force")
    _, export_s, code = run_logged(export_cmd, out / "evomerge-export.log", evomerge_env(args))
    if code != 0:
        raise SystemExit(f"evomerge export failed (exit {code}); see {out / 'evomerge-export.log'}")
    space = load_run_space(run)
    study = open_existing_study(run)
    trials_done = sorted((t for t in study.trials if t.datetime_complete), key=lambda t: t.number)
    winner = Ranking.of(space).winner(study).trial
    recipe = json.loads((export / "evomerge_recipe.json").read_text())
    exported = recipe.get("details", {}).get("trial", winner.number)
    if exported != winner.number:
        raise SystemExit(f"evomerge exported trial {exported}, its winner is {winner.number}")
    return {"command": command, "launched": launched, "wall_s": wall, "export_s": export_s,
            "candidates": len(trials_done), "best_candidate": winner.number,
            "best_fitness": Ranking.of(space).fitness(winner.values),
            "baselines": sum(1 for t in trials_done if t.user_attrs.get("baseline")),
            "item_bank_reused": banked,
            "to_best_s": winner.datetime_complete.timestamp() - launched,
            "setup_s": min(t.datetime_start.timestamp() for t in trials_done) - launched,
            "per_candidate_s": [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials_done],
            "model": export}


# ---------------------------------------------------------------- measuring the winners

def lm_eval_accuracy(model: Path, tasks: dict, args, base: Path) -> dict[str, float]:
    """Every document of every task, lm-eval's HF backend, float32 on the CPU (a LoRA adapter through peft=)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(model), "dtype": "float32"}
    if (model / "adapter_config.json").is_file():
        model_args.update(pretrained=str(base), peft=str(model))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=list(tasks), device="cpu",
        batch_size=args.batch_size, log_samples=False, bootstrap_iters=0, apply_chat_template=False,
        task_manager=TaskManager(include_path=str(args.out / "tasks"), include_defaults=False), verbosity="WARNING")
    found = {}
    for name, t in tasks.items():
        found[name] = float(results["results"][name][t["metric"]])
    return found


def native_accuracy(models: dict[str, Path], out: Path, args) -> dict[str, dict[str, float]]:
    """``evomerge eval`` of every model over the native benchmarks (the same items), from its records."""
    space = yaml.safe_load((out / "space.yaml").read_text())
    if any("lm_eval" in b for b in space["benchmarks"]):
        return {}
    records = out / "final" / "native"
    shutil.rmtree(records, ignore_errors=True)
    command = evomerge_command("eval", *map(str, models.values()), "--space", str(out / "space.yaml"),
                               "--records", str(records), "--batch-size", str(args.batch_size))
    _, _, code = run_logged(command, out / "final" / "native-eval.log", evomerge_env(args))
    if code != 0:
        raise SystemExit(f"evomerge eval failed (exit {code}); see {out / 'final' / 'native-eval.log'}")
    found = {}
    for label, model in models.items():
        folder = records / Path(model).name
        found[label] = {}
        for bench in space["benchmarks"]:
            rows = [json.loads(line) for line in (folder / f"{bench['name']}.jsonl").read_text().splitlines()]
            found[label][bench["name"]] = sum(bool(r["correct"]) for r in rows) / len(rows)
    return found


# ---------------------------------------------------------------- report

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean_accuracy(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")


def report(results: dict) -> str:
    tasks = results["tasks"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [(f"family {results['family']}: {results['method']}, layer_granularity {results['layer_granularity']}, "
              f"{results['candidates']} candidates each, limit / subset {results['limit']} items per task, "
              f"{results['threads']} thread(s), evomerge benchmarks: {results['evomerge_benchmarks']}"),
             f"machine {results['machine']} ({results['cpus']} CPUs), commit {results['commit']}; {versions}",
             f"load average (1, 5, 15 min) at start {results['load_start']}, at end {results['load_end']}",
             (f"mergekit-evolve: {results.get('mke_mode', 'in-memory')}, CMA-ES population {results['mke_popsize']}, "
              f"--max-fevals {results['mke_max_fevals']}"),
             ""]
    head = ("| | candidates | best (fitness on its items) | to best s | run s | setup s "
            "| per candidate s (median, mean) |")
    lines += [head, "|---|---|---|---|---|---|---|"]
    for side in ("mergekit-evolve", "evomerge"):
        r = results[side]
        extra = f", {r['baselines']} baselines" if "baselines" in r else ""
        extra += ", item bank reused" if r.get("item_bank_reused") else ""
        lines.append(f"| {side} | {r['candidates']}{extra} | #{r['best_candidate']} ({r['best_fitness']:.3f}) | "
                     f"{r['to_best_s']:.1f} | {r['wall_s']:.1f} | {r['setup_s']:.1f} | "
                     f"{median(r['per_candidate_s']):.2f}, {statistics.fmean(r['per_candidate_s']):.2f} |")
    lines += ["", ("to best: from launching the command to the end of the candidate its search picks; run: the "
                   "whole command (mergekit-evolve: with saving its final model; evomerge: search, export not "
                   "included); setup: launch to the first candidate's start (mergekit-evolve: imports, resharding, "
                   "Ray, its actor; evomerge: imports, checks, calibration)")]
    for measure in ("lm_eval", "native"):
        rows = results["final"].get(measure) or {}
        if not rows:
            continue
        title = ("lm_eval.simple_evaluate, every document (HF backend, float32, CPU)" if measure == "lm_eval"
                 else "evomerge eval, every item (native benchmarks)")
        lines += ["", f"full-benchmark accuracy: {title}", "",
                  "| model | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
        for label, scores in rows.items():
            lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks)
                         + f" | {mean_accuracy(scores):.3f} |")
    return "\n".join(lines)


def versions(args) -> dict[str, str]:
    from importlib.metadata import version

    found = {name: version(name) for name in ("torch", "transformers", "lm_eval", "mergekit", "cma")}
    ray = subprocess.run([args.mke_python, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True, check=False)
    found["ray (mergekit-evolve's venv)"] = ray.stdout.strip() or "missing"
    return found


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           check=False, cwd=ROOT).stdout.strip()
    return head + ("+changes" if dirty else "")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=ROOT / "runs" / ".cache" / "zoo-quick-bench",
                        help="a folder with zoo.json, base, experts, bench (make-zoo --quick / --profile smol)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-peers")
    parser.add_argument("--candidates", type=int, default=10,
                        help="candidates each side evaluates (mergekit-evolve: k populations of P + its final mean)")
    parser.add_argument("--method", default="task_arithmetic", choices=("task_arithmetic", "ties", "dare_ties", "linear"))
    parser.add_argument("--layer-granularity", type=int, default=2, help="layers per layer group (0: one global group)")
    parser.add_argument("--limit", type=int, default=40,
                        help="items per task per candidate: mergekit-evolve's limit, evomerge's subset_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of every process (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size (mergekit-evolve, final eval)")
    parser.add_argument("--mke-python", default="/work/venv-mke/bin/python",
                        help="interpreter of a venv with mergekit-evolve's extra deps (ray, cma, lm_eval)")
    parser.add_argument("--mke-mode", choices=("on-disk", "in-memory"), default="on-disk",
                        help="mergekit-evolve's --no-in-memory (its default, and the faster here) or --in-memory "
                             "(its HFLM is built without batch_size: lm-eval scores one request at a time)")
    parser.add_argument("--evomerge-benchmarks", choices=("auto", "native", "lm_eval"), default="auto",
                        help="lm_eval: {lm_eval: task.yaml} entries (needs evomerge with issue 25 item 1); "
                             "native: the family's own benchmarks over the same items; auto: lm_eval where available")
    parser.add_argument("--evomerge-calibration-merges", type=int, help="estimator.calibration_merges (default: evomerge's)")
    parser.add_argument("--no-evomerge-baselines", action="store_true",
                        help="optimizer.baselines: false (default: evomerge's, baselines are enqueued first and count)")
    parser.add_argument("--keep-item-bank", action="store_true",
                        help="keep OUT/.item-params from an earlier run (evomerge then reuses its item parameters "
                             "and calibrates less); default: removed, the calibration a first study pays")
    parser.add_argument("--references", action="store_true", help="also measure the base and each expert")
    parser.add_argument("--no-native-eval", action="store_true", help="skip the evomerge eval measurement")
    parser.add_argument("--sides", default="mergekit-evolve,evomerge",
                        help="run only these (the other's results are read from --out's results.json)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "final").mkdir(exist_ok=True)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import torch

    torch.set_num_threads(args.threads)

    family = read_family(args.family)
    prefix = "peers"
    tasks = write_tasks(family, args.out, prefix)
    args.task_names = list(tasks)
    config = evolve_config(family, tasks, args)
    (args.out / "evolve.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    use_lm_eval = args.evomerge_benchmarks == "lm_eval" or (
        args.evomerge_benchmarks == "auto" and lm_eval_benchmarks_available())
    if use_lm_eval and not lm_eval_benchmarks_available():
        raise SystemExit("--evomerge-benchmarks lm_eval: this evomerge has no lm_eval benchmarks yet (issue 25 item 1)")
    popsize, maxfevals = cma_plan(args.candidates, genome_dim(family, args))
    sides = set(args.sides.split(","))
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(family=str(args.family), method=args.method, layer_granularity=args.layer_granularity,
                   candidates=args.candidates, limit=args.limit, threads=args.threads, tasks=list(tasks),
                   evomerge_benchmarks="lm_eval" if use_lm_eval else "native", load_start=load(),
                   mke_popsize=popsize, mke_max_fevals=maxfevals, mke_mode=args.mke_mode, machine=os.uname().nodename,
                   cpus=os.cpu_count(), versions=versions(args), commit=commit())
    print(f"load average at start: {results['load_start']}", flush=True)

    if "mergekit-evolve" in sides:
        print(f"mergekit-evolve: {args.candidates} candidates (population {popsize}, --max-fevals {maxfevals}) ...",
              flush=True)
        results["mergekit-evolve"] = jsonable(run_mergekit_evolve(args.out, args, popsize, maxfevals))
    trials = results["mergekit-evolve"]["candidates"] if "mergekit-evolve" in results else args.candidates
    space = evomerge_space(family, tasks, config, trials, args, use_lm_eval)
    (args.out / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False, allow_unicode=True))
    if "evomerge" in sides:
        print(f"evomerge: {trials} trials ...", flush=True)
        results["evomerge"] = jsonable(run_evomerge(args.out, args, trials))

    models = {"mergekit-evolve best": Path(results["mergekit-evolve"]["model"]),
              "evomerge best": Path(results["evomerge"]["model"])}
    if args.references:
        models["base"] = family["base"]
        for name, expert in family["experts"].items():
            models[f"expert {name}"] = expert["path"]
    final = {"lm_eval": {}, "native": {}}
    print("measuring on every item ...", flush=True)
    for label, model in models.items():
        final["lm_eval"][label] = lm_eval_accuracy(model, tasks, args, family["base"])
    if not args.no_native_eval:
        final["native"] = native_accuracy(models, args.out, args)
    results["final"] = final
    results["load_end"] = load()
    results_path.write_text(json.dumps(results, indent=1))
    text = report(results)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    main()
