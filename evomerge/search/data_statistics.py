"""Unlabelled prompts for data-informed merging, and the statistics a merge method needs from them.

Data-informed merging reads unlabelled prompts, never the scored items' answers:
each benchmark's `data:` source (a file, or another split of its data), sampled to
the space's `data.prompts` (seeded). A benchmark whose data is its own scored
items (`data: self`, AdaMerging's transductive setting) is said so on the console.

RegMean and Fisher merging read statistics of each expert on its own task's
prompts: an expert named like a benchmark gets that benchmark's prompts, any
other expert the prompts of every benchmark. They are collected once per run
folder, into ``RUN/statistics/`` (`evomerge.merge.statistics.StatisticsFiles`),
each file recording what it was made from, so a resume (or another worker of
the same folder, under the study's lock) reuses them and a changed input
collects them again. Each expert's prompts read go to the study's cost record
(`costs`, phase ``statistics``).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

from optuna.study import Study

from evomerge.benchmarks import Benchmark, Item
from evomerge.benchmarks.prompts import pad_id, prompt_ids
from evomerge.console import ProgressBar, say
from evomerge.merge.statistics import get_kind
from evomerge.search.candidates import CandidateBuilder, statistics_files
from evomerge.search.costs import CostLedger
from evomerge.search.preflight import needs_data
from evomerge.search.space import SearchSpace
from evomerge.search.workers import study_lock

@dataclass
class UnlabelledSet:
    """A benchmark's unlabelled prompts: read with its prompting (few-shot, chat, delimiter)."""

    bench: Benchmark
    items: list[Item]
    transductive: bool


def unlabelled_sets(space: SearchSpace, benchmarks: dict[str, Benchmark], progress: bool = True
                    ) -> dict[str, UnlabelledSet]:
    """Each benchmark with a `data:` source: its prompts, sampled to ``space.data.prompts`` (seeded)."""
    sets = {}
    for spec in space.benchmarks:
        if spec.data is None:
            continue
        bench = benchmarks[spec.name]
        items = list(bench.items) if spec.data.transductive else spec.load_data()
        if len(items) > space.data.prompts:
            picks = sorted(random.Random(f"{space.data.seed}-{spec.name}").sample(range(len(items)), space.data.prompts))
            items = [items[i] for i in picks]
        if spec.data.transductive and progress:
            say(f"benchmark {spec.name!r}: data-informed merging reads its scored items' own prompts "
                "(data: self, AdaMerging's transductive setting), never their answers")
        sets[spec.name] = UnlabelledSet(bench, items, spec.data.transductive)
    return sets


def expert_prompts(space: SearchSpace, sets: dict[str, UnlabelledSet], tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of the prompts each expert's statistics are collected on: its own task's (the benchmark
    named like it), else every benchmark's."""
    ids = {name: prompt_ids(s.bench, s.items, tokenizer) for name, s in sets.items()}
    everything = [prompt for prompts in ids.values() for prompt in prompts]
    return {expert: ids.get(expert, everything) for expert in space.expert_names}


def collect_statistics(space: SearchSpace, run_dir: str | Path, builder: CandidateBuilder,
                       sets: dict[str, UnlabelledSet], study: Study | None = None, progress: bool = True) -> None:
    """Collect (or keep, when made from the same inputs) every statistic the method needs, per expert."""
    kinds = needs_data(space)
    if not kinds:
        return
    files = statistics_files(run_dir)
    prompts = expert_prompts(space, sets, builder.tokenizer)

    def inputs(kind: str, expert: str) -> dict:
        return {"kind": kind, "expert": space.experts[expert], "base": space.base, "prompts": prompts[expert],
                "seed": space.data.seed}

    def missing() -> list[tuple[str, int, str]]:
        return [(kind, e, name) for kind in kinds for e, name in enumerate(space.expert_names)
                if files.inputs(kind, e) != inputs(kind, name)]

    todo = missing()
    if not todo:
        return
    lock = (study_lock(study, "statistics", wait=say if progress else None, done=lambda: not missing())
            if study is not None else contextlib.nullcontext(True))
    with lock as mine:
        if not mine:
            return
        with CostLedger(study, "statistics").timed(say if progress else None) as ledger:  # prompts read and seconds, in the study
            for kind, e, name in missing():
                statistic = get_kind(kind)
                count = len(prompts[name])
                if progress:
                    say(f"collecting {kind} statistics of expert {name!r} on {count} unlabelled prompts "
                        f"(cached in {files.folder})")
                model = builder.checkpoint_model(space.experts[name])
                with ProgressBar(f"{kind} {name}", count, enabled=progress) as bar:
                    done = [0]

                    def tick(n: int) -> None:
                        done[0] += n
                        bar.update(done[0])

                    tensors = statistic.collect(model, prompts[name], pad_id(builder.tokenizer),
                                                seed=space.data.seed, tick=tick)
                files.save(kind, e, tensors, inputs(kind, name))
                ledger.add(items=count, models=1)
