"""Write a data-flow path as a plain Hugging Face checkpoint, with the mergekit config that re-makes it.

The checkpoint has one layer per path position (``num_hidden_layers`` = path
length): repeated layers are written once per position, and a scaled
position's branch outputs (``o_proj``, ``down_proj``) carry its multiplier
folded into their weights (see `evomerge.dataflow.path`), so plain
``from_pretrained`` computes what the search scored, no custom code needed.
Tensors are streamed into safetensors shards, so the path model is never
materialised whole in memory.

The mergekit config is a ``passthrough`` merge with one slice per run of
consecutive layers; a scaled slice multiplies its branch outputs with
passthrough's ``scale`` parameter (filters on ``self_attn.o_proj`` and
``mlp.down_proj``), the same product in the same dtype, so ``mergekit-yaml``
re-makes the checkpoint bit for bit. A source that is itself a merge (a
parameter-space run's trial) comes first as a named document, and the file is
run with ``mergekit-multi``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
import yaml

from evomerge.dataflow.model import BRANCH_OUTPUTS, LayerPool
from evomerge.dataflow.path import DataFlowPath
from evomerge.export import export_folder

PATH_FILE = "evomerge_path.json"
MERGEKIT_FILE = "mergekit.yaml"
SCALE_FILTERS = tuple(prefix.rstrip(".") for prefix in BRANCH_OUTPUTS)


def path_to_mergekit_yaml(path: DataFlowPath, model_refs: dict[str, str], dtype: str = "float32",
                          intermediates: dict[str, str] | None = None) -> str:
    """mergekit config text for ``path``; ``intermediates`` maps a source name to its own merge YAML."""
    intermediates = intermediates or {}
    slices = []
    for part in path.slices():
        ref = part.source if part.source in intermediates else str(model_refs[part.source])
        entry: dict = {"sources": [{"model": ref, "layer_range": [part.start, part.stop]}]}
        if part.multiplier != 1.0:
            entry["parameters"] = {"scale": [{"filter": f, "value": part.multiplier} for f in SCALE_FILTERS]
                                   + [{"value": 1.0}]}
        slices.append(entry)
    documents = [{"name": name, **yaml.safe_load(text)} for name, text in intermediates.items()]
    documents.append({"merge_method": "passthrough", "dtype": dtype, "slices": slices})
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=None)


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, max_shard_size: str | int = "1GB") -> list[str]:
    """Stream named tensors into HF-layout shards (``model.safetensors`` or an indexed set); returns file names.

    Each shard's tensors are copied as they are written (sources may share
    storage, and a repeated layer appears at several positions).
    """
    from safetensors.torch import save_file
    from transformers.utils.hub import convert_file_size_to_int

    out_dir = Path(out_dir)
    limit = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            file = out_dir / f"model-part{len(written):05d}.safetensors.tmp"
            save_file(shard, str(file), metadata={"format": "pt"})
            written.append((file, list(shard)))
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            flush()
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        size += nbytes
        total += nbytes
    flush()
    names = []
    for index, (file, _) in enumerate(written):
        final = "model.safetensors" if len(written) == 1 else f"model-{index + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(file, out_dir / final)
        names.append(final)
    if len(written) > 1:
        weight_map = {tensor: final for final, (_, keys) in zip(names, written) for tensor in keys}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def export_path(pool: LayerPool, path: DataFlowPath, out_dir: str | Path, *, tokenizer, model_refs: dict[str, str],
                intermediates: dict[str, str] | None = None, sources: dict | None = None, details: dict | None = None,
                max_shard_size: str = "1GB", owner: dict | None = None, force: bool = False,
                finish=None) -> Path:
    """Write ``path`` (checkpoint, config, tokenizer, mergekit YAML, path JSON, card) into ``out_dir``.

    Written all or nothing through `evomerge.export.export_folder` (``owner``, ``force``: see there);
    ``finish(folder)`` adds to the export before it is complete (e.g. the card's figures).
    """
    out_dir = Path(out_dir)
    needs = sum(t.numel() * t.element_size() for _, t in pool.state_dict(path))  # a repeated layer is saved each time
    with export_folder(out_dir, owner, force, needs=needs) as folder:
        model = pool.assemble(path)
        dtype = str(model.dtype).removeprefix("torch.")
        write_safetensors(pool.state_dict(path), folder, max_shard_size)
        config = model.config
        config.dtype = dtype
        config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        mergekit_yaml = None
        if all(source in model_refs or source in (intermediates or {}) for source, _ in path.layers):
            mergekit_yaml = path_to_mergekit_yaml(path, model_refs, dtype=dtype, intermediates=intermediates)
            (folder / MERGEKIT_FILE).write_text(mergekit_yaml)
        record = {"path": path.to_dict(), "layers": path.describe(), "sources": sources or {}, "details": details or {}}
        (folder / PATH_FILE).write_text(json.dumps(record, indent=2))
        (folder / "README.md").write_text(path_card(path, sources or {}, details or {}, mergekit_yaml, bool(intermediates)))
        if finish is not None:
            finish(folder)
    return out_dir


def path_card(path: DataFlowPath, sources: dict, details: dict, mergekit_yaml: str | None, multi: bool) -> str:
    """A README saying which layers run in which order, how they are scaled, and how to re-make it."""
    lines = ["---", "library_name: transformers", "tags: [merge, evomerge, passthrough]", "---", "",
             f"# Data-flow merge of {len(sources)} models by evomerge ({len(path)} layers)", "",
             f"- layer path: `{path.describe()}`"]
    lines += [f"- source `{name}`: {json.dumps(identity)}" for name, identity in sources.items()]
    for key, value in details.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Embeddings come from the first layer's source, the final norm and LM head from the last one's.",
              "A scaled position (`xS` above) scales its attention and MLP outputs (the `o_proj` and `down_proj`",
              "weights) by S: the same model as scaling the hidden state entering the layers (up to the norm epsilon).",
              "", "## mergekit", ""]
    if mergekit_yaml is None:
        lines += ["A source is a merge mergekit cannot make (a data-informed method): no `mergekit.yaml` is written."]
    else:
        lines += [f"Re-make it with `{'mergekit-multi' if multi else 'mergekit-yaml'}` (also in `{MERGEKIT_FILE}`):",
                  "", "```yaml", mergekit_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"
