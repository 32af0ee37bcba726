"""Read HF model folders (config + safetensors, single file or sharded) and check
that a base and its experts can be merged tensor by tensor.

Every problem becomes one EvomergeError naming the model and tensor at fault,
because users point evomerge at folders they built themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from evomerge.console import warn
from evomerge.errors import EvomergeError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Config keys that must agree for a tensor-by-tensor merge to make sense.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass
class ModelFiles:
    """Where each tensor of one model lives, plus its config; nothing loaded yet."""

    path: Path
    config: dict
    tensor_files: dict  # tensor name -> safetensors file path
    shapes: dict  # tensor name -> tuple shape
    dtypes: dict  # tensor name -> torch dtype

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def iter_tensors(self, names=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) on CPU, opening each shard once, in `names` order per shard.

        Each tensor is checked for NaN / inf as it streams past (see `warn_non_finite`).
        """
        wanted = list(self.tensor_files) if names is None else list(names)
        by_file: dict = {}
        for name in wanted:
            by_file.setdefault(self.tensor_files[name], []).append(name)
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    warn_non_finite(tensor, name, file)
                    yield name, tensor

    def load(self) -> dict:
        return dict(self.iter_tensors())


def warn_non_finite(tensor: torch.Tensor, name: str, file: Path) -> None:
    """Warn when a weight holds NaN or inf: every merge using it would score the same.

    One sum per tensor (NaN and inf propagate into it; ~20 GB/s on one CPU core,
    no copy); only a non-finite sum (or an fp16 one that overflowed) is counted exactly.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = int(tensor.numel() - torch.isfinite(tensor).sum())
    if bad:
        warn(f"{file}: tensor {name} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
             "merges that use it will not be finite")


def _read_header_shapes(file: Path, model: Path):
    shapes, dtypes = {}, {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = _dtype_from_str(sl.get_dtype())
    except Exception as err:  # safetensors raises several error types
        raise EvomergeError(f"model {model}: cannot read safetensors file {file.name}: {err}") from err
    return shapes, dtypes


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype_from_str(name: str) -> torch.dtype:
    return _DTYPES.get(name.upper(), torch.float32)


def open_model(path) -> ModelFiles:
    """Index a HF model folder: config.json plus model.safetensors or a sharded index."""
    path = Path(path)
    if not path.is_dir():
        raise EvomergeError(f"model folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EvomergeError(f"model {path}: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise EvomergeError(f"model {path}: config.json is not valid JSON ({err})") from err

    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise EvomergeError(f"model {path}: bad {INDEX_FILE} ({err})") from err
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
        weight_map = None
    else:
        others = sorted(p.name for p in path.glob("*.safetensors"))
        if not others:
            raise EvomergeError(
                f"model {path}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                "save it with save_pretrained(..., safe_serialization=True)"
            )
        files, weight_map = others, None

    tensor_files, shapes, dtypes = {}, {}, {}
    for file_name in files:
        file = path / file_name
        if not file.is_file():
            raise EvomergeError(f"model {path}: shard {file_name} listed in {INDEX_FILE} is missing")
        file_shapes, file_dtypes = _read_header_shapes(file, path)
        for name in file_shapes:
            tensor_files[name] = file
        shapes.update(file_shapes)
        dtypes.update(file_dtypes)
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in tensor_files:
                raise EvomergeError(f"model {path}: tensor {name} listed in {INDEX_FILE} is not in {file_name}")
    return ModelFiles(path=path, config=config, tensor_files=tensor_files, shapes=shapes, dtypes=dtypes)


def check_compatible(base: ModelFiles, experts: list) -> None:
    """Raise if any expert differs from the base in architecture, tensor names or shapes.

    Tensors an expert has beyond the base's (e.g. an untied lm_head) are ignored:
    the merge is defined on the base's tensors.
    """
    for expert in experts:
        for key in ARCHITECTURE_KEYS:
            if base.config.get(key) != expert.config.get(key):
                raise EvomergeError(
                    f"model {expert.path} does not match base {base.path}: config {key} is "
                    f"{expert.config.get(key)!r} vs {base.config.get(key)!r}"
                )
        for name, shape in base.shapes.items():
            if name not in expert.shapes:
                if name == "lm_head.weight" and expert.tied_embeddings:
                    raise EvomergeError(
                        f"model {expert.path} ties lm_head to embed_tokens but base {base.path} "
                        "has a separate lm_head.weight"
                    )
                raise EvomergeError(f"model {expert.path} is missing tensor {name} (present in base {base.path})")
            if tuple(expert.shapes[name]) != tuple(shape):
                raise EvomergeError(
                    f"tensor {name} has shape {list(expert.shapes[name])} in {expert.path} "
                    f"but {list(shape)} in base {base.path}"
                )
