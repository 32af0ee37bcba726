"""Search-space files (`search_spaces/*.yaml`): parsed and validated in one place.

Every mistake a user can make in the YAML is reported here, with the key path,
before any model is loaded, so a long search never dies on a typo.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.benchmarks import check_format, is_hub_id, load_benchmark, load_prompts, option_keys
from evomerge.errors import EvomergeError
from evomerge.estimate import DEFAULT_METHOD as DEFAULT_ESTIMATOR, METHODS as ESTIMATORS
from evomerge.estimate.extract import DEFAULT_SUBSET_SIZE, STRATEGY_NAMES
from evomerge.merge.memory import parse_bytes
from evomerge.merge.methods import METHODS
from evomerge.search.dfs_space import DataFlowSpace, parse_dfs_section
from evomerge.search.evolve_config import is_mergekit_evolve, to_search_space
from evomerge.search.optimizers import check_categorical, check_optimizer, check_start

GRANULARITIES = ("global", "layer_group", "layer")
SPLITTABLE_MODULES = ("attention", "mlp")
OBJECTIVE_MODES = ("mean", "per_task")


LEARNABLE_METHODS = ("task_arithmetic",)
"""Methods whose coefficients `evomerge learn` learns (their merge is differentiable in them)."""


def check_learnable(method: str) -> None:
    """Coefficients are learned through task arithmetic's merge (linear in them); refuse other methods."""
    if method not in LEARNABLE_METHODS:
        raise EvomergeError(f"coefficients are learned for {', '.join(LEARNABLE_METHODS)} merges; "
                            f"this space merges with {method!r}")


DEFAULT_CALIBRATION_ITEMS = 60
"""Items beyond the subsets' each calibration merge is scored on, per benchmark (docs/search.md, 'What a search costs')."""
CALIBRATION_MERGES_ON_A_SAMPLE = 4
"""Random in-space merges calibration fits with the endpoints when each answers the subsets and a sample:
4 estimate as well as 8 there and keep calibration + validation within the trials' own item evaluations
(docs/search.md, 'What a search costs'; docs/estimate.md, 'Calibrating on less')."""
CALIBRATION_MERGES_ON_EVERY_ITEM = 8
"""The same with ``calibration_items: all``, where 4 merges estimate worse than 8."""
ITEM_PARAM_MODES = ("reuse", "fit")


# What a space may search, and how, comes from each method's parameter spec (`evomerge.merge.methods`),
# looked up when a space is read, so a method registered later is known too.
def searchable_params(method: str) -> list[str]:
    """The parameters of `method` a space may search (its numeric ones; the method's spec decides)."""
    return [p.name for p in METHODS[method].params if not p.boolean]


@dataclass(frozen=True)
class DataSource:
    """Where a benchmark's unlabelled prompts come from (data statistics, coefficient learning): a file
    or another split of the same data, never the scored items' answers. ``transductive``: the scored
    items' own prompts (AdaMerging's transductive setting), said so wherever they are used."""

    path: str
    split: str | None = None
    transductive: bool = False


@dataclass(frozen=True)
class BenchmarkSample:
    """``sample: N`` (or ``{n: N, seed: S}``): the study scores a seeded random N of the benchmark's items."""

    n: int
    seed: int = 0


@dataclass
class BenchmarkSpec:
    name: str
    path: str                # "" for an lm-eval task (options["lm_eval"] names it)
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)   # fields, template, split, scoring, preset, generate keys, lm_eval...
    data: DataSource | None = None
    sample: BenchmarkSample | None = None

    def load(self, tokenizer=None):
        """The benchmark's items (`evomerge.benchmarks.load_benchmark` with this entry's options; its
        ``sample`` of them where it names one); with ``tokenizer``, a chat template asked for is checked now."""
        bench = load_benchmark(self.path or None, name=self.name, tokenizer=tokenizer, **self.options)
        return bench if self.sample is None else bench.sampled(self.sample.n, self.sample.seed)

    def load_data(self):
        """The benchmark's unlabelled prompts (`DataSource`), read with the entry's own options."""
        if self.data is None:
            raise EvomergeError(f"benchmark {self.name!r} has no data: source of unlabelled prompts")
        return load_prompts(self.data.path, self.name, self.options, split=self.data.split)


@dataclass(frozen=True)
class DataSettings:
    """The `data:` section: how many unlabelled prompts data-informed merging reads, drawn by ``seed``."""

    prompts: int = 64
    seed: int = 0


@dataclass(frozen=True)
class LearnSettings:
    """The `learn:` section: AdaMerging's gradient descent on the merge coefficients (`evomerge learn`)."""

    steps: int = 100
    lr: float = 0.02
    batch: int = 8
    init: float | None = None   # every coefficient's start (None: the middle of its range)


@dataclass(frozen=True)
class Evaluation:
    """How candidates are scored: nested stages of items per benchmark, raced (`docs/search.md`).

    A candidate is scored on the first stage; while its fitness interval still reaches the
    current ``top_k``-th best fitness it is promoted to the next stage. One stage is a plain
    fixed subset. ``"all"`` (last stage only) scores every item.
    """

    stages: tuple
    top_k: int = 5
    level: float = 0.9

    @property
    def racing(self) -> bool:
        return len(self.stages) > 1


@dataclass(frozen=True)
class MergeSpec:
    """The `merge` section: a parameter-space merge's method(s), how finely it is searched, and what.

    With several ``methods`` the method is a gene too (`method: [ties, dare_ties, della]`): every
    method's searched parameters are genes, and a trial's recipe uses those of its method only
    (the others are inactive in it).
    """

    method: str                     # the method (the first of ``methods``)
    granularity: str = "layer_group"
    layer_groups: int = 2
    split_modules: bool = False
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)   # searched parameter -> bounds
    fixed: dict[str, Any] = field(default_factory=dict)                    # parameter -> value, not searched
    methods: tuple[str, ...] = ()   # every method the search may pick (one: the method is no gene)

    def __post_init__(self) -> None:
        if not self.methods:
            object.__setattr__(self, "methods", (self.method,))

    @property
    def searches_method(self) -> bool:
        return len(self.methods) > 1

    @property
    def per_expert(self) -> frozenset:
        """The parameters that take one value per expert (the others are shared by all)."""
        return frozenset().union(*(METHODS[m].per_expert for m in self.methods))

    def params_of(self, method: str) -> list[str]:
        """The searched parameters ``method`` uses (the others are inactive in its trials)."""
        return [name for name in self.ranges if name in METHODS[method].param_names]

    def defaults_of(self, method: str) -> dict[str, float] | None:
        """``method``'s own default for each parameter the space searches, or None when one has none
        (task arithmetic's weight): the merge a data-informed method (RegMean, Fisher) is defined by."""
        values = {name: METHODS[method].param(name).default for name in self.params_of(method)}
        if not values or self.without_default(method):
            return None
        return {name: float(v) for name, v in values.items()}

    def without_default(self, method: str) -> list[str]:
        """The searched parameters of ``method`` that have no numeric default."""
        return [name for name in self.params_of(method) if not _is_number(METHODS[method].param(name).default)]


@dataclass
class SearchSpace:
    """A validated search-space file: a parameter-space `merge` or a data-flow `dfs` search (exactly one).
    Paths are resolved against the working directory it was read from."""

    name: str
    base: str
    experts: dict[str, str]
    merge: MergeSpec | None
    dfs: DataFlowSpace | None
    benchmarks: list[BenchmarkSpec]
    subset_size: int
    strategy: str
    estimator: str
    irt_dims: int
    extra_models: list[str]
    calibration_merges: int
    optimizer: str
    trials: int
    seed: int
    objectives: str
    baselines: bool = True
    device: str = "auto"
    zoo: str | None = None
    memory: dict = field(default_factory=dict)  # MergeCore budgets: device_memory, host_memory, scoring_headroom (bytes)
    evaluation: Evaluation | None = None       # staged (raced) scoring; None: every candidate on subset_size items
    data: DataSettings = field(default_factory=DataSettings)
    learn: LearnSettings = field(default_factory=LearnSettings)
    optimizer_init: str | dict | None = None   # "learned": CMA-ES starts at the learned coefficients; a dict:
                                               # at that value of each searched parameter everywhere
    raw: dict = field(default_factory=dict)
    calibration_items: int | None = DEFAULT_CALIBRATION_ITEMS  # items beyond the subsets per calibration merge (None: all)
    item_params: str | dict = "reuse"          # reuse | fit | {benchmark: file}: where item parameters come from

    def __post_init__(self) -> None:
        if (self.merge is None) == (self.dfs is None):
            raise ValueError("a search space has exactly one of a merge spec and a data-flow spec")

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    @property
    def expert_paths(self) -> list[str]:
        return list(self.experts.values())

    @property
    def stages(self) -> list:
        """Items per benchmark at each scoring stage (one stage: the fixed subset)."""
        return list(self.evaluation.stages) if self.evaluation else [self.subset_size]

    def with_memory(self, device_memory: int | None = None, host_memory: int | None = None) -> "SearchSpace":
        """This space with the given memory budgets (bytes) replacing its `memory:` block's (None keeps them)."""
        given = {"device_memory": device_memory, "host_memory": host_memory}
        return dataclasses.replace(self, memory={**self.memory, **{k: v for k, v in given.items() if v is not None}})

    def study_config(self) -> dict:
        """What must not change between a study and its resume (the budget and the memory budgets may)."""
        config = copy.deepcopy(self.raw)
        config["name"] = self.name  # as a run folder stores it, whether or not the file named it
        config.get("optimizer", {}).pop("trials", None)
        config.pop("memory", None)
        config.pop("learn", None)  # how coefficients are learned: a learned genome is one more enqueued trial
        return config


def load_search_space(path: str | Path, overrides: dict | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file; relative paths are relative to the cwd."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise EvomergeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise EvomergeError(f"{path}: expected a mapping at the top level")
    if is_mergekit_evolve(raw):  # a mergekit-evolve config: run as the search space it stands for
        raw = to_search_space(raw, name=path.stem, source=str(path))
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return parse_search_space(_absolute_paths(raw), source=str(path))


def _absolute_paths(raw: dict) -> dict:
    """Resolve model and benchmark paths against the working directory, once, at load time.

    The run folder keeps this resolved copy, so `evomerge resume` works from any folder.
    """
    def resolve(value):
        return str(Path(value).expanduser().resolve()) if isinstance(value, str) and value else value

    raw = copy.deepcopy(raw)
    models = raw.get("models")
    if isinstance(models, dict):
        models["base"] = resolve(models.get("base"))
        experts = models.get("experts")
        if isinstance(experts, dict):
            models["experts"] = {k: resolve(v) for k, v in experts.items()}
        elif isinstance(experts, list):
            models["experts"] = [resolve(v) for v in experts]
    for entry in raw.get("benchmarks") or []:
        if isinstance(entry, dict):
            if "path" in entry and not is_hub_id(entry["path"]):  # a hub id (openai/gsm8k) stays as written
                entry["path"] = resolve(entry["path"])
            if isinstance(entry.get("lm_eval"), str) and entry["lm_eval"].endswith((".yaml", ".yml")):
                entry["lm_eval"] = resolve(entry["lm_eval"])
            data = entry.get("data")
            if isinstance(data, str) and data != "self" and not is_hub_id(data):
                entry["data"] = resolve(data)
            elif isinstance(data, dict) and isinstance(data.get("path"), str) and not is_hub_id(data["path"]):
                data["path"] = resolve(data["path"])
            if isinstance(entry.get("fewshot"), dict) and entry["fewshot"].get("path"):
                entry["fewshot"]["path"] = resolve(entry["fewshot"]["path"])
    estimator = raw.get("estimator")
    if isinstance(estimator, dict) and isinstance(estimator.get("extra_models"), list):
        estimator["extra_models"] = [resolve(v) for v in estimator["extra_models"]]
    if isinstance(estimator, dict) and isinstance(estimator.get("item_params"), dict):
        estimator["item_params"] = {k: resolve(v) for k, v in estimator["item_params"].items()}
    if raw.get("zoo"):
        raw["zoo"] = resolve(raw["zoo"])
    dfs = raw.get("dfs")
    if isinstance(dfs, dict) and isinstance(dfs.get("sources"), list):
        for entry in dfs["sources"]:
            if isinstance(entry, dict) and isinstance(entry.get("source"), str):
                entry["source"] = resolve(entry["source"])
    return raw


def parse_search_space(raw: dict, source: str = "search space") -> SearchSpace:
    """Validate the parsed YAML mapping, naming the offending key in every error."""
    reader = _Reader(raw, source)
    known_sections = {"name", "zoo", "models", "merge", "dfs", "benchmarks", "estimator", "optimizer", "device",
                      "memory", "evaluation", "data", "learn"}
    reader.reject_unknown(raw, known_sections, "")

    models = reader.mapping("models")
    reader.reject_unknown(models, {"base", "experts"}, "models")
    base = reader.string(models, "base", "models")
    experts = models.get("experts")
    if isinstance(experts, list):
        experts = {Path(str(p)).name: str(p) for p in experts}
    if not isinstance(experts, dict) or not experts:
        raise EvomergeError(f"{source}: models.experts must name at least one expert (name: path)")
    experts = {str(k): str(v) for k, v in experts.items()}

    if "dfs" in raw:
        if "merge" in raw:
            raise EvomergeError(f"{source}: a space searches either merge (parameter space) or dfs (data-flow "
                                "space), not both; for PS+DFS name a finished merge run as a dfs source")
        merge, dfs = None, parse_dfs_section(raw["dfs"], {"base": base, **experts}, source)
    else:
        merge, dfs = _merge_section(reader, source, experts), None

    benchmarks_raw = raw.get("benchmarks")
    if not isinstance(benchmarks_raw, list) or not benchmarks_raw:
        raise EvomergeError(f"{source}: benchmarks must be a list of {{name, path, weight}}")
    benchmarks = []
    for index, entry in enumerate(benchmarks_raw):
        where = f"benchmarks[{index}]"
        if not isinstance(entry, dict):
            raise EvomergeError(f"{source}: {where} must be a mapping with name and path")
        own = ("name", "path", "weight", "data", "sample")
        reader.reject_unknown(entry, {*own, *option_keys()}, where)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise EvomergeError(f"{source}: {where}.weight must be a positive number, got {weight!r}")
        sample = _benchmark_sample(reader, entry.get("sample"), f"{where}.sample")
        options = {k: copy.deepcopy(v) for k, v in entry.items() if k not in own}
        if "lm_eval" in entry:  # an lm-eval task: no path, the name defaults to the task's
            if "path" in entry:
                raise EvomergeError(f"{source}: {where}.path: an lm_eval task reads its own dataset; give "
                                    "either path or lm_eval")
            task = check_format(options, f"{source}: {where}").lm_eval
            name = reader.string(entry, "name", where) if "name" in entry else task.default_name
            data = _data_source(entry.get("data"), "", f"{source}: {where}.data")  # {split: train}: the task's
            benchmarks.append(BenchmarkSpec(name, "", float(weight), options=options, data=data, sample=sample))
            continue
        name = reader.string(entry, "name", where)
        check_format(options, f"{source}: {where} ({name})")
        path = reader.string(entry, "path", where)
        data = _data_source(entry.get("data"), path, f"{source}: {where}.data")
        benchmarks.append(BenchmarkSpec(name, path, float(weight), options=options, data=data, sample=sample))
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise EvomergeError(f"{source}: benchmark names must be unique, got {names}")

    estimator = raw.get("estimator", {}) or {}
    reader.reject_unknown(estimator, {"method", "subset_size", "strategy", "dims", "extra_models", "calibration_merges",
                                      "calibration_items", "item_params"}, "estimator")
    estimator_name = estimator.get("method", DEFAULT_ESTIMATOR)
    if estimator_name not in ESTIMATORS:
        raise EvomergeError(
            f"{source}: estimator.method {estimator_name!r} is unknown; choose one of {', '.join(ESTIMATORS)}"
        )
    strategy = estimator.get("strategy", "anchor")
    if strategy not in STRATEGY_NAMES:
        raise EvomergeError(
            f"{source}: estimator.strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGY_NAMES)}"
        )
    subset_size = reader.integer(estimator, "subset_size", "estimator", default=DEFAULT_SUBSET_SIZE, minimum=2)
    irt_dims = reader.integer(estimator, "dims", "estimator", default=2, minimum=1)
    extra_models = [str(p) for p in estimator.get("extra_models", []) or []]
    calibration_merges = reader.integer(
        estimator, "calibration_merges", "estimator", minimum=0,
        default=CALIBRATION_MERGES_ON_EVERY_ITEM if estimator.get("calibration_items") == "all"
        else CALIBRATION_MERGES_ON_A_SAMPLE)

    optimizer = raw.get("optimizer", {}) or {}
    reader.reject_unknown(optimizer, {"name", "trials", "seed", "objectives", "baselines", "init"}, "optimizer")
    optimizer_init = optimizer.get("init")
    if not (optimizer_init in (None, "learned", "defaults") or isinstance(optimizer_init, dict)):
        raise EvomergeError(f"{source}: optimizer.init {optimizer_init!r} is unknown; `learned` starts the search "
                            "at the coefficients `evomerge learn` learned, `defaults` at the method's own defaults "
                            "(RegMean's, Fisher's), `{param: value, ...}` at those values everywhere")
    objectives = optimizer.get("objectives", "mean")
    if objectives not in OBJECTIVE_MODES:
        raise EvomergeError(
            f"{source}: optimizer.objectives {objectives!r} is unknown; choose one of {', '.join(OBJECTIVE_MODES)}"
        )
    searches_method = merge is not None and merge.searches_method
    default_optimizer = "nsga2" if objectives == "per_task" else "tpe" if searches_method else "cmaes"
    optimizer_name = str(optimizer.get("name", default_optimizer))
    try:
        check_optimizer(optimizer_name, len(benchmarks) if objectives == "per_task" else 1)
        if searches_method:
            check_categorical(optimizer_name)
    except EvomergeError as error:
        raise EvomergeError(f"{source}: optimizer.name: {error}") from None
    if optimizer_init is not None:
        try:
            check_start(optimizer_name)
            if merge is None:
                raise EvomergeError("a data-flow space has no coefficients to learn")
            if merge.searches_method:
                raise EvomergeError("the search starts at one method's coefficients; this space searches several")
            if optimizer_init == "learned":
                check_learnable(merge.method)
            else:
                optimizer_init = _start_values(merge, optimizer_init)
        except EvomergeError as error:
            raise EvomergeError(f"{source}: optimizer.init: {error}") from None
    device = str(raw.get("device", "auto"))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise EvomergeError(f"{source}: device must be auto, cpu or cuda[:N], got {device!r}")
    memory = _memory_budgets(reader, raw.get("memory"))
    evaluation = _evaluation_section(reader, raw.get("evaluation"), estimator)
    if evaluation is not None and isinstance(evaluation.stages[0], int):
        subset_size = evaluation.stages[0]

    return SearchSpace(
        name=_run_name(raw.get("name"), Path(source).stem, source),
        base=base,
        experts=experts,
        merge=merge,
        dfs=dfs,
        benchmarks=benchmarks,
        subset_size=subset_size,
        strategy=strategy,
        estimator=estimator_name,
        irt_dims=irt_dims,
        extra_models=extra_models,
        calibration_merges=calibration_merges,
        optimizer=optimizer_name,
        trials=reader.integer(optimizer, "trials", "optimizer", default=50, minimum=1),
        seed=reader.integer(optimizer, "seed", "optimizer", default=0, minimum=0),
        objectives=objectives,
        baselines=bool(optimizer.get("baselines", True)),
        device=device,
        zoo=raw.get("zoo"),
        memory=memory,
        evaluation=evaluation,
        data=_data_settings(reader, raw.get("data")),
        learn=_learn_settings(reader, raw.get("learn")),
        optimizer_init=optimizer_init,
        raw=copy.deepcopy(raw),
        **_calibration_keys(estimator, names, source),
    )


def _evaluation_section(reader: "_Reader", section: Any, estimator: dict) -> Evaluation | None:
    """The optional `evaluation` section: stages (item counts, the last may be `all`), top_k, level."""
    source = reader.source
    if section is None:
        return None
    if not isinstance(section, dict):
        raise EvomergeError(f"{source}: evaluation must be a mapping with stages and top_k")
    reader.reject_unknown(section, {"stages", "top_k", "level"}, "evaluation")
    stages = section.get("stages")
    if not isinstance(stages, list) or not stages:
        raise EvomergeError(f"{source}: evaluation.stages must be a list of items per benchmark, e.g. [10, 30, 100]")
    for position, size in enumerate(stages):
        last = position == len(stages) - 1
        if not (size == "all" and last) and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise EvomergeError(f"{source}: evaluation.stages[{position}] must be a positive item count"
                                f"{' or all' if last else ' (only the last stage may be all)'}, got {size!r}")
        if position and size != "all" and size <= stages[position - 1]:
            raise EvomergeError(f"{source}: evaluation.stages must grow from stage to stage, got {stages}")
    if "subset_size" in estimator and estimator["subset_size"] != stages[0]:
        raise EvomergeError(f"{source}: estimator.subset_size {estimator['subset_size']!r} differs from "
                            f"evaluation.stages[0] {stages[0]!r}; with stages, leave subset_size out")
    top_k = reader.integer(section, "top_k", "evaluation", default=5, minimum=1)
    level = section.get("level", 0.9)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise EvomergeError(f"{source}: evaluation.level must be a number between 0 and 1, got {level!r}")
    return Evaluation(tuple(stages), top_k, float(level))


def _merge_section(reader: "_Reader", source: str, experts: dict[str, str]) -> MergeSpec:
    """The `merge` section, checked against the method's own parameter spec."""
    merge = reader.mapping("merge")
    reader.reject_unknown(
        merge, {"method", "granularity", "layer_groups", "split_modules", "params", "fixed"}, "merge"
    )
    methods = _methods(merge.get("method"), source)
    for method in methods:
        try:
            METHODS[method].check_experts(len(experts))
        except EvomergeError as error:
            raise EvomergeError(f"{source}: {error}") from None
    method = methods[0]
    granularity = merge.get("granularity", "layer_group")
    if granularity not in GRANULARITIES:
        raise EvomergeError(
            f"{source}: merge.granularity {granularity!r} is unknown; choose one of {', '.join(GRANULARITIES)}"
        )
    layer_groups = reader.integer(merge, "layer_groups", "merge", default=2, minimum=1)
    split_modules = bool(merge.get("split_modules", False))
    ranges: dict[str, tuple[float, float]] = {}
    for name in methods:  # each method's default searched parameters (the first method's range wins)
        for param, bounds in METHODS[name].search_ranges().items():
            ranges.setdefault(param, bounds)
    searchable = list(dict.fromkeys(p for name in methods for p in searchable_params(name)))
    user_ranges = merge.get("params", {}) or {}
    if not isinstance(user_ranges, dict):
        raise EvomergeError(f"{source}: merge.params must map a parameter to [low, high]")
    for name, bounds in user_ranges.items():
        if name not in searchable:
            raise EvomergeError(
                f"{source}: merge.params.{name} is not a searchable parameter of {' or '.join(methods)}; "
                f"choose from {', '.join(searchable)}"
            )
        if (
            not isinstance(bounds, (list, tuple))
            or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
            or not bounds[0] < bounds[1]
        ):
            raise EvomergeError(
                f"{source}: merge.params.{name} must be [low, high], finite numbers with low < high, got {bounds!r}")
        ranges[name] = (float(bounds[0]), float(bounds[1]))
    fixed = merge.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        raise EvomergeError(f"{source}: merge.fixed must map a parameter to its value")
    fixed = dict(fixed)
    for name, value in fixed.items():  # each method that has the parameter decides what is valid
        owners = [METHODS[m] for m in methods if str(name) in METHODS[m].param_names] or [METHODS[method]]
        for spec in owners:
            try:
                spec.check_param(str(name), value, "merge.fixed")
            except EvomergeError as error:
                raise EvomergeError(f"{source}: merge.fixed.{name}: {error}") from None
    for name in set(fixed) & set(ranges):
        ranges.pop(name)  # a fixed value is not searched
    for name, (low, high) in ranges.items():
        owners = [METHODS[m] for m in methods if name in METHODS[m].param_names]
        if not owners:
            try:
                METHODS[method].param(name)
            except EvomergeError as error:  # a parameter no method has
                raise EvomergeError(f"{source}: merge.params.{name}: {error}") from None
        for spec in owners:
            spec.check_range(name, low, high, f"{source}: merge.params.{name}")
        scopes = {spec.param(name).per_expert for spec in owners}
        if len(scopes) > 1:
            raise EvomergeError(f"{source}: merge.params.{name} is one value per expert in some of "
                                f"{', '.join(methods)} and shared in others; search them in separate spaces")
    if not ranges and len(methods) == 1:
        raise EvomergeError(f"{source}: merge method {method} leaves no parameter to search")
    return MergeSpec(method, granularity, layer_groups, split_modules, ranges, fixed, methods)


def _methods(value: Any, source: str) -> tuple[str, ...]:
    """`merge.method`: one method, or a list of at least two (the method is then searched too)."""
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise EvomergeError(f"{source}: merge.method is required: a method name, or a list of them to search")
    for name in names:
        if name not in METHODS:
            raise EvomergeError(f"{source}: merge.method {name!r} is unknown; choose one of {', '.join(METHODS)}")
    if isinstance(value, list) and (len(names) < 2 or len(set(names)) != len(names)):
        raise EvomergeError(f"{source}: merge.method as a list names at least two different methods, got {names}")
    return tuple(names)


def _data_source(value: Any, path: str, where: str) -> DataSource | None:
    """A benchmark's `data:`: a file of prompts, `{split: train}` (another split of the same data),
    `{path, split}`, or `self` (the scored items' own prompts: the transductive setting). An lm-eval
    task's ``path`` is ``""``: `{split: train}` is a split of the task's own dataset."""
    if value is None:
        return None
    if value == "self":
        return DataSource(path, transductive=True)
    if isinstance(value, str) and value:
        return DataSource(value)
    if isinstance(value, dict) and set(value) <= {"path", "split"} and value:
        data_path, split = value.get("path", path), value.get("split")
        if (not isinstance(data_path, str) or (not data_path and not (path == "" and split))
                or (split is not None and not isinstance(split, str))):
            raise EvomergeError(f"{where}: path and split must be strings")
        if data_path == path and split is None:
            raise EvomergeError(f"{where}: names the benchmark's own items; give another split, or `data: self` "
                                "for their prompts on purpose (the transductive setting)")
        return DataSource(data_path, split)
    raise EvomergeError(f"{where} must be a file of prompts, {{split: NAME}}, {{path, split}} or self, got {value!r}")


def _benchmark_sample(reader: "_Reader", value: Any, where: str) -> BenchmarkSample | None:
    """A benchmark's ``sample:``: an item count, or ``{n, seed}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        reader.reject_unknown(value, {"n", "seed"}, where)
        if "n" not in value:
            raise EvomergeError(f"{reader.source}: {where} needs n (how many items to score)")
        return BenchmarkSample(reader.integer(value, "n", where, default=0, minimum=1),
                               reader.integer(value, "seed", where, default=0, minimum=0))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvomergeError(f"{reader.source}: {where} must be an item count >= 1 or {{n: N, seed: S}}, got {value!r}")
    return BenchmarkSample(value)


def _data_settings(reader: "_Reader", section: Any) -> DataSettings:
    if section is None:
        return DataSettings()
    if not isinstance(section, dict):
        raise EvomergeError(f"{reader.source}: data must be a mapping such as {{prompts: 64, seed: 0}}")
    reader.reject_unknown(section, {"prompts", "seed"}, "data")
    return DataSettings(reader.integer(section, "prompts", "data", default=64, minimum=1),
                        reader.integer(section, "seed", "data", default=0, minimum=0))


def _learn_settings(reader: "_Reader", section: Any) -> LearnSettings:
    if section is None:
        return LearnSettings()
    if not isinstance(section, dict):
        raise EvomergeError(f"{reader.source}: learn must be a mapping such as {{steps: 100, lr: 0.02, batch: 8}}")
    reader.reject_unknown(section, {"steps", "lr", "batch", "init"}, "learn")
    lr, init = section.get("lr", 0.02), section.get("init")
    for key, value in (("lr", lr), ("init", init)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or (key == "lr" and value <= 0)):
            raise EvomergeError(f"{reader.source}: learn.{key} must be a {'positive ' if key == 'lr' else ''}number, "
                                f"got {value!r}")
    return LearnSettings(reader.integer(section, "steps", "learn", default=100, minimum=1), float(lr),
                         reader.integer(section, "batch", "learn", default=8, minimum=1),
                         None if init is None else float(init))


MEMORY_KEYS = {"device": "device_memory", "host": "host_memory", "scoring_headroom": "scoring_headroom"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _start_values(merge: MergeSpec, init) -> dict[str, float]:
    """The values a search starts at (``init: defaults`` or ``{param: value}``), each searched parameter
    given (a missing one starts mid-range) and inside its range."""
    if init == "defaults":
        values = merge.defaults_of(merge.method)
        if values is None:
            missing = merge.without_default(merge.method)
            raise EvomergeError(f"{merge.method} has no default for {', '.join(missing) or 'any searched parameter'}; "
                                "give the values instead, e.g. {" + ", ".join(f"{n}: 1.0" for n in missing) + "}")
        return values
    values = {}
    for name, value in init.items():
        if name not in merge.ranges:
            raise EvomergeError(f"{name!r} is not a searched parameter of this space "
                                f"(searched: {', '.join(merge.ranges) or 'none'})")
        low, high = merge.ranges[name]
        if not _is_number(value) or not low <= value <= high:
            raise EvomergeError(f"{name}: {value!r} must be a number within its range [{low}, {high}]")
        values[name] = float(value)
    return values


def _memory_budgets(reader: "_Reader", memory) -> dict:
    """The `memory:` block (device / host / scoring_headroom sizes) as MergeCore keyword arguments."""
    if memory is None:
        return {}
    if not isinstance(memory, dict):
        raise EvomergeError(f"{reader.source}: memory must map device / host / scoring_headroom to sizes like 20GiB")
    reader.reject_unknown(memory, set(MEMORY_KEYS), "memory")
    return {MEMORY_KEYS[k]: parse_bytes(v, f"{reader.source}: memory.{k}") for k, v in memory.items() if v is not None}


def _run_name(name, default: str, source: str) -> str:
    """The study and run-folder name: a relative path that stays inside `--runs-root`."""
    name = default if name is None or name == "" else name
    path = Path(str(name))
    if not isinstance(name, str) or path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise EvomergeError(
            f"{source}: name {name!r} must be a folder name inside --runs-root (no absolute path, no '..')")
    return str(name)


class _Reader:
    """Small typed accessors that name the key path in their errors."""

    def __init__(self, raw: dict, source: str):
        self.raw = raw
        self.source = source

    def reject_unknown(self, mapping: dict, known: set[str], where: str) -> None:
        unknown = sorted(set(mapping) - known)
        if unknown:
            prefix = f"{where}." if where else ""
            raise EvomergeError(
                f"{self.source}: unknown key {prefix}{unknown[0]}; expected one of {', '.join(sorted(known))}"
            )

    def mapping(self, key: str) -> dict:
        value = self.raw.get(key)
        if not isinstance(value, dict):
            raise EvomergeError(f"{self.source}: section {key!r} is missing or not a mapping")
        return value

    def string(self, mapping: dict, key: str, where: str) -> str:
        value = mapping.get(key)
        if not isinstance(value, str) or not value:
            raise EvomergeError(f"{self.source}: {where}.{key} is required and must be a string")
        return value

    def integer(self, mapping: dict, key: str, where: str, default: int, minimum: int) -> int:
        value = mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise EvomergeError(f"{self.source}: {where}.{key} must be an integer >= {minimum}, got {value!r}")
        return value



def _calibration_keys(estimator: dict, benchmarks: list[str], source: str) -> dict:
    """``estimator.calibration_items`` (an item count or ``all``) and ``estimator.item_params``
    (``reuse``, ``fit``, or a mapping of benchmark names to item-parameter files)."""
    items = estimator.get("calibration_items", DEFAULT_CALIBRATION_ITEMS)
    if items != "all" and (isinstance(items, bool) or not isinstance(items, int) or items < 0):
        raise EvomergeError(f"{source}: estimator.calibration_items must be an item count >= 0 or 'all', got {items!r}")
    params = estimator.get("item_params", "reuse")
    if isinstance(params, dict):
        unknown = sorted(set(params) - set(benchmarks))
        if unknown:
            raise EvomergeError(f"{source}: estimator.item_params names {unknown}, which are not benchmarks "
                                f"of the space ({', '.join(benchmarks)})")
        for name, path in params.items():
            if not isinstance(path, str) or not Path(path).is_file():
                raise EvomergeError(f"{source}: estimator.item_params.{name}: no such file: {path!r}")
    elif params not in ITEM_PARAM_MODES:
        raise EvomergeError(f"{source}: estimator.item_params must be reuse, fit or a mapping of benchmark names "
                            f"to files, got {params!r}")
    return {"calibration_items": None if items == "all" else items, "item_params": params}
