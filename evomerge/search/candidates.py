"""What a trial evaluates: the candidate builder turns a genome into a model to score.

The search loop, calibration, validation and export ask their builder for the
model of a genome and never ask which kind it holds: a parameter-space merge
(`ParameterMerge`, the merge core writing merged weights in place) or a
data-flow path through already-loaded layers (`DataFlowMerge`, see
`evomerge.dataflow`). A trial stores the candidate's `attrs` (recipe and merge
seed, or the layer path); `rebuild(attrs)` and `export(attrs, ...)` re-make the
same model from them, without the genome.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.dataflow import DataFlowPath, LayerPool
from evomerge.dataflow.export import export_path
from evomerge.errors import EvomergeError
from evomerge.export import export_checkpoint
from evomerge.merge import MergeCore, Recipe, recipe_to_mergekit_yaml
from evomerge.merge.adapters import is_adapter, merge_adapter_into, mergekit_reference, open_adapter, recorded_base
from evomerge.merge.core import default_device
from evomerge.merge.loading import open_model
from evomerge.merge.statistics import StatisticsFiles
from evomerge.search.dfs_genome import dfs_genome_space, genome_to_path, path_genome
from evomerge.search.genome import (METHOD_GENE, Genes, bounds_of, endpoint_genome, genome_space, genome_to_recipe,
                                    inert_groups, uniform_genome)
from evomerge.search.records import TrialKey
from evomerge.search.sources import resolve_sources
from evomerge.search.space import SearchSpace


STATISTICS_DIR = "statistics"


def candidate_seed(params: Mapping[str, float], base_seed: int) -> int:
    """A merge seed derived from the genome, so DARE masks are reproducible at export."""
    text = json.dumps({k: v if isinstance(v, str) else round(float(v), 12) for k, v in sorted(params.items())})
    text += f"|{base_seed}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@dataclass
class Candidate:
    """A model ready to score, and the JSON attrs a trial keeps to re-make it."""

    model: Any
    attrs: dict


def load_model_folder(path: str | Path, dtype, device, base: str | Path | None = None):
    """A model folder through ``from_pretrained`` (on ``device``, in ``dtype``); a LoRA adapter folder: ``base``
    (None: the local base its adapter_config.json records) loaded so, with the adapter merged as peft's
    merge_and_unload() does."""
    if not Path(path).is_dir():
        raise EvomergeError(f"model folder not found: {path}")
    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    base = base or recorded_base(path)
    adapter = open_adapter(path, open_model(base))  # checked against the base before the weights load
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(device).eval()
    return merge_adapter_into(model, adapter)


def load_checkpoint(path: str | Path, dtype, device, base: str | Path | None = None) -> tuple[Any, Any]:
    """A checkpoint folder's model (on ``device``, in ``dtype``) and tokenizer, loaded from disk.

    A LoRA adapter folder gives ``base`` (None: the one it records) with the adapter merged, and the
    base's tokenizer.
    """
    if is_adapter(path):
        base = base or recorded_base(path)
    model = load_model_folder(path, dtype, device, base)
    return model, AutoTokenizer.from_pretrained(str(base if is_adapter(path) else path))


class CandidateBuilder(ABC):
    """Holds the loaded source weights of one search; makes the model of any genome.

    Subclasses set ``space`` (with every data-flow source resolved), ``genes`` (the
    genome's structure), ``tokenizer``, ``device`` and ``dtype``.
    """

    space: SearchSpace
    genes: Genes
    tokenizer: Any
    inert: frozenset = frozenset()  # tensor groups left out of the genome: no expert changes them

    @property
    def genome(self) -> dict[str, tuple[float, float]]:
        """The genome as optimizers take it: gene name -> (low, high)."""
        return bounds_of(self.genes)

    @abstractmethod
    def candidate(self, genome: Mapping[str, float]) -> Candidate:
        """The model this genome stands for (valid until the next call)."""

    @abstractmethod
    def rebuild(self, attrs: Mapping[str, Any]):
        """The model a trial with these stored attrs scored (valid until the next call)."""

    @abstractmethod
    def export(self, attrs: Mapping[str, Any], out_dir: str | Path, *, details: dict | None = None,
               max_shard_size: str = "1GB", owner: dict | None = None, force: bool = False,
               finish=None) -> Path:
        """Write the trial's model as a Hugging Face checkpoint folder, all or nothing; returns it.

        ``owner`` / ``force``: who may be replaced there (see `evomerge.export.export_folder`);
        ``finish(folder)`` adds to the export before it is complete.
        """

    @abstractmethod
    def baseline_genomes(self) -> dict[str, dict[str, float]]:
        """Named genomes enqueued before the optimizer's own, so the search never ends below them.

        The name is kept on the trial (user attr ``baseline``) and shown by ``evomerge status``.
        """

    def study_config(self) -> dict:
        """Resolved inputs a resumed study must find unchanged (besides the space file)."""
        return {}

    def extra_endpoints(self) -> dict:
        """In-memory source models (name -> model) that calibration scores beside base and experts."""
        return {}

    def checkpoint_model(self, path: str | Path):
        """The model of a checkpoint folder as it is (an endpoint or an extra model), for calibration.

        This default loads it from disk onto the builder's device (a LoRA adapter: the
        space's base with it merged); a builder that holds a model of the same
        architecture may load the weights into it instead.
        """
        return load_model_folder(path, self.dtype, self.device, base=self.space.base)


class ParameterMerge(CandidateBuilder):
    """Parameter-space merges: the genome becomes a `Recipe`, merged in place into one model."""

    def __init__(self, space: SearchSpace, core: MergeCore | None = None, statistics: StatisticsFiles | None = None):
        self.space, self.merge = space, space.merge
        self.core = core or MergeCore(space.base, space.expert_paths, device=space_device(space),
                                      methods=list(self.merge.methods), statistics=statistics, **space.memory)
        self.model, self.tokenizer = self.core.new_model()
        self.device, self.dtype = self.core.device, self.core.dtype
        self.num_layers = self.core.num_layers
        changed = self.core.changed_tensors()
        self.inert = inert_groups(self.merge, self.num_layers,
                                  [(slot.layer, slot.module_type, slot.name in changed) for slot in self.core.slots])
        self.genes = genome_space(self.merge, space.expert_names, self.num_layers, self.inert)

    def recipe(self, genome) -> Recipe:
        """The merge recipe a genome stands for (`genome.genome_to_recipe`, inert groups left out)."""
        return genome_to_recipe(self.merge, self.space.expert_names, genome, self.num_layers, self.inert)

    def candidate(self, genome):
        recipe = self.recipe(genome)
        seed = candidate_seed(genome, self.space.seed)
        self.core.merge_into(self.model, recipe, seed=seed)
        return Candidate(self.model, {TrialKey.RECIPE: recipe.to_dict(), TrialKey.MERGE_SEED: seed})

    def checkpoint_model(self, path):
        """The base or an expert as it is (a LoRA adapter merged into the base), loaded into the model the
        merges write to (no second copy)."""
        return self.core.load_weights_into(self.model, path)

    def rebuild(self, attrs):
        return self.core.merge_into(self.model, Recipe.from_dict(attrs[TrialKey.RECIPE]),
                                    seed=int(attrs[TrialKey.MERGE_SEED]))

    def export(self, attrs, out_dir, *, details=None, max_shard_size="1GB", owner=None, force=False, finish=None):
        return export_checkpoint(
            self.core, Recipe.from_dict(attrs[TrialKey.RECIPE]), out_dir, seed=int(attrs[TrialKey.MERGE_SEED]),
            model=self.model, tokenizer=self.tokenizer,
            base_path=self.space.base, expert_paths=self.space.expert_paths,
            expert_names=self.space.expert_names, details=details, max_shard_size=max_shard_size,
            owner=owner, force=force, finish=finish,
        )

    def baseline_genomes(self):
        """Uniform merges, each method's own defaults where it has them, the base and every expert alone,
        wherever the space can express them.

        So a finished search is never below a plain uniform merge or any endpoint it merges
        (an expert alone is weight 1 for it, 0 for the others, density 1; see `endpoint_genome`).
        """
        points = [{"weight": 1.0, "density": 0.7, "t": 0.5}, {"weight": 0.5, "density": 1.0, "t": 0.3}]
        genomes = {}
        for method in self.merge.methods:  # with the method searched: each method's uniform merges
            active = set(self.merge.params_of(method))
            named = [("uniform", values) for values in points]
            defaults = self.merge.defaults_of(method)
            if defaults is not None:  # a method defined by its defaults (RegMean, Fisher): that merge too
                named.append(("defaults", defaults))
            for kind, values in named:
                label = f"{kind} " + ", ".join(f"{p} {v:g}" for p, v in values.items() if p in active)
                if self.merge.searches_method:
                    label = f"{method}, {label}"
                genomes[label] = uniform_genome(self.genes, {**values, METHOD_GENE: method})
        for expert in [None, *self.space.expert_names]:
            genome = endpoint_genome(self.merge, self.space.expert_names, self.genes, expert)
            if genome is not None:
                genomes["base" if expert is None else f"expert {expert}"] = genome
        unique = {}
        for label, genome in genomes.items():
            if genome not in unique.values():
                unique[label] = genome
        return unique


class DataFlowMerge(CandidateBuilder):
    """Data-flow merges: the genome becomes a layer path through loaded source models (no weight copies).

    Sources are loaded once: model folders with ``from_pretrained`` (a LoRA
    adapter: the space's base with the adapter merged into it), a
    parameter-space run's trial merged by the merge core (which is then freed).
    A run named as a source is resolved first (`evomerge.search.sources`).
    """

    def __init__(self, space: SearchSpace):
        space = resolve_sources(space)
        self.space, self.dfs = space, space.dfs
        self.device = space_device(space) or default_device()
        self.dtype = None
        models = {}
        for source in self.dfs.sources:
            models[source.name] = self._load(source)
            self.dtype = self.dtype or models[source.name].dtype
        self.run_models = {f"source:{s.name}": models[s.name] for s in self.dfs.sources if s.run is not None}
        self.pool = LayerPool(models)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(space.base))
        except (OSError, ValueError, TypeError):
            self.tokenizer = None
        self.genes = dfs_genome_space(self.dfs)

    def _load(self, source):
        if source.run is None:
            return load_model_folder(source.path, self.dtype or "auto", self.device, base=source.adapter_base)
        core = MergeCore(source.run_base, source.run_experts, device=self.device, dtype=self.dtype,
                         **self.space.memory)  # the space's budgets hold while the PS merge is re-made
        model, _ = core.new_model()
        core.merge_into(model, Recipe.from_dict(source.recipe), seed=source.merge_seed)
        return model.eval()  # the core (base + task vectors) is freed here; the merged model stays

    def _sources(self) -> dict:
        return {s.name: s.identity() for s in self.dfs.sources}

    def candidate(self, genome):
        path = genome_to_path(self.dfs, genome)
        return Candidate(self.pool.assemble(path), {TrialKey.PATH: path.to_dict(), TrialKey.PATH_TEXT: path.describe(),
                                                    TrialKey.DFS_SOURCES: self._sources()})

    def _path(self, attrs):
        stored = attrs.get(TrialKey.DFS_SOURCES, {})
        for name, identity in self._sources().items():
            if name in stored and stored[name] != identity:
                raise EvomergeError(
                    f"this trial's source {name!r} was {stored[name]} but the space now gives {identity}; "
                    f"pin the source in the space (e.g. trial: {stored[name].get('trial')})")
        return DataFlowPath.from_dict(attrs[TrialKey.PATH])

    def rebuild(self, attrs):
        return self.pool.assemble(self._path(attrs))

    def export(self, attrs, out_dir, *, details=None, max_shard_size="1GB", owner=None, force=False, finish=None):
        dtype = str(self.dtype).removeprefix("torch.")
        refs, intermediates = {}, {}
        for source in self.dfs.sources:
            if source.run is None:  # a LoRA adapter as mergekit names it: BASE+ADAPTER
                refs[source.name] = mergekit_reference(source.path, source.adapter_base or self.space.base)
            elif Recipe.from_dict(source.recipe).spec.mergekit_name is not None:  # else: no mergekit.yaml at all
                intermediates[source.name] = recipe_to_mergekit_yaml(
                    Recipe.from_dict(source.recipe), source.run_base, source.run_experts, source.num_layers, dtype=dtype)
        return export_path(self.pool, self._path(attrs), out_dir, tokenizer=self.tokenizer, model_refs=refs,
                           intermediates=intermediates, sources=self._sources(), details=details,
                           max_shard_size=max_shard_size, owner=owner, force=force, finish=finish)

    def baseline_genomes(self):
        """Every source alone (when it fits the budgets), then the space's hand-written paths."""
        genomes = {}
        for source in self.dfs.sources:
            layers = [(source.name, i) for i in range(source.num_layers)]
            fits = len(layers) <= self.dfs.max_layers and (
                self.dfs.max_params is None or self.dfs.path_params(layers) <= self.dfs.max_params)
            if fits and self.dfs.path_slots(layers) is not None:
                genomes[f"source {source.name}"] = path_genome(self.dfs, layers)
        for path in self.dfs.paths:
            genomes.setdefault(f"path {path.describe()}", path_genome(self.dfs, path.layers))
        return genomes

    def extra_endpoints(self):
        return dict(self.run_models)

    def study_config(self):
        return {TrialKey.DFS_SOURCES: self._sources()}


def space_device(space: SearchSpace) -> str | None:
    """The device a space asks for; None lets the loader pick (CUDA when present)."""
    return None if space.device == "auto" else space.device


def genes_of(space: SearchSpace, num_layers: int) -> Genes:
    """The genome of a space whose base model has ``num_layers`` layers, without loading any weight."""
    if space.dfs is not None:
        return dfs_genome_space(space.dfs)
    return genome_space(space.merge, space.expert_names, num_layers)


def statistics_files(run_dir: str | Path) -> StatisticsFiles:
    """Where a run keeps the data statistics its merge method reads (`evomerge.search.data_statistics`)."""
    return StatisticsFiles(Path(run_dir) / STATISTICS_DIR)


def make_builder(space: SearchSpace, run_dir: str | Path | None = None) -> CandidateBuilder:
    """The builder for a space: a data-flow path when it has a `dfs` section, else a merge (reading the
    data statistics of ``run_dir`` when its method needs them)."""
    if space.dfs is not None:
        return DataFlowMerge(space)
    return ParameterMerge(space, statistics=statistics_files(run_dir) if run_dir is not None else None)
