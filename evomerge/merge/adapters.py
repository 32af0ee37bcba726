"""PEFT LoRA adapters as experts: read an adapter folder and make its task vector against the base.

An expert may be a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) trained on the base. Its task vector is what
peft's ``merge_and_unload()`` would change, so a merge treats the adapter
exactly as the merged full model that mergekit's ``BASE+ADAPTER`` syntax
makes: per LoRA target ``W' = W + transpose(B @ A, fan_in_fan_out) * scaling``
(float32, as peft computes it, then rounded to the base checkpoint's dtype;
a LoRA bias adds ``lora_B.bias * scaling``), per full tensor the adapter saved
(``modules_to_save``, biases trained with ``bias: all / lora_only``, embedding
base layers) that tensor, and ``W' - W`` in the merge dtype is the task
vector; it is zero everywhere else.

No full expert model is ever made: `AdapterWeights` keeps the adapter's own
tensors (the low-rank factors and any saved full tensors) on the merge
device, and the memory plan either keeps an adapter's task-vector block
dense on the device or recomputes it from the factors for each candidate
(`evomerge.merge.planner`, tier ``factors``). What peft cannot merge exactly
as a weight delta (DoRA, other LoRA variants, other PEFT types, initialisations
that rewrite the base) is refused with one error naming the folder and the
setting.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from evomerge.errors import EvomergeError
from evomerge.merge.loading import (
    INDEX_FILE,
    SINGLE_FILE,
    ModelFiles,
    _read_header_shapes,
    check_compatible,
    open_model,
    warn_non_finite,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model

_MERGE_ADVICE = ("merge it with peft (PeftModel.from_pretrained(base, adapter).merge_and_unload()"
                 ".save_pretrained(folder)) and give that folder as a full fine-tune")
# LoraConfig fields that turn on a LoRA variant whose merge is not W + B @ A * scaling.
_VARIANTS = {
    "use_dora": "DoRA rescales every column of the merged weight by a learned magnitude",
    "alora_invocation_tokens": "an activated LoRA (aLoRA) acts only after its invocation tokens and cannot be merged",
    "velora_config": "VeLoRA is a LoRA variant evomerge does not merge",
    "monteclora_config": "MonteCLoRA is a LoRA variant evomerge does not merge",
    "use_bdlora": "block-diagonal LoRA is a LoRA variant evomerge does not merge",
    "arrow_config": "Arrow routes between several LoRAs per token and cannot be merged",
    "kasa_config": "KaSA is a LoRA variant evomerge does not merge",
    "use_qalora": "QALoRA merges into a quantized (GPTQ) base",
    "layer_replication": "layer replication changes the base's architecture",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not read by evomerge",
    "trainable_token_indices": "trainable tokens change single embedding rows and are not read by evomerge",
    "megatron_config": "Megatron-parallel LoRA layers are not read by evomerge",
}
# init_lora_weights values with which peft rewrites the base's weights when the adapter is loaded.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_adapter(path) -> bool:
    """True for a PEFT adapter folder (adapter_config.json and no full model weights)."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (
        (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file())


@dataclass(frozen=True)
class LowRankChange:
    """One base tensor that changes by ``transpose(B @ A) * scaling`` (or, for a LoRA bias, by ``b * scaling``)."""

    tensor: str  # the base's tensor name
    a_key: Optional[str]  # adapter key of A (None for a lora_B bias)
    b_key: str  # adapter key of B (or of lora_B's bias)
    rank: int
    scaling: float
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D) or an embedding: the product is transposed
    embedding: bool = False  # peft rounds an embedding's delta to the weight's dtype before adding it


@dataclass
class AdapterFiles:
    """A LoRA adapter checked against one base: which base tensors it changes, and how; nothing loaded yet."""

    path: Path
    config: dict
    file: Path
    base: ModelFiles
    low_rank: dict = field(default_factory=dict)  # base tensor -> LowRankChange
    replaced: dict = field(default_factory=dict)  # base tensor -> adapter key of its saved full tensor
    key_shapes: dict = field(default_factory=dict)
    key_dtypes: dict = field(default_factory=dict)

    @property
    def changed(self) -> set:
        """Names of the base tensors whose task vector is not zero."""
        return set(self.low_rank) | set(self.replaced)

    @property
    def device_bytes(self) -> int:
        """Bytes of the adapter's tensors on the merge device (factors in their file dtype, full tensors in the
        base's)."""
        total = 0
        for change in self.low_rank.values():
            for key in (change.a_key, change.b_key):
                if key is not None:
                    total += _numel(self.key_shapes[key]) * _element_size(self.key_dtypes[key])
        for name in self.replaced:
            total += _numel(self.base.shapes[name]) * _element_size(self.base.dtypes[name])
        return total


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def open_expert(path, base: ModelFiles):
    """An expert folder checked against the base: `ModelFiles` for a full fine-tune, `AdapterFiles` for an adapter."""
    if is_adapter(path):
        return open_adapter(path, base)
    expert = open_model(path)
    check_compatible(base, [expert])
    return expert


def open_experts(base: ModelFiles, paths) -> list:
    """Every expert of a merge, checked against the base (see `open_expert`)."""
    return [open_expert(path, base) for path in paths]


def _read_config(folder: Path) -> dict:
    config_file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvomergeError(f"adapter {folder}: cannot read {ADAPTER_CONFIG} ({err})") from err
    if not isinstance(config, dict):
        raise EvomergeError(f"adapter {folder}: {ADAPTER_CONFIG} is not a JSON object")
    return config


def recorded_base(path) -> str:
    """The base an adapter records (``base_model_name_or_path``), for an adapter given without one; it must be
    a local model folder (nothing is downloaded)."""
    name = _read_config(Path(path)).get("base_model_name_or_path")
    if not name or not (Path(name) / "config.json").is_file():
        raise EvomergeError(f"adapter {path}: its base_model_name_or_path {name!r} is not a local model folder; "
                            "name the base with the adapter (e.g. as an expert of a search space on that base)")
    return str(name)


def check_supported(config: dict, folder) -> None:
    """Refuse, naming the folder and the setting, what is not a plain LoRA weight delta."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise EvomergeError(f"adapter {folder}: peft_type {config.get('peft_type')!r} is not supported (evomerge reads "
                            f"LoRA adapters); {_MERGE_ADVICE}")
    for key, why in _VARIANTS.items():
        if config.get(key):
            raise EvomergeError(f"adapter {folder}: {key}={config[key]!r} is not supported: {why}; {_MERGE_ADVICE}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise EvomergeError(f"adapter {folder}: init_lora_weights='mica' is not supported: MiCA is a LoRA variant "
                            f"evomerge does not merge; {_MERGE_ADVICE}")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise EvomergeError(
            f"adapter {folder}: init_lora_weights={init!r} is not supported: peft rewrites the base's weights when "
            f"it loads such an adapter, so its weight delta is not B @ A on the base; convert it to a plain LoRA "
            f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)) or {_MERGE_ADVICE}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise EvomergeError(f"adapter {folder}: {ADAPTER_CONFIG} {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise EvomergeError(f"adapter {folder}: {ADAPTER_CONFIG} {key} must be a mapping, got {config[key]!r}")


def pattern_value(patterns: dict, module: str, default):
    """peft's per-module `rank_pattern` / `alpha_pattern` lookup: the first key matching the module name's end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(rank, scaling) of one target module: alpha / r, or alpha / sqrt(r) with use_rslora (as peft computes it)."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if config.get("use_rslora"):
        return rank, alpha / math.sqrt(rank)
    return rank, alpha / rank


_LORA_SUFFIXES = {  # key suffix -> (role, LoRA on an embedding)
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".lora_B.bias": ("bias", False),
}


def open_adapter(path, base: ModelFiles) -> AdapterFiles:
    """Index a LoRA adapter folder and check it against `base`, from headers only.

    Every adapter key is mapped onto a base tensor name (``base_model.model.`` dropped,
    ``.base_layer`` removed); a key the base lacks, a shape that does not fit, or a
    rank that disagrees with adapter_config.json is refused naming the file and the key.
    """
    folder = Path(path)
    config = _read_config(folder)
    check_supported(config, folder)
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        other = "adapter_model.bin is not read; " if (folder / "adapter_model.bin").is_file() else ""
        raise EvomergeError(f"adapter {folder}: no {ADAPTER_WEIGHTS} ({other}save the adapter with "
                            "save_pretrained(..., safe_serialization=True))")
    shapes, dtypes = _read_header_shapes(file, folder)
    made_for = config.get("base_model_name_or_path")
    made_for = f" (made for {made_for})" if made_for else ""
    lora_bias = bool(config.get("lora_bias"))

    factors: dict = {}  # module -> {role: key}, embedding flag
    adapter = AdapterFiles(path=folder, config=config, file=file, base=base, key_shapes=shapes, key_dtypes=dtypes)
    for key in shapes:
        where = f"adapter file {file}: tensor {key}"
        if not dtypes[key].is_floating_point:
            raise EvomergeError(f"{where} has dtype {dtypes[key]}, not a floating type")
        if not key.startswith(PEFT_PREFIX):
            raise EvomergeError(f"{where} does not start with {PEFT_PREFIX!r}: not a PEFT adapter of a causal LM")
        rest = key[len(PEFT_PREFIX):]
        if ".lora_" in rest:
            suffix = next((s for s in _LORA_SUFFIXES if rest.endswith(s)), None)
            if suffix is None:
                raise EvomergeError(f"{where} is not a LoRA factor evomerge reads (lora_A / lora_B weights, "
                                    "lora_embedding_A / lora_embedding_B)")
            role, embedding = _LORA_SUFFIXES[suffix]
            if role == "bias" and not lora_bias:
                raise EvomergeError(f"{where} is a LoRA bias but {ADAPTER_CONFIG} has lora_bias false")
            module = rest[: -len(suffix)]
            entry = factors.setdefault(module, {"embedding": embedding})
            if entry["embedding"] != embedding:
                raise EvomergeError(f"{where} mixes linear and embedding LoRA factors on module {module}")
            entry[role] = key
            continue
        name = ".".join(part for part in rest.split(".") if part != "base_layer")
        _check_base_tensor(adapter, key, name, made_for)
        if tuple(shapes[key]) != tuple(base.shapes[name]):
            raise EvomergeError(f"{where} has shape {list(shapes[key])} but base {base.path} has "
                                f"{list(base.shapes[name])} for {name}{made_for}")
        adapter.replaced[name] = key

    conv1d = None
    for module, entry in factors.items():
        for role in ("A", "B"):
            if role not in entry:
                other = entry.get("B" if role == "A" else "A") or entry.get("bias")
                raise EvomergeError(f"adapter file {file}: tensor {other} has no matching lora_{role} "
                                    f"for module {module}")
        a_key, b_key = entry["A"], entry["B"]
        name = f"{module}.weight"
        _check_base_tensor(adapter, a_key, name, made_for)
        rank, scaling = module_scaling(config, module)
        a_shape, b_shape, w_shape = tuple(shapes[a_key]), tuple(shapes[b_key]), tuple(base.shapes[name])
        if len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2:
            raise EvomergeError(f"adapter file {file}: tensor {a_key} is a LoRA of a {len(w_shape)}-D weight "
                                f"{name} (shape {list(w_shape)}); evomerge merges LoRAs of linear, Conv1D and "
                                "embedding layers")
        if a_shape[0] != rank or b_shape[1] != rank:
            raise EvomergeError(f"adapter file {file}: tensor {a_key} has rank {a_shape[0]} (and {b_key} "
                                f"{b_shape[1]}) but {ADAPTER_CONFIG} gives module {module} rank {rank}")
        product = (b_shape[0], a_shape[1])
        if entry["embedding"]:
            transpose = True
        elif product == w_shape and product[::-1] == w_shape:  # square: only the layer type tells
            if conv1d is None:
                conv1d = _conv1d_modules(base, bool(config.get("fan_in_fan_out")))
            transpose = module in conv1d if isinstance(conv1d, set) else conv1d
        else:
            transpose = product != w_shape
        if (product[::-1] if transpose else product) != w_shape:
            raise EvomergeError(f"adapter file {file}: tensor {b_key} @ {a_key} has shape {list(product)} but base "
                                f"{base.path} has {list(w_shape)} for {name}{made_for}")
        adapter.low_rank[name] = LowRankChange(name, a_key, b_key, rank, scaling, transpose, entry["embedding"])
        if "bias" in entry:
            bias_name = f"{module}.bias"
            _check_base_tensor(adapter, entry["bias"], bias_name, made_for)
            if tuple(shapes[entry["bias"]]) != tuple(base.shapes[bias_name]):
                raise EvomergeError(f"adapter file {file}: tensor {entry['bias']} has shape "
                                    f"{list(shapes[entry['bias']])} but base {base.path} has "
                                    f"{list(base.shapes[bias_name])} for {bias_name}{made_for}")
            adapter.low_rank[bias_name] = LowRankChange(bias_name, None, entry["bias"], rank, scaling, False)
    return adapter


def _check_base_tensor(adapter: AdapterFiles, key: str, name: str, made_for: str) -> None:
    base = adapter.base
    if name not in base.shapes:
        tied = " (the base ties lm_head to embed_tokens)" if name.startswith("lm_head") and base.tied_embeddings else ""
        raise EvomergeError(f"adapter file {adapter.file}: tensor {key} changes {name}, which base {base.path} "
                            f"lacks{tied}{made_for}")
    if not base.dtypes[name].is_floating_point:
        raise EvomergeError(f"adapter file {adapter.file}: tensor {key} changes {name}, which is not a floating "
                            f"tensor in base {base.path}")


_CONV1D_CACHE: dict = {}


def _conv1d_modules(base: ModelFiles, fallback: bool):
    """Names of the base's transformers `Conv1D` modules (weights stored [in, out], as peft's fan_in_fan_out
    means), from a skeleton built on the meta device; `fallback` (the config's fan_in_fan_out) if that fails."""
    key = str(base.path)
    if key not in _CONV1D_CACHE:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
            from transformers.pytorch_utils import Conv1D

            hf_config = AutoConfig.for_model(**base.config)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config)
            _CONV1D_CACHE[key] = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
        except Exception:  # an architecture transformers cannot build here: trust adapter_config.json
            _CONV1D_CACHE[key] = None
    found = _CONV1D_CACHE[key]
    return fallback if found is None else found


class AdapterWeights:
    """One adapter's tensors on the merge device; makes a changed tensor's merged weight or task vector on demand.

    Factors keep their file dtype and are multiplied in float32, as peft does after
    upcasting them (autocast_adapter_dtype); full tensors are kept in the base
    checkpoint's dtype, as peft loads them into the base's parameters. Each tensor
    is its own allocation, so the product is computed the same way every time.
    """

    def __init__(self, files: AdapterFiles, device):
        self.files = files
        self.device = torch.device(device)
        self.tensors: dict = {}
        keys = {k for c in files.low_rank.values() for k in (c.a_key, c.b_key) if k is not None}
        with safe_open(str(files.file), framework="pt", device="cpu") as handle:
            for key in sorted(keys):
                tensor = handle.get_tensor(key)
                warn_non_finite(tensor, key, files.file)
                self.tensors[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device).copy_(tensor)
            for name, key in files.replaced.items():
                tensor = handle.get_tensor(key)
                warn_non_finite(tensor, key, files.file)
                self.tensors[key] = tensor.to(device=self.device, dtype=files.base.dtypes[name])
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())

    def changes(self, name: str) -> bool:
        return name in self.files.low_rank or name in self.files.replaced

    def _factor_dtype(self, name: str) -> torch.dtype:
        """peft's adapter dtype: the base layer's, upcast to float32 from half precision."""
        dtype = self.files.base.dtypes[name]
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def delta(self, name: str) -> torch.Tensor:
        """``transpose(B @ A) * scaling`` (or a LoRA bias times scaling) in peft's float dtype, shaped like the
        tensor."""
        change = self.files.low_rank[name]
        dtype = self._factor_dtype(name)
        b = self.tensors[change.b_key].to(dtype)
        if change.a_key is None:
            return b * change.scaling
        product = b @ self.tensors[change.a_key].to(dtype)
        if change.transpose:
            product = product.T
        return product * change.scaling

    @torch.no_grad()
    def merged(self, name: str, base_values: torch.Tensor) -> torch.Tensor:
        """The tensor as peft's merge_and_unload() leaves it, in the base checkpoint's dtype.

        ``base_values``: the base's values of the tensor (any shape, any dtype) on the device.
        """
        dtype = self.files.base.dtypes[name]
        shape = self.files.base.shapes[name]
        key = self.files.replaced.get(name)
        weight = self.tensors[key] if key is not None else base_values.reshape(shape).to(dtype)
        change = self.files.low_rank.get(name)
        if change is not None:
            delta = self.delta(name)
            if change.embedding:  # peft's Embedding.merge: weight.data += delta.to(weight.dtype)
                delta = delta.to(dtype)
            weight = torch.add(weight, delta).to(dtype)  # peft's Linear.merge: weight.data += delta
        return weight

    @torch.no_grad()
    def task_vector_into(self, name: str, base_flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the tensor's task vector (merged - base, in `out`'s dtype) into `out` (flat, like `base_flat`)."""
        if not self.changes(name):
            return out.zero_()
        merged = self.merged(name, base_flat).reshape(-1).to(out.dtype)
        return torch.sub(merged, base_flat, out=out)

    @torch.no_grad()
    def block_task_vector_into(self, block, base_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The task vector of one layout block (flat, `base_block` its base values) into `out`."""
        for slot in block.slots:
            start, end = slot.offset - block.start, slot.end - block.start
            self.task_vector_into(slot.name, base_block[start:end], out[start:end])
        return out


def mergekit_reference(path, base_path) -> str:
    """How a mergekit config names an expert: its folder, or ``BASE+ADAPTER`` for a LoRA adapter.

    mergekit merges such a reference with peft's merge_and_unload() into its
    ``--lora-merge-cache`` folder and reads the result as a full model: the
    model this module's task vector stands for.
    """
    if not is_adapter(path):
        return str(path)
    for folder in (base_path, path):
        if "+" in str(folder):
            raise EvomergeError(f"{folder}: mergekit splits model references at '+' (BASE+ADAPTER), so a LoRA "
                                "expert's base and adapter folders cannot contain '+'; rename the folder")
    return f"{base_path}+{path}"


def mergekit_note(expert_paths) -> str:
    """A YAML comment for a mergekit config with LoRA experts (mergekit needs a folder to merge them into)."""
    if not any(is_adapter(p) for p in expert_paths):
        return ""
    return ("# LoRA experts are named BASE+ADAPTER: run mergekit-yaml with --lora-merge-cache DIR "
            "(peft merges each adapter into its base there)\n")


@torch.no_grad()
def merge_adapter_into(model, adapter: AdapterFiles):
    """Merge a LoRA adapter into a loaded transformers model of its base, in place, as merge_and_unload() does.

    For sources loaded whole (data-flow merges, calibration endpoints): the
    adapter's factors are read onto the model's device, each changed parameter
    is overwritten with its merged value, and the factors are freed.
    """
    params = dict(model.named_parameters())
    missing = sorted(name for name in adapter.changed if name not in params)
    if missing:
        raise EvomergeError(f"adapter {adapter.path}: the model loaded from {adapter.base.path} has no parameter "
                            f"{missing[0]} (changed by {adapter.file})")
    device = next(iter(params.values())).device
    weights = AdapterWeights(adapter, device)
    for name in sorted(adapter.changed):
        param = params[name]
        param.data.copy_(weights.merged(name, param.data).to(param.dtype))
    return model
