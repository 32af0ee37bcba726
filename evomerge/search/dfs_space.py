"""The `dfs` section of a search space: a data-flow-space (layer path) search, checked at parse time.

```yaml
dfs:
  sources: [lang, arith]          # names from `models` (base or an expert), or
                                  # {name: ps, source: runs/demo, trial: 62}: a finished PS run's merge
  repeats: 2                      # every source layer gets this many slots (Sakana's r)
  max_layers: 8                   # path budget in layers (default: twice the deepest source)
  max_params: 3M                  # path budget in parameters (optional; K/M/B suffixes)
  scaling: levels                 # levels | none
  level_range: [-1.0, 1.0]        # log2 of each layer's hidden-state level
  paths:                          # optional hand-written paths, enqueued as the first trials
    - [{source: lang, layers: [0, 2]}, {source: arith, layers: [2, 4]}]
```

A source may be a LoRA adapter folder on the space's base: its layers are the
base's with the adapter merged in (peft's merge_and_unload(), done by evomerge
when the source loads).

Everything that can be wrong with the section is found here, from model headers
alone, before a model is loaded: a source that is neither a model nor a run folder,
sources whose layers cannot be stacked (hidden size, heads, vocabulary...), budgets
no path fits, a hand-written path over budget or not expressible with the slots.
A run named as a source is a reference: parsing reads its stored space file
(what its merge is made of) but never opens its study; which of its trials is the
source is resolved once when a search starts, and pinned in the run folder's
space (`evomerge.search.sources`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.dataflow.path import DataFlowPath
from evomerge.errors import EvomergeError
from evomerge.merge.adapters import is_adapter, open_adapter
from evomerge.merge.loading import open_model
from evomerge.merge.recipe import layer_of

RUN_SPACE_FILE = "space.yaml"
"""The space a run folder keeps (`evomerge.search.runs`): a run source's merge is read from it."""

SCALINGS = ("levels", "none")
# Config keys that must agree for layers of different models to run in one stack
# and be saved as one plain checkpoint.
STACK_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings",
)
# Decoders whose every residual branch starts with a scale-free RMS norm, so a
# scaling of the stream folds into the branch outputs (see evomerge.dataflow.path).
PRE_NORM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBtT]?)\s*$")
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


@dataclass
class DataFlowSource:
    """One source of layers: a model folder, or the chosen trial of a parameter-space run."""

    name: str
    path: str | None                    # model folder (None for a run)
    adapter_base: str | None = None     # for a LoRA adapter folder: the base it is merged into
    run: str | None = None              # run folder of a parameter-space search
    trial: int | None = None            # that run's trial whose merge is the source (None: its winner, once resolved)
    recipe: dict | None = None          # the trial's stored recipe and merge seed (read when resolved)
    merge_seed: int | None = None
    run_base: str | None = None         # the run's base and experts (what the merge is made of)
    run_experts: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    layer_params: list[int] = field(default_factory=list)   # parameters of each decoder layer
    embed_params: int = 0               # token embeddings
    head_params: int = 0                # final norm + LM head (0 for a tied head)

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def resolved(self) -> bool:
        """A model folder, or a run source whose trial and recipe are known."""
        return self.run is None or self.recipe is not None

    def identity(self) -> dict:
        """What a study records about this source (a resumed study must find it unchanged)."""
        if self.run is None:
            return {"path": self.path} if self.adapter_base is None else {"path": self.path, "base": self.adapter_base}
        return {"run": self.run, "trial": self.trial}


@dataclass
class DataFlowSpace:
    sources: list[DataFlowSource]
    repeats: int
    max_layers: int
    max_params: int | None
    scaling: str
    level_range: tuple[float, float]
    paths: list[DataFlowPath]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source(self, name: str) -> DataFlowSource:
        return next(s for s in self.sources if s.name == name)

    def slots(self) -> list[tuple[int, str, int]]:
        """(pass, source, layer) for every slot a path may use, in path order: the sources' layers in
        order (all of the first source, then the second ...), the whole sequence ``repeats`` times."""
        return [(rep, s.name, layer) for rep in range(self.repeats) for s in self.sources
                for layer in range(s.num_layers)]

    def path_slots(self, layers) -> list[int] | None:
        """The earliest slot indices that spell ``layers`` in order, or None if the slots cannot."""
        order = self.slots()
        found, cursor = [], 0
        for source, layer in layers:
            while cursor < len(order) and order[cursor][1:] != (source, layer):
                cursor += 1
            if cursor == len(order):
                return None
            found.append(cursor)
            cursor += 1
        return found

    def path_params(self, layers) -> int:
        """Parameters of a path model: first source's embeddings, the layers, last source's head."""
        layers = list(layers)
        return (self.source(layers[0][0]).embed_params + self.source(layers[-1][0]).head_params
                + sum(self.source(s).layer_params[i] for s, i in layers))


def parse_size(value: Any, where: str) -> int:
    """A parameter count: an integer, or a string like ``1.5B`` / ``300M``."""
    if isinstance(value, bool):
        raise EvomergeError(f"{where} must be a parameter count such as 1500000 or 1.5M, got {value!r}")
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    match = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise EvomergeError(f"{where} must be a parameter count such as 1500000 or 1.5M, got {value!r}")
    return int(float(match.group(1)) * _SUFFIX[match.group(2).lower()])


def parse_dfs_section(section: Any, models: dict[str, str], source: str) -> DataFlowSpace:
    """Validate ``dfs``; ``models`` maps the space's model names (base, experts) to folders."""
    if not isinstance(section, dict):
        raise EvomergeError(f"{source}: section 'dfs' must be a mapping")
    known = {"sources", "repeats", "max_layers", "max_params", "scaling", "level_range", "paths"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise EvomergeError(f"{source}: unknown key dfs.{unknown[0]}; expected one of {', '.join(sorted(known))}")
    entries = section.get("sources")
    if not isinstance(entries, list) or not entries:
        raise EvomergeError(f"{source}: dfs.sources must list at least one model name or "
                            "{name, source: runs/NAME} entry")
    sources = [_source(entry, index, models, source) for index, entry in enumerate(entries)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise EvomergeError(f"{source}: dfs.sources names must be unique, got {names}")
    _check_stackable(sources, source)

    repeats = _integer(section, "repeats", 2, 1, source)
    max_layers = _integer(section, "max_layers", 2 * max(s.num_layers for s in sources), 1, source)
    max_params = parse_size(section["max_params"], f"{source}: dfs.max_params") if section.get("max_params") is not None else None
    scaling = section.get("scaling", "levels")
    if scaling not in SCALINGS:
        raise EvomergeError(f"{source}: dfs.scaling {scaling!r} is unknown; choose one of {', '.join(SCALINGS)}")
    model_type = sources[0].config.get("model_type")
    if scaling != "none" and model_type not in PRE_NORM_MODEL_TYPES:
        raise EvomergeError(
            f"{source}: dfs.scaling {scaling} folds into pre-norm decoders ({', '.join(PRE_NORM_MODEL_TYPES)}); "
            f"the sources are {model_type!r}: set dfs.scaling: none")
    level_range = section.get("level_range", [-1.0, 1.0])
    if (not isinstance(level_range, (list, tuple)) or len(level_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in level_range)
            or not level_range[0] < level_range[1]):
        raise EvomergeError(f"{source}: dfs.level_range must be [low, high] with low < high, got {level_range!r}")
    space = DataFlowSpace(sources, repeats, max_layers, max_params, scaling,
                          (float(level_range[0]), float(level_range[1])), [])
    if max_params is not None:
        smallest = min(s.embed_params for s in sources) + min(s.head_params for s in sources) + min(
            p for s in sources for p in s.layer_params)
        if smallest > max_params:
            raise EvomergeError(f"{source}: dfs.max_params {max_params:,} is below the smallest possible path "
                                f"({smallest:,} parameters: embeddings, one layer, head)")
    space.paths = [_hand_path(entry, index, space, source) for index, entry in enumerate(section.get("paths") or [])]
    return space


def _integer(section: dict, key: str, default: int, minimum: int, source: str) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvomergeError(f"{source}: dfs.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _source(entry: Any, index: int, models: dict[str, str], source: str) -> DataFlowSource:
    where = f"{source}: dfs.sources[{index}]"
    if isinstance(entry, str):
        if entry not in models:
            raise EvomergeError(f"{where}: {entry!r} is not a model of this space; "
                                f"name one of {', '.join(models)} or give {{name, source: runs/NAME}}")
        return _model_source(entry, models[entry], where, models["base"])
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry.get("name"):
        raise EvomergeError(f"{where} must be a model name or a mapping {{name, source: runs/NAME}}")
    unknown = sorted(set(entry) - {"name", "source", "trial"})
    if unknown:
        raise EvomergeError(f"{where}: unknown key {unknown[0]}; expected name, source, trial")
    if not isinstance(entry.get("source"), str) or not entry["source"]:
        raise EvomergeError(f"{where}.source must be a model folder or the run folder of a finished search")
    trial = entry.get("trial")
    if trial is not None and (isinstance(trial, bool) or not isinstance(trial, int) or trial < 0):
        raise EvomergeError(f"{where}.trial must be a trial number, got {trial!r}")
    folder = Path(entry["source"])
    if (folder / "config.json").is_file() or is_adapter(folder):
        if trial is not None:
            raise EvomergeError(f"{where}: {folder} is a model folder; trial applies to run folders only")
        return _model_source(entry["name"], str(folder), where, models["base"])
    return _run_source(entry["name"], folder, trial, where)


def _model_source(name: str, path: str, where: str, base: str) -> DataFlowSource:
    """A model folder, or a LoRA adapter on the space's ``base`` (its layers: the base's, sized from its headers)."""
    adapter_base = base if is_adapter(path) else None
    try:
        files = open_model(adapter_base or path)
        if adapter_base is not None:
            open_adapter(path, files)
    except EvomergeError as error:
        raise EvomergeError(f"{where} ({name}): {error}") from None
    return _with_sizes(DataFlowSource(name, path, adapter_base=adapter_base), files)


def _with_sizes(spec: DataFlowSource, files) -> DataFlowSource:
    """Fill config and parameter counts from the safetensors headers (nothing loaded)."""
    spec.config = dict(files.config)
    layers = [0] * files.num_layers
    for name, shape in files.shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        layer = layer_of(name)
        if layer is not None and layer < len(layers):
            layers[layer] += numel
        elif "embed" in name:
            spec.embed_params += numel
        elif files.dtypes[name].is_floating_point:
            spec.head_params += numel
    spec.layer_params = layers
    return spec


def _run_source(name: str, folder: Path, trial: int | None, where: str) -> DataFlowSource:
    """A parameter-space run's merge, by reference: the run's models from its stored space file (the
    trial is resolved when a search starts: `evomerge.search.sources`)."""
    space_file = folder / RUN_SPACE_FILE
    if not space_file.is_file():
        raise EvomergeError(f"{where}.source: {folder} is neither a model folder (config.json) nor an "
                            f"evomerge run folder ({RUN_SPACE_FILE}); run the parameter-space search first")
    try:
        raw = yaml.safe_load(space_file.read_text())
        models = raw["models"]
        base, experts = str(models["base"]), models["experts"]
        expert_paths = [str(p) for p in (experts.values() if isinstance(experts, dict) else experts)]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
        raise EvomergeError(f"{where}.source: cannot read the run's space {space_file}: {error}") from None
    if "dfs" in raw:
        raise EvomergeError(f"{where}.source: {folder} is a data-flow run; a source run must be a "
                            "parameter-space (merge) search")
    spec = DataFlowSource(name, None, run=str(folder), trial=trial, run_base=base, run_experts=expert_paths)
    try:
        files = open_model(base)
    except EvomergeError as error:
        raise EvomergeError(f"{where} ({name}, base of run {folder}): {error}") from None
    return _with_sizes(spec, files)


def _check_stackable(sources: list[DataFlowSource], source: str) -> None:
    first = sources[0]
    for other in sources[1:]:
        for key in STACK_KEYS:
            if first.config.get(key) != other.config.get(key):
                raise EvomergeError(
                    f"{source}: dfs.sources: {other.name!r} has {key} {other.config.get(key)!r} but "
                    f"{first.name!r} has {first.config.get(key)!r}; a data-flow path stacks layers of models "
                    f"with equal {key}")


def _hand_path(entry: Any, index: int, space: DataFlowSpace, source: str) -> DataFlowPath:
    """A mergekit-style list of slices, checked against the sources, the slots and the budgets."""
    where = f"{source}: dfs.paths[{index}]"
    if not isinstance(entry, list) or not entry:
        raise EvomergeError(f"{where} must be a list of {{source: NAME, layers: [start, stop]}} slices")
    layers = []
    for part in entry:
        bounds = part.get("layers") if isinstance(part, dict) else None
        name = part.get("source") if isinstance(part, dict) else None
        if name not in space.source_names:
            raise EvomergeError(f"{where}: slice source {name!r} is not one of dfs.sources ({', '.join(space.source_names)})")
        count = space.source(name).num_layers
        if (not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, int) for b in bounds)
                or not 0 <= bounds[0] < bounds[1] <= count):
            raise EvomergeError(f"{where}: slice of {name} needs layers: [start, stop] with 0 <= start < stop <= {count}")
        layers += [(name, i) for i in range(bounds[0], bounds[1])]
    if len(layers) > space.max_layers:
        raise EvomergeError(f"{where} has {len(layers)} layers, over the budget dfs.max_layers {space.max_layers}")
    if space.max_params is not None and space.path_params(layers) > space.max_params:
        raise EvomergeError(f"{where} has {space.path_params(layers):,} parameters, over the budget "
                            f"dfs.max_params {space.max_params:,}")
    if space.path_slots(layers) is None:
        raise EvomergeError(f"{where} cannot be expressed with dfs.repeats {space.repeats} "
                            "(each pass over the sources' layers goes forward): raise dfs.repeats")
    return DataFlowPath.unscaled(layers)
